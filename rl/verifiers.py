"""Verifiers of the dataset task (`rl.dataset`): text-level rewards

    verifier(prompt: str, completion: str, answer: str) -> float

`prompt` is the record's prompt text (for a `messages` record, its last user turn),
`completion` the decoded completion (up to its first stop token, which is excluded) and
`answer` the record's answer as text (a JSON number as its decimal digits). They run on the
host, through `rl.tasks.python_reward` (a `jax.pure_callback`, which LEAVES the compiled
graph: see there).

  exact_number  1.0 when the last number in the completion equals the last number in the
                answer, else 0.0. A number: an optional '-', digits with optional
                thousands commas ("1,234") and an optional decimal part ("2.50"), not
                directly after a letter, digit or '.' (so "x2" holds none, "5-3" holds 5
                and 3, "1e3" only 1); compared as exact decimals (`decimal.Decimal`), so
                "1,234" == "1234", "2.50" == "2.5", "-0" == "0". A completion without a
                number scores 0.
  regex         1.0 when `re.search(pattern, completion)` finds a match, with each
                "{answer}" in the pattern replaced by the answer, `re.escape`d (so
                "The answer is {answer}\\." needs no escaping of the answer's "." or "$");
                anchor it (`\\A...\\Z`) to require the whole completion.
  python        `module:function` (imported when the task is built; the module must be on
                `sys.path`, e.g. the working directory or PYTHONPATH), called as above; it
                must return a finite number (anything else stops the run with an error
                naming the record).
"""

from __future__ import annotations

import decimal
import importlib
import math
import re
from collections.abc import Callable
from typing import Any

from train.errors import UserError

Verifier = Callable[[str, str, str], float]
VERIFIERS = ("exact_number", "regex", "python")
ANSWER = "{answer}"  # the placeholder of regex patterns

__all__ = ["ANSWER", "VERIFIERS", "Verifier", "checked", "exact_number", "final_number",
           "load_function", "make_verifier", "regex"]

_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3}(?!\d))+|\d+)(?:\.\d+)?")


def final_number(text: str) -> decimal.Decimal | None:
    """The last number in `text` (module docstring), or None."""
    found = _NUMBER.findall(text)
    return decimal.Decimal(found[-1].replace(",", "")) if found else None


def exact_number(prompt: str, completion: str, answer: str) -> float:
    """1.0 when the completion's last number equals the answer's (module docstring)."""
    want, got = final_number(answer), final_number(completion)
    return float(want is not None and got is not None and got == want)


def regex(pattern: str, key: str = "config.rl.dataset.pattern") -> Verifier:
    """The verifier of `pattern` (module docstring); a pattern that does not compile is a
    `UserError` naming `key`."""
    try:
        re.compile(pattern.replace(ANSWER, "0"))
    except re.error as e:
        raise UserError(f"{key}={pattern!r} is not a valid regular expression: {e}") from e

    def verify(prompt: str, completion: str, answer: str) -> float:
        return float(re.search(pattern.replace(ANSWER, re.escape(answer)), completion)
                     is not None)

    verify.__qualname__ = f"regex {pattern!r}"  # for messages and the run log
    return verify


def load_function(spec: str, key: str = "config.rl.dataset.function") -> Callable[..., Any]:
    """The callable `module:function` names (the function may be a dotted attribute path);
    anything else (a bad spec, a module that fails to import, a missing or non-callable
    attribute) is a `UserError` naming `key`."""
    module, sep, name = str(spec).partition(":")
    if not (sep and module and name):
        raise UserError(f"{key}={spec!r} must name a Python function as 'module:function'")
    try:
        obj: Any = importlib.import_module(module)
    except Exception as e:  # ImportError, or any error raised by the module's own code
        raise UserError(f"{key}={spec!r}: cannot import {module!r}: "
                        f"{type(e).__name__}: {e}") from e
    for part in name.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{key}={spec!r}: module {module!r} has no attribute {name!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{key}={spec!r} is not callable (a {type(obj).__name__})")
    return obj


def make_verifier(kind: str, pattern: str = "", function: str = "",
                  key: str = "config.rl.dataset") -> Verifier:
    """The verifier `kind` (one of `VERIFIERS`) with its `pattern` (regex) or `function`
    (python); `UserError` naming `key.*` otherwise."""
    if kind == "exact_number":
        return exact_number
    if kind == "regex":
        if not pattern:
            raise UserError(f"{key}.verifier='regex' needs {key}.pattern")
        return regex(pattern, f"{key}.pattern")
    if kind == "python":
        if not function:
            raise UserError(f"{key}.verifier='python' needs {key}.function='module:function'")
        return load_function(function, f"{key}.function")
    raise UserError(f"{key}.verifier={kind!r} is not one of {', '.join(VERIFIERS)}")


def checked(verify: Verifier) -> Callable[[str, str, str, str], float]:
    """`call(prompt, completion, answer, where) -> float`: `verify(prompt, completion,
    answer)` as a float; a result that is not a finite number raises `UserError` naming the
    verifier and the record (`where`, its `file:line`). Raised inside the reward's host
    callback, it reaches the command line through the runtime error that wraps it
    (`train.cli.user_errors` prints its one line)."""
    name = getattr(verify, "__qualname__", repr(verify))

    def call(prompt: str, completion: str, answer: str, where: str) -> float:
        r = verify(prompt, completion, answer)
        try:
            v = float(r)
        except (TypeError, ValueError):
            raise UserError(f"verifier {name} returned {r!r} for the record at {where}: "
                            "expected a number") from None
        if not math.isfinite(v):
            raise UserError(f"verifier {name} returned {v} for the record at {where}: "
                            "rewards must be finite")
        return v

    return call

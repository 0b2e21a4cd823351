"""The one command-line boundary of every entry point (`python -m train`, `python -m rl`,
`python -m train.sweep`, `python -m rl.generate`, ...).

`parse_config(argv)` reads `--config FILE [--config.key=value ...]` (ml_collections) and
turns every way that can go wrong into a `UserError` naming the key or the file;
`user_errors()` is the single place where a `UserError` becomes one line `error: ...` on
stderr and exit code 2, and a preemption (`Preempted`: checkpoint saved, rerun to resume)
exit code 75. Bugs keep their traceback.
"""

from __future__ import annotations

import contextlib
import logging as pylogging
import os
import re
import sys
from collections.abc import Iterator

import jax
from absl import flags, logging
from ml_collections import ConfigDict, config_flags

from train.errors import EXIT_PREEMPTED, Preempted, UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if e.args else str(e)
    return " ".join(text.replace("\\n", " ").replace("\\'", "'").strip("'\" ").split())


def parse_config(argv: list[str]) -> ConfigDict:
    """The config named by `--config` with its `--config.key=value` overrides applied.

    Raises:
      UserError: a missing or unloadable config file, an unknown key, a bad value.
    """
    named = any(a == "--config" or a.startswith("--config=") for a in argv[1:])
    if not named and any(a.startswith("--config.") for a in argv[1:]):
        raise UserError("--config is required, e.g. --config configs/tiny.py "
                        "(the --config.key=value overrides apply to it)")
    try:
        flags.FLAGS(argv)
        config = _CONFIG.value
        if config is not None:
            config.keys()  # a config file that failed to load raises here
    except OSError as e:
        raise UserError(f"cannot load the --config file: {_one_line(e)}") from e
    except SyntaxError as e:
        raise UserError(f"the --config file {e.filename} has a syntax error at line {e.lineno}: "
                        f"{e.msg}") from e
    except flags.Error as e:
        raise UserError(_one_line(e)) from e
    except (AttributeError, KeyError) as e:
        raise UserError(f"unknown config key in an override: {_one_line(e)}") from e
    except (ValueError, TypeError) as e:
        raise UserError(f"bad config override: {_one_line(e)}") from e
    if config is None:
        raise UserError("--config is required, e.g. --config configs/tiny.py")
    return config


def _closed_loop_noise(kind, value, tb) -> bool:
    """The `RuntimeError: Event loop is closed` that TensorStore's callback threads report
    (as an unraisable exception) after an Orbax read failed halfway: they complete reads
    into the event loop that the failed read already closed. Noise after the one `error:`
    line, not a second error."""
    last = tb
    while last is not None and last.tb_next is not None:
        last = last.tb_next
    return (kind is RuntimeError and str(value) == "Event loop is closed" and last is not None
            and last.tb_frame.f_code.co_filename.endswith(os.path.join("asyncio", "base_events.py")))


def _orbax_read_leftover(obj) -> bool:
    """An Orbax read coroutine left un-awaited by a read that failed (reported when it is
    garbage-collected, after the `error:` line)."""
    code = getattr(obj, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _quiet_unraisable(hook):
    def unraisablehook(u):
        if not (_closed_loop_noise(u.exc_type, u.exc_value, u.exc_traceback)
                or _orbax_read_leftover(u.object)):
            hook(u)

    return unraisablehook


# The last line of a callback's traceback text, the class named with or without its module.
_USER_ERROR = re.compile(rf"^(?:{re.escape(UserError.__module__)}\.)?"
                         rf"{UserError.__qualname__}: (.+)$", re.MULTILINE)


def callback_user_error(e: BaseException) -> str | None:
    """The message of a `UserError` raised inside a host callback (`jax.pure_callback`,
    e.g. a verifier's reward), which reaches the caller wrapped in the runtime's error with
    the callback's traceback as text; None when `e` wraps something else."""
    found = _USER_ERROR.findall(str(e))
    return found[-1].strip() if found else None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Runs the body of a command; a `UserError` is printed as one `error:` line, exit 2,
    also when a host callback raised it inside a compiled step (`callback_user_error`).

    Also keeps Orbax's and absl's per-save INFO lines off the console, and JAX's log of a
    failed callback (its traceback is in the error that the call raises).
    """
    logging.set_verbosity(logging.WARNING)
    pylogging.getLogger("jax._src.callback").setLevel(pylogging.CRITICAL)
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except jax.errors.JaxRuntimeError as e:
        message = callback_user_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except KeyboardInterrupt:  # a second Ctrl-C, outside the steps' own handler
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)

"""Verifiable tasks: prompts generated and rewards computed in JAX, inside the jitted RL step.

Tokens are those of the byte tokenizer (`train.data.ByteTokenizer`): UTF-8 bytes 0..255
and EOS = 256. Every task is a frozen dataclass (its fields are static) with

  sample_prompts(key, batch) -> (prompt_tokens [B, P] int32, prompt_lens [B] int32, answer)
      Prompts are right-padded with EOS to the task's fixed width P = `prompt_width`;
      `answer` is a dict of arrays (a pytree) holding what `reward` needs.
  reward(completion [B, C], completion_mask [B, C], answer) -> [B] float32
      1 when the completion is exactly the answer followed by EOS (every one of those
      tokens unmasked), else `format_reward` when it is well formed (see each task), else 0.

`completion_mask` is the sampler's: 1 on the generated tokens up to and including the first
EOS (`rl.sampling.sample`). `min_new_tokens` is the completion budget the longest answer
needs (answer + EOS). `stop_ids` (the sampler's stop tokens, here `(EOS,)`) and `pad_id`
(EOS) are what the RL step samples with; `rl.dataset.DatasetTask` (prompts from JSONL files,
the run's tokenizer) has the same interface.

Tasks: `Addition` ("123+45=" -> "168"), `DigitTask` reverse ("rev(3141)=" -> "1413") and
sort ("sort(3141)=" -> "1134"), `Countdown` ("3,7,5->26:" -> e.g. "3*7+5"). `python_reward`
wraps a text-level Python reward function as a host callback (any tokenizer, via `decode`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EOS = 256
PAD = EOS  # right padding of prompts
_ZERO, _NINE = ord("0"), ord("9")
_OPS = {"+": 1, "-": 2, "*": 3}

Answer = dict[str, jax.Array]

__all__ = [
    "EOS",
    "TASKS",
    "Addition",
    "ByteTask",
    "Countdown",
    "DigitTask",
    "decode",
    "make_task",
    "python_reward",
]


# ------------------------------------------------------------------ token-level helpers
def _const(text: str, batch: int) -> tuple[jax.Array, jax.Array]:
    b = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    return (jnp.broadcast_to(jnp.asarray(b), (batch, len(b))),
            jnp.full((batch,), len(b), jnp.int32))


def _concat(pieces: Sequence[str | tuple[jax.Array, jax.Array]], batch: int):
    """Concatenates variable-length pieces per row: each a constant string or
    `(tokens [B, w], lens [B])` (the first `lens` tokens count). Returns
    `(tokens [B, sum w] right-padded with PAD, lens [B])`."""
    arrs = [_const(p, batch) if isinstance(p, str) else p for p in pieces]
    width = sum(t.shape[1] for t, _ in arrs)
    out = jnp.full((batch, width), PAD, jnp.int32)
    off = jnp.zeros((batch,), jnp.int32)
    rows = jnp.arange(batch)[:, None]
    for toks, n in arrs:
        j = jnp.arange(toks.shape[1])[None, :]
        idx = jnp.where(j < n[:, None], off[:, None] + j, width)  # past the end -> dropped
        out = out.at[rows, idx].set(toks.astype(jnp.int32), mode="drop")
        off = off + n
    return out, off


def _n_digits(max_value: int) -> int:
    return len(str(max_value))


def _digits(x: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """Decimal digits of non-negative int32 `x [B]` (most significant first, no leading
    zeros) as `(tokens [B, width], lens [B])`; `width` <= 10."""
    pow10 = jnp.asarray([10**k for k in range(width)], jnp.int32)
    n = 1 + jnp.sum(x[:, None] >= pow10[None, 1:], axis=1).astype(jnp.int32)
    j = jnp.arange(width)[None, :]
    e = jnp.clip(n[:, None] - 1 - j, 0, width - 1)
    d = (x[:, None] // pow10[e]) % 10
    return jnp.where(j < n[:, None], _ZERO + d, PAD).astype(jnp.int32), n


def _signed(x: jax.Array, width: int) -> list[tuple[jax.Array, jax.Array]]:
    """Pieces for `_concat`: an optional '-' then the digits of |x|."""
    b = x.shape[0]
    minus = (jnp.full((b, 1), ord("-"), jnp.int32), (x < 0).astype(jnp.int32))
    return [minus, _digits(jnp.abs(x), width)]


def _exact_match(completion, mask, target, target_len) -> jax.Array:
    """`[B]` bool: completion[:n] == target[:n] and completion[n] == EOS, all unmasked."""
    b, c = completion.shape
    w = max(c, target.shape[1] + 1)
    comp = jnp.pad(completion, ((0, 0), (0, w - c)), constant_values=-1)
    m = jnp.pad(mask.astype(bool), ((0, 0), (0, w - c)))
    tgt = jnp.pad(target, ((0, 0), (0, w - target.shape[1])), constant_values=-1)
    j = jnp.arange(w)[None, :]
    n = target_len[:, None]
    tgt = jnp.where(j == n, EOS, tgt)
    ok = (comp == tgt) & m
    return jnp.all(jnp.where(j <= n, ok, True), axis=1)


def _digits_then_eos(completion, mask) -> jax.Array:
    """`[B]` bool: one or more unmasked digits followed by an unmasked EOS."""
    m = mask.astype(bool)
    is_eos = (completion == EOS) & m
    first = jnp.argmax(is_eos, axis=1)
    has_eos = jnp.any(is_eos, axis=1)
    j = jnp.arange(completion.shape[1])[None, :]
    digit = (completion >= _ZERO) & (completion <= _NINE) & m
    return has_eos & (first > 0) & jnp.all(jnp.where(j < first[:, None], digit, True), axis=1)


def _score(correct, well_formed, format_reward: float) -> jax.Array:
    return jnp.where(correct, 1.0, jnp.where(well_formed, format_reward, 0.0)).astype(jnp.float32)


# ----------------------------------------------------------------------------- tasks
class ByteTask:
    """What the tasks below share: the sampler stops at `stop_ids` (the byte tokenizer's
    EOS) and pads with `pad_id` (EOS)."""

    stop_ids: tuple[int, ...] = (EOS,)
    pad_id: int = PAD


@dataclasses.dataclass(frozen=True)
class Addition(ByteTask):
    """"a+b=" -> the decimal sum, then EOS. Each operand has a number of digits drawn
    uniformly from [min_digits, max_digits], then a value uniform among numbers with that
    many digits (0..9 for one digit). Well formed: digits then EOS."""

    min_digits: int = 1
    max_digits: int = 3
    format_reward: float = 0.0

    def __post_init__(self):
        if not 1 <= self.min_digits <= self.max_digits <= 8:
            raise ValueError(f"need 1 <= min_digits={self.min_digits} <= max_digits="
                             f"{self.max_digits} <= 8")

    @property
    def prompt_width(self) -> int:
        return 2 * self.max_digits + 2

    @property
    def min_new_tokens(self) -> int:
        return self.max_digits + 2

    def _operand(self, key, batch):
        kd, kx = jax.random.split(key)
        d = jax.random.randint(kd, (batch,), self.min_digits, self.max_digits + 1)
        pow10 = jnp.asarray([10**k for k in range(self.max_digits + 1)], jnp.int32)
        lo = jnp.where(d == 1, 0, pow10[d - 1])
        return jax.random.randint(kx, (batch,), lo, pow10[d])

    def sample_prompts(self, key: jax.Array, batch: int):
        ka, kb = jax.random.split(key)
        a, b = self._operand(ka, batch), self._operand(kb, batch)
        w = self.max_digits
        prompt, lens = _concat([_digits(a, w), "+", _digits(b, w), "="], batch)
        target, target_len = _digits(a + b, w + 1)
        return prompt, lens, {"target": target, "target_len": target_len}

    def reward(self, completion: jax.Array, completion_mask: jax.Array, answer: Answer):
        correct = _exact_match(completion, completion_mask, answer["target"], answer["target_len"])
        return _score(correct, _digits_then_eos(completion, completion_mask), self.format_reward)


@dataclasses.dataclass(frozen=True)
class DigitTask(ByteTask):
    """A random digit string (leading zeros allowed) of length uniform in
    [min_len, max_len]: `op="reverse"`: "rev(3141)=" -> "1413"; `op="sort"`:
    "sort(3141)=" -> "1134" (ascending). Well formed: digits then EOS."""

    op: str = "reverse"
    min_len: int = 2
    max_len: int = 6
    format_reward: float = 0.0

    def __post_init__(self):
        if self.op not in ("reverse", "sort"):
            raise ValueError(f"op={self.op!r} must be 'reverse' or 'sort'")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len={self.min_len} <= max_len={self.max_len}")

    @property
    def _name(self) -> str:
        return "rev" if self.op == "reverse" else "sort"

    @property
    def prompt_width(self) -> int:
        return len(self._name) + 3 + self.max_len

    @property
    def min_new_tokens(self) -> int:
        return self.max_len + 1

    def sample_prompts(self, key: jax.Array, batch: int):
        kn, kd = jax.random.split(key)
        n = jax.random.randint(kn, (batch,), self.min_len, self.max_len + 1)
        d = jax.random.randint(kd, (batch, self.max_len), 0, 10)
        j = jnp.arange(self.max_len)[None, :]
        valid = j < n[:, None]
        if self.op == "reverse":
            out = jnp.take_along_axis(d, jnp.clip(n[:, None] - 1 - j, 0), axis=1)
        else:
            out = jnp.sort(jnp.where(valid, d, 10), axis=1)
        target = jnp.where(valid, _ZERO + out, PAD).astype(jnp.int32)
        digits = (jnp.where(valid, _ZERO + d, PAD).astype(jnp.int32), n)
        prompt, lens = _concat([self._name + "(", digits, ")="], batch)
        return prompt, lens, {"target": target, "target_len": n.astype(jnp.int32)}

    def reward(self, completion: jax.Array, completion_mask: jax.Array, answer: Answer):
        correct = _exact_match(completion, completion_mask, answer["target"], answer["target_len"])
        return _score(correct, _digits_then_eos(completion, completion_mask), self.format_reward)


@dataclasses.dataclass(frozen=True)
class Countdown(ByteTask):
    """Countdown-style arithmetic: "3,7,5->26:" asks for an expression that uses each given
    number exactly once and evaluates to the target, e.g. "3*7+5".

    Restricted grammar (so that the reward parses in JAX with a `lax.scan` over tokens):
    `NUM (OP NUM){n_numbers - 1} EOS`, NUM a decimal without leading zeros or sign, OP one
    of `ops`, no spaces or parentheses, evaluated strictly left to right (no precedence:
    "3+7*5" is (3+7)*5 = 50). Numbers are drawn uniformly from 1..max_number (>= 2); the target is
    a random permutation of them joined by random ops, evaluated the same way, so every
    prompt has a solution. Targets can be negative ("-" prefix in the prompt). Well formed:
    parses with the right count of numbers (whatever their values).
    """

    n_numbers: int = 3
    max_number: int = 10
    ops: str = "+-*"
    format_reward: float = 0.0

    def __post_init__(self):
        if self.n_numbers < 2:
            raise ValueError(f"n_numbers={self.n_numbers} must be >= 2")
        if self.max_number < 2:
            raise ValueError(f"max_number={self.max_number} must be >= 2")
        if not self.ops or any(o not in _OPS for o in self.ops):
            raise ValueError(f"ops={self.ops!r} must be a non-empty subset of '+-*'")
        if self.max_number**self.n_numbers >= 2**31:
            raise ValueError("max_number ** n_numbers must fit in int32")

    @property
    def _num_width(self) -> int:
        return _n_digits(self.max_number)

    @property
    def _target_width(self) -> int:
        return _n_digits(self.max_number**self.n_numbers)

    @property
    def prompt_width(self) -> int:
        # numbers, n-1 commas, "->", an optional "-", the target, ":"
        return self.n_numbers * (self._num_width + 1) + 3 + self._target_width

    @property
    def min_new_tokens(self) -> int:
        return self.n_numbers * (self._num_width + 1)

    def sample_prompts(self, key: jax.Array, batch: int):
        kn, kp, ko = jax.random.split(key, 3)
        n = self.n_numbers
        nums = jax.random.randint(kn, (batch, n), 1, self.max_number + 1)
        perm = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(kp, batch))
        order = jnp.take_along_axis(nums, perm, axis=1)
        codes = jnp.asarray([_OPS[o] for o in self.ops], jnp.int32)
        ops = codes[jax.random.randint(ko, (batch, n - 1), 0, len(self.ops))]
        acc = order[:, 0]
        for i in range(1, n):
            acc = _apply(ops[:, i - 1], acc, order[:, i])
        pieces: list[Any] = []
        for i in range(n):
            pieces += [_digits(nums[:, i], self._num_width), "," if i < n - 1 else "->"]
        pieces += _signed(acc, self._target_width) + [":"]
        prompt, lens = _concat(pieces, batch)
        return prompt, lens, {"numbers": nums.astype(jnp.int32), "target": acc.astype(jnp.int32)}

    def parse(self, completion: jax.Array, completion_mask: jax.Array):
        """Parses the completions: `(value [B], numbers [B, n_numbers] (in order of use,
        -1 when missing), well_formed [B])`."""
        b, _ = completion.shape
        n, width = self.n_numbers, self._num_width
        allowed = jnp.asarray([ord(o) for o in self.ops], jnp.int32)
        rows = jnp.arange(b)
        init = dict(
            cur=jnp.zeros(b, jnp.int32), nd=jnp.zeros(b, jnp.int32), acc=jnp.zeros(b, jnp.int32),
            op=jnp.zeros(b, jnp.int32), count=jnp.zeros(b, jnp.int32),
            used=jnp.full((b, n), -1, jnp.int32), valid=jnp.ones(b, bool), ended=jnp.zeros(b, bool),
        )

        def step(s, inp):
            tok, m = inp
            active = s["valid"] & ~s["ended"]
            is_digit = (tok >= _ZERO) & (tok <= _NINE)
            is_op = jnp.any(tok[:, None] == allowed[None, :], axis=1)
            is_eos = tok == EOS
            finish = is_op | is_eos
            bad = (
                ~m.astype(bool)
                | ~(is_digit | finish)
                | (is_digit & (s["nd"] == 0) & (tok == _ZERO))
                | (is_digit & (s["nd"] >= width))
                | (finish & (s["nd"] == 0))
                | (finish & (s["count"] >= n))
            )
            acc = jnp.where(s["count"] == 0, s["cur"], _apply(s["op"], s["acc"], s["cur"]))
            op_code = jnp.where(tok == ord("+"), 1, jnp.where(tok == ord("-"), 2, 3))
            new = dict(
                cur=jnp.where(is_digit, s["cur"] * 10 + (tok - _ZERO), 0),
                nd=jnp.where(is_digit, s["nd"] + 1, 0),
                acc=jnp.where(finish, acc, s["acc"]),
                op=jnp.where(is_op, op_code, s["op"]),
                count=s["count"] + finish.astype(jnp.int32),
                used=s["used"].at[rows, jnp.where(finish, s["count"], n)].set(s["cur"], mode="drop"),
                valid=~bad,
                ended=is_eos,
            )
            upd = active & ~bad
            out = {k: _where_rows(upd, v, s[k]) for k, v in new.items()}
            out["valid"] = s["valid"] & ~(active & bad)
            out["ended"] = s["ended"] | (upd & is_eos)
            return out, None

        s, _ = jax.lax.scan(step, init, (completion.T.astype(jnp.int32), completion_mask.T))
        well_formed = s["valid"] & s["ended"] & (s["count"] == n)
        return s["acc"], s["used"], well_formed

    def reward(self, completion: jax.Array, completion_mask: jax.Array, answer: Answer):
        value, used, well_formed = self.parse(completion, completion_mask)
        same_numbers = jnp.all(jnp.sort(used, axis=1) == jnp.sort(answer["numbers"], axis=1), axis=1)
        correct = well_formed & same_numbers & (value == answer["target"])
        return _score(correct, well_formed, self.format_reward)


def _apply(op, a, b):
    return jnp.where(op == 1, a + b, jnp.where(op == 2, a - b, a * b))


def _where_rows(cond, a, b):
    return jnp.where(cond.reshape(cond.shape + (1,) * (a.ndim - 1)), a, b)


TASKS: dict[str, Callable[..., Any]] = {
    "addition": Addition,
    "reverse": lambda **kw: DigitTask(op="reverse", **kw),
    "sort": lambda **kw: DigitTask(op="sort", **kw),
    "countdown": Countdown,
}


def make_task(name: str, **kwargs):
    """The task called `name` (a key of `TASKS`) with its fields; ValueError otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (available: {', '.join(TASKS)})")
    return TASKS[name](**kwargs)


# ---------------------------------------------------------------------- text-level hook
def decode(tokens: Any, length: int | None = None, mask: Any = None, *,
           tokenizer: Any = None, stop_ids: Sequence[int] = (EOS,)) -> str:
    """Text of one row of tokens: the first `length` tokens (or those where `mask`), up to
    the first of `stop_ids`, decoded by `tokenizer` (a `train.tokenizers` tokenizer; None:
    the byte tokenizer, UTF-8 with invalid bytes replaced)."""
    toks = np.asarray(tokens)
    if length is not None:
        toks = toks[: int(length)]
    if mask is not None:
        toks = toks[np.asarray(mask)[: len(toks)].astype(bool)]
    stops = {int(i) for i in stop_ids}
    out = []
    for t in toks.tolist():
        if t in stops:
            break
        out.append(t)
    if tokenizer is not None:
        return tokenizer.decode(out)
    return bytes(t for t in out if 0 <= t < 256).decode("utf-8", errors="replace")


def python_reward(fn: Callable[..., float],
                  decode: Callable[..., str] = decode) -> Callable[..., jax.Array]:
    """Wraps a text-level Python reward as a function usable inside `jit`.

    `fn(prompt: str, completion: str, *extra) -> float` is called once per row on the
    decoded prompt (its first `prompt_lens` tokens) and completion (the unmasked tokens up
    to the first stop token); `extra` are the rows of any further arrays passed (numpy).
    `decode(tokens, length=None, mask=None) -> str` turns a row into text: by default the
    byte tokenizer's (`decode` above); `functools.partial(decode, tokenizer=...,
    stop_ids=...)` for another tokenizer. Returns `reward(prompt_tokens [B, P],
    prompt_lens [B], completion [B, C], completion_mask [B, C], *extra) -> [B] float32`.

    This LEAVES THE COMPILED GRAPH: it is a `jax.pure_callback`, so at run time the arrays
    are copied to the host, `fn` runs in Python (holding the GIL, one row at a time), and
    the rewards are copied back; under a multi-device mesh the inputs are gathered to the
    host first. It must be a pure function of its inputs (XLA may skip, repeat or reorder
    the call), it has no gradient, and it is not `vmap`-able. Prefer the in-graph tasks.
    """

    def host(prompts, prompt_lens, completion, mask, *extra):
        prompts, completion, mask = np.asarray(prompts), np.asarray(completion), np.asarray(mask)
        out = np.zeros(prompts.shape[0], np.float32)
        for i in range(prompts.shape[0]):
            rows = [np.asarray(e)[i] for e in extra]
            out[i] = fn(decode(prompts[i], prompt_lens[i]), decode(completion[i], mask=mask[i]),
                        *rows)
        return out

    def reward(prompt_tokens, prompt_lens, completion, completion_mask, *extra):
        shape = jax.ShapeDtypeStruct((prompt_tokens.shape[0],), jnp.float32)
        return jax.pure_callback(host, shape, prompt_tokens, prompt_lens, completion,
                                 completion_mask, *extra)

    return reward

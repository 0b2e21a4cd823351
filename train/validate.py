"""`validate(config)`: the type and range of every numeric / boolean field of a run's config,
checked before a job builds or writes anything.

The jobs call it first thing in `run` (`train.loop.run`, `rl.loop.run`). A bad value is a
`UserError` naming the key, its value and what is allowed, e.g.
`config.checkpoint.keep=0 must be >= 1` (several bad values: one line, joined by "; ").

What is checked: `seed`, `train.*`, `checkpoint.*`, the numeric fields of `data`, `optim.*`
(with `muon`, `wsd`, `mup`, `qk_clip`), every `mesh` axis size and, when the config has one,
the `rl` section (and likewise the `preference` section). Each field on its own: rules that
relate fields or need the model, the task, the data or the devices (batch divisible by the
mesh and `grad_accum`, `total_steps` > `warmup_steps`, `n_prompts` divisible by
`minibatches`, lengths against `max_seq_len`, ...) stay where those are known (`train.loop`,
`train.data`, `optim.build`, `rl.step.RLOptions`,
`rl.loop`). Names (`optim.name`, `data.source`, `rl.loss`, ...) are checked by the code that
looks them up, `model` by `ModelConfig`, `distributed` by `train.distributed`, a task's
fields by its dataclass. A key missing from the config is skipped (the job reports it).

`None` is valid only where the default is a placeholder meaning "derived" (e.g.
`optim.total_steps`, `optim.muon.lr`, `data.vocab_size`, `rl.max_new_tokens`) or "auto"
(`rl.dynamic_sampling`, `rl.adv_std`), and for `checkpoint.keep` (keep every checkpoint).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

from ml_collections import ConfigDict

from train.errors import UserError

__all__ = ["validate"]

_MISSING = object()
SEED_MAX = 2**32 - 1  # PRNGKey(2**32) == PRNGKey(0) without x64; Grain shuffles seed % 2**32


@dataclasses.dataclass(frozen=True)
class _Num:
    """An int (`integer=True`) or a finite real in [lo, hi] (bounds open with `*_open`),
    or one of the special values `alt` ({value: meaning}); None only when `none` (its
    meaning) is set."""

    integer: bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    none: str = ""
    alt: tuple[tuple[int, str], ...] = ()

    def _range(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return ""

    def _allowed(self, typed: bool) -> str:
        rng = self._range()
        if typed:
            rng = ("an int" if self.integer else "a finite number") + (f" {rng}" if rng else "")
        parts = [f"{v} ({meaning})" for v, meaning in self.alt] + [rng]
        if typed and self.none:
            parts.insert(0, f"None ({self.none})")
        return " or ".join(parts)

    def error(self, value: Any) -> str | None:
        if value is None:
            return None if self.none else self._allowed(typed=True)
        if isinstance(value, bool) or not isinstance(
            value, numbers.Integral if self.integer else numbers.Real
        ):
            return self._allowed(typed=True)
        if not self.integer and not math.isfinite(float(value)):
            return self._allowed(typed=True)
        if any(value == v for v, _ in self.alt):
            return None
        too_low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        too_high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        return self._allowed(typed=False) if too_low or too_high else None


@dataclasses.dataclass(frozen=True)
class _Bool:
    none: str = ""  # set: None is valid and means this

    def error(self, value: Any) -> str | None:
        if isinstance(value, bool) or (value is None and self.none):
            return None
        return f"None ({self.none}), True or False" if self.none else "True or False"


def _int(lo: int | None = None, hi: int | None = None, **kw: Any) -> _Num:
    return _Num(True, lo, hi, **kw)


def _real(lo: float | None = None, hi: float | None = None, **kw: Any) -> _Num:
    return _Num(False, lo, hi, **kw)


POSITIVE = _real(0, lo_open=True)  # > 0
NON_NEGATIVE = _real(0)  # >= 0
FRACTION = _real(0, 1)  # in [0, 1]
MOMENTUM = _real(0, 1, hi_open=True)  # in [0, 1)
SEED = _int(0, SEED_MAX)

# config key (under `config.`) -> rule. Sections: see configs/base.py, optim/build.py
# (`default_config`), configs/rl_base.py.
RULES: dict[str, _Num | _Bool] = {
    "seed": SEED,
    # train
    "train.steps": _int(1),
    "train.log_every": _int(1),
    "train.eval_every": _int(0),  # 0: never
    "train.eval_batches": _int(1),
    "train.progress": _Bool(),
    "train.grad_accum": _int(1),
    "train.z_loss": NON_NEGATIVE,
    "train.max_bad_steps": _int(0),  # 0: never abort
    "train.noise_scale_every": _int(0),  # 0: off
    # checkpoint
    "checkpoint.every": _int(1),
    "checkpoint.keep": _int(1, none="keep all"),
    "checkpoint.async_save": _Bool(),
    "checkpoint.restore_step": _int(0, none="the latest"),
    # data
    "data.seq_len": _int(1),
    "data.batch_size": _int(1),
    "data.eval_permille": _int(0, 1000),
    "data.max_files": _int(0),  # 0: all files
    "data.vocab_size": _int(1, none="derived from the tokenizer or the tokens"),
    "data.eos_id": _int(0, none="the tokenizer's EOS, else none"),
    # optim
    "optim.lr": NON_NEGATIVE,  # 0: a frozen model (evaluation, a no-op baseline)
    "optim.warmup_steps": _int(0),
    "optim.total_steps": _int(0, none="derived from train.steps"),  # 0: derived too
    "optim.min_lr_frac": FRACTION,
    "optim.b1": MOMENTUM,
    "optim.b2": MOMENTUM,
    "optim.eps": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.clip_norm": NON_NEGATIVE,  # 0: off
    "optim.muon.beta": MOMENTUM,
    "optim.muon.nesterov": _Bool(),
    "optim.muon.ns_steps": _int(1),
    "optim.muon.lr": _real(0, none="optim.lr"),
    "optim.muon.weight_decay": _real(0, none="optim.weight_decay"),
    "optim.wsd.decay_frac": FRACTION,
    "optim.mup.enabled": _Bool(),
    "optim.mup.width_multiplier": POSITIVE,
    "optim.qk_clip.enabled": _Bool(),
    "optim.qk_clip.tau": POSITIVE,
}

# config.rl (configs/rl_base.py), checked when the config has an `rl` section.
RL_RULES: dict[str, _Num | _Bool] = {
    "rl.n_prompts": _int(1),
    "rl.group_size": _int(2),  # group advantages need two completions
    "rl.max_new_tokens": _int(1, none="the task's min_new_tokens"),
    "rl.temperature": POSITIVE,
    "rl.top_k": _int(0),  # 0: off
    "rl.top_p": _real(0, 1, lo_open=True),
    "rl.updates_per_batch": _int(1),
    "rl.minibatches": _int(1),
    "rl.eps_lo": _real(0, none="the loss's default"),
    "rl.eps_hi": _real(0, none="the loss's default"),
    "rl.beta": NON_NEGATIVE,
    "rl.tis": _Bool(),
    "rl.tis_cap": POSITIVE,
    "rl.dynamic_sampling": _Bool(none="auto: on for dapo"),
    "rl.overlong_cache_len": _int(0, none="auto: max(N // 4, 1) for dapo, else 0"),
    "rl.adv_std": _Bool(none="auto: off for dr_grpo"),
    "rl.dr_grpo_constant": _Bool(),
    "rl.holdout_modulus": _int(2, alt=((0, "no split"),)),
    "rl.eval_every": _int(0),  # 0: never
    "rl.eval_prompts": _int(1),
    "rl.eval_seed": SEED,
    "rl.warmup_steps": _int(0),
    "rl.warmup_batch_size": _int(1),
    "rl.warmup_lr": POSITIVE,
    "rl.warmup_target_accuracy": FRACTION,  # 0: no early stop
    "rl.prompt_pool": _int(0),  # 0: no fixed pool (sample the task afresh)
    "rl.throughput_every": _int(0),  # 0: never time the phases
    "rl.curriculum.enabled": _Bool(),
    "rl.curriculum.candidates": _int(1),
    "rl.curriculum.target": FRACTION,
    "rl.curriculum.ema": _real(0, 1, lo_open=True),
    "rl.curriculum.prior": _real(0, 1, none="the mean estimate over the prompts seen"),
}

# config.preference (configs/preference.py), checked when the config has that section;
# None: the loss's own default (hyperparameters) or auto (precompute_ref).
PREFERENCE_RULES: dict[str, _Num | _Bool] = {
    "preference.beta": _real(0, lo_open=True, none="the loss's default"),
    "preference.label_smoothing": _real(0, 0.5, hi_open=True, none="the loss's default"),
    "preference.nll_weight": _real(0, none="the loss's default"),
    "preference.gamma": _real(0, none="the loss's default"),
    "preference.lam": _real(0, none="the loss's default"),
    "preference.lambda_d": _real(0, none="the loss's default"),
    "preference.lambda_u": _real(0, none="the loss's default"),
    "preference.precompute_ref": _Bool(none="auto: on for dpo/ipo"),
    "preference.chunk_tokens": _int(0),  # 0: whole logits
}

MESH_AXIS = _int(1, alt=((-1, "the remaining devices"),))


def _lookup(config: Any, key: str) -> Any:
    node = config
    for part in key.split("."):
        if not hasattr(node, "get"):
            return _MISSING
        node = node.get(part, _MISSING)
        if node is _MISSING:
            return _MISSING
    return node


def _profile_steps_error(value: Any) -> str | None:
    if value is None:
        return None
    ok = isinstance(value, (tuple, list)) and (
        len(value) == 0
        or (len(value) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)
            and 0 <= value[0] < value[1])
    )
    return None if ok else "() (off) or (start, stop) with 0 <= start < stop"


def validate(config: ConfigDict) -> None:
    """Checks the type and range of every numeric (and boolean) field of `config`'s
    sections (see the module docstring); returns None, or raises `UserError` listing each
    bad key as `config.KEY=VALUE must be ALLOWED`."""
    rules = dict(RULES)
    if _lookup(config, "rl") is not _MISSING:
        rules.update(RL_RULES)
    if _lookup(config, "preference") is not _MISSING:
        rules.update(PREFERENCE_RULES)
    mesh = _lookup(config, "mesh")
    if mesh is not _MISSING and hasattr(mesh, "keys"):
        rules.update({f"mesh.{axis}": MESH_AXIS for axis in mesh.keys()})

    errors = []
    for key, rule in rules.items():
        value = _lookup(config, key)
        if value is _MISSING:
            continue
        allowed = rule.error(value)
        if allowed is not None:
            errors.append(f"config.{key}={value!r} must be {allowed}")
    profile = _lookup(config, "train.profile_steps")
    if profile is not _MISSING and (allowed := _profile_steps_error(profile)) is not None:
        errors.append(f"config.train.profile_steps={profile!r} must be {allowed}")
    if errors:
        raise UserError("; ".join(errors))

"""Prompt curriculum: which training prompts an RL step samples.

A policy-gradient step learns nothing from a prompt whose G completions all get the same
reward (the group advantages are all 0): prompts the policy always solves or never solves
waste their rollouts. Prompt Curriculum Learning (Gao et al. 2025, "Prompt Curriculum
Learning for Efficient LLM Post-Training") samples a larger candidate batch and keeps the
prompts whose predicted pass rate p(x) is closest to 0.5, where the gradient signal
(~ p (1 - p)) is largest. PCL predicts p(x) with a value model trained alongside the
policy; here the prediction is a running estimate per prompt of a finite pool, updated from
each step's own rollouts (no extra model, no extra forward):

    p(x) <- acc(x)                          the first time x is sampled
    p(x) <- p(x) + ema * (acc(x) - p(x))    afterwards

where acc(x) is the fraction of x's G completions with task reward >= 1. Never-sampled
prompts are predicted at `prior` (None: the mean estimate over the prompts seen so far, 0.5
before any). Each step draws `candidates x n_prompts` distinct prompts uniformly from the
pool and keeps the `n_prompts` with the smallest |p(x) - target| (ties broken at random).

The estimates live in the RL state (`RLState.curriculum`, one float32 and one int32 per
prompt of the pool, and the pool's fingerprint), so they are checkpointed and a resumed run
continues bit for bit; a run resumed with other prompts in its pool is refused.

Pools: a dataset task (`rl.dataset.DatasetTask`) is one; a synthetic task of `rl.tasks` is
turned into one by `PromptPool.from_task` (a fixed set of distinct training-split prompts).
Both expose `pool_size` and `prompts_at(idx [B]) -> (prompt_tokens, prompt_lens, answer)`.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CurriculumOptions",
    "PromptPool",
    "init_curriculum",
    "pool_fingerprint",
    "select_prompts",
    "update_curriculum",
]


@dataclasses.dataclass(frozen=True)
class CurriculumOptions:
    """Static options of the prompt curriculum (`config.rl.curriculum`)."""

    candidates: int = 4  # candidate prompts drawn per kept prompt
    target: float = 0.5  # the pass rate sought (PCL: 0.5, the largest p (1 - p))
    ema: float = 0.5  # weight of the newest accuracy in the running estimate
    prior: float | None = None  # predicted pass rate of unseen prompts (None: the seen mean)

    def __post_init__(self):
        errors = []
        if self.candidates < 1:
            errors.append(f"candidates={self.candidates} must be >= 1")
        if not 0.0 <= self.target <= 1.0:
            errors.append(f"target={self.target} must be in [0, 1]")
        if not 0.0 < self.ema <= 1.0:
            errors.append(f"ema={self.ema} must be in (0, 1]")
        if self.prior is not None and not 0.0 <= self.prior <= 1.0:
            errors.append(f"prior={self.prior} must be None or in [0, 1]")
        if errors:
            raise ValueError("; ".join(errors))


def pool_fingerprint(prompts: np.ndarray) -> int:
    """A 31-bit checksum (CRC-32) of a pool's prompt tokens `[pool, P]`: a resumed
    curriculum checks that its estimates belong to the same prompts in the same order."""
    return zlib.crc32(np.ascontiguousarray(prompts, np.int32).tobytes()) & 0x7FFFFFFF


def init_curriculum(pool_size: int, fingerprint: int = 0) -> dict[str, jax.Array]:
    """The state of a fresh curriculum over `pool_size` prompts: `pass_rate [pool]`
    float32 (0 where unseen), `count [pool]` int32 (times sampled) and `pool`, the pool's
    `pool_fingerprint` (int32 scalar)."""
    return {"pass_rate": jnp.zeros((pool_size,), jnp.float32),
            "count": jnp.zeros((pool_size,), jnp.int32),
            "pool": jnp.asarray(fingerprint, jnp.int32)}


def predicted_pass_rate(state: dict[str, jax.Array], prior: float | None) -> jax.Array:
    """`[pool]` p(x): the running estimate where seen, else `prior` (None: the mean
    estimate over the seen prompts, 0.5 when none)."""
    seen = state["count"] > 0
    if prior is None:
        n_seen = jnp.sum(seen)
        mean = jnp.sum(jnp.where(seen, state["pass_rate"], 0.0)) / jnp.maximum(n_seen, 1)
        prior_value = jnp.where(n_seen > 0, mean, 0.5)
    else:
        prior_value = jnp.float32(prior)
    return jnp.where(seen, state["pass_rate"], prior_value)


def select_prompts(
    state: dict[str, jax.Array], key: jax.Array, n: int, opts: CurriculumOptions
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`n` distinct pool indices `[n]` int32: of `candidates x n` distinct prompts drawn
    uniformly (all of them when the pool is smaller), the `n` whose predicted pass rate is
    closest to `opts.target`. Returns `(idx, metrics)`."""
    pool = state["count"].shape[0]
    if n > pool:
        raise ValueError(f"the pool holds {pool} prompts, fewer than the {n} a step samples")
    m = min(opts.candidates * n, pool)
    k_draw, k_tie = jax.random.split(key)
    cand = jax.random.choice(k_draw, pool, (m,), replace=False).astype(jnp.int32)
    p = predicted_pass_rate(state, opts.prior)
    dist = jnp.abs(p[cand] - opts.target)
    # Random tie-breaking far below any real difference of estimates (multiples of 1/G).
    score = -dist + 1e-6 * jax.random.uniform(k_tie, (m,))
    _, pick = jax.lax.top_k(score, n)
    idx = cand[pick]
    seen = state["count"] > 0
    metrics = {
        "curriculum/chosen_pass_rate": jnp.mean(p[idx]),
        "curriculum/candidate_pass_rate": jnp.mean(p[cand]),
        "curriculum/seen_frac": jnp.mean(seen.astype(jnp.float32)),
    }
    return idx, metrics


def update_curriculum(
    state: dict[str, jax.Array], idx: jax.Array, accuracy: jax.Array, opts: CurriculumOptions
) -> dict[str, jax.Array]:
    """The estimates after a step that sampled the distinct prompts `idx [n]` and measured
    their accuracies `accuracy [n]` (fraction of the group with reward >= 1)."""
    old = state["pass_rate"][idx]
    first = state["count"][idx] == 0
    new = jnp.where(first, accuracy, old + opts.ema * (accuracy - old)).astype(jnp.float32)
    return {**state, "pass_rate": state["pass_rate"].at[idx].set(new),
            "count": state["count"].at[idx].add(1)}


# ----------------------------------------------------------------------- prompt pools
@dataclasses.dataclass(frozen=True, eq=False)
class PromptPool:
    """A fixed, finite set of training prompts of a synthetic task (`rl.tasks`), with the
    task's reward. Prompts are host (numpy) arrays, constants of the compiled step.

    `pool_size`, `prompts_at(idx)`: what the curriculum needs; `sample_prompts(key, batch)`
    draws uniformly from the pool (the baseline the curriculum is compared with)."""

    task: Any
    prompts: np.ndarray  # [pool, P] int32
    lens: np.ndarray  # [pool] int32
    answer: dict[str, np.ndarray]  # each [pool, ...]

    @classmethod
    def from_task(cls, task: Any, size: int, seed: int, modulus: int = 0) -> PromptPool:
        """`size` distinct prompts of `task`'s training split (outside the held-out hash
        bucket of `rl.step.prompt_bucket` when `modulus` > 0), drawn on the host from
        `seed`. ValueError when the task has fewer distinct training prompts."""
        from rl.step import distinct_prompts  # rl.step imports this module

        if size < 1:
            raise ValueError(f"pool size {size} must be >= 1")
        try:
            prompts, lens, answer = distinct_prompts(task, seed, size, modulus, held_out=False)
        except ValueError as e:
            raise ValueError(f"{e} for a pool of {size}; lower the pool size") from None
        return cls(task, prompts.astype(np.int32), lens.astype(np.int32), answer)

    @property
    def pool_size(self) -> int:
        return int(self.prompts.shape[0])

    @property
    def prompt_width(self) -> int:
        return int(self.task.prompt_width)

    @property
    def min_new_tokens(self) -> int:
        return int(self.task.min_new_tokens)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(self.task.stop_ids)

    @property
    def pad_id(self) -> int:
        return int(self.task.pad_id)

    def prompts_at(self, idx: jax.Array):
        """`(prompt_tokens [B, P], prompt_lens [B], answer)` of pool rows `idx [B]`."""
        return (jnp.asarray(self.prompts)[idx], jnp.asarray(self.lens)[idx],
                {k: jnp.asarray(v)[idx] for k, v in self.answer.items()})

    def sample_prompts(self, key: jax.Array, batch: int):
        """`batch` prompts drawn uniformly (with replacement) from the pool."""
        return self.prompts_at(jax.random.randint(key, (batch,), 0, self.pool_size))

    def reward(self, completion: jax.Array, completion_mask: jax.Array, answer):
        return self.task.reward(completion, completion_mask, answer)

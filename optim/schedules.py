r"""Learning-rate schedules (optax schedules: `step -> lr`) and checkpoint averaging.

All warmups are linear from 0 and follow optax's convention: `lr(0) = 0` and
`lr(warmup) = peak`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

DecayShape = Literal["linear", "sqrt", "cosine"]


def _check_steps(warmup: int, total: int | None, what: str) -> None:
    if warmup < 0:
        raise ValueError(f"{what}: warmup steps must be >= 0, got {warmup}")
    if total is not None and total <= warmup:
        raise ValueError(f"{what}: total steps ({total}) must exceed the warmup steps ({warmup})")


def warmup_cosine(
    peak: float, warmup: int, total: int, end_value_frac: float = 0.1
) -> optax.Schedule:
    r"""Linear warmup to `peak`, then cosine decay to `end_value_frac * peak` at `total`.

    .. math::
      \eta(t) = \eta_{pk} \frac{t}{T_w} \ (t < T_w), \qquad
      \eta(t) = \eta_{end} + (\eta_{pk} - \eta_{end})\,
        \tfrac12\left(1 + \cos\left(\pi \min\left(1, \tfrac{t - T_w}{T - T_w}\right)\right)\right),

    constant at :math:`\eta_{end}` after `total`: this is
    `optax.warmup_cosine_decay_schedule(0, peak, warmup, total, end_value)`.

    Args:
      peak: peak learning rate.
      warmup: warmup steps :math:`T_w`.
      total: total steps :math:`T` (including warmup).
      end_value_frac: final LR as a fraction of `peak`.

    Returns:
      An optax schedule.

    References:
      Loshchilov & Hutter, `SGDR: Stochastic Gradient Descent with Warm Restarts
      <https://arxiv.org/abs/1608.03983>`_, 2017
    """
    _check_steps(warmup, total, "warmup_cosine")
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, peak * end_value_frac)


def _one_minus_sqrt_decay(peak: float, end: float, steps: int) -> optax.Schedule:
    """`end + (peak - end) (1 - sqrt(min(1, t / steps)))` (optax has no such decay)."""

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        p = jnp.clip(jnp.asarray(step, jnp.float32) / steps, 0.0, 1.0)
        return end + (peak - end) * (1.0 - jnp.sqrt(p))

    return schedule


def warmup_stable_decay(
    peak: float,
    warmup: int,
    total: int,
    decay_frac: float = 0.2,
    decay: DecayShape = "linear",
    end_value_frac: float = 0.0,
) -> optax.Schedule:
    r"""Warmup-Stable-Decay: linear warmup, constant `peak`, then a decay in the last steps.

    With :math:`T_d = \mathrm{round}(\text{decay\_frac} \cdot T)` decay steps starting at
    :math:`T_s = T - T_d` and :math:`p = \min(1, (t - T_s)/T_d)`:

    .. math::
      \eta(t) = \eta_{end} + (\eta_{pk} - \eta_{end}) f(p), \quad
      f(p) = 1 - p \ (\text{linear}),\ 1 - \sqrt{p} \ (\text{sqrt}),\
      \tfrac12(1 + \cos \pi p) \ (\text{cosine}),

    preceded by :math:`\eta_{pk} t / T_w` for :math:`t < T_w` and :math:`\eta_{pk}` on
    :math:`[T_w, T_s)`: an `optax.join_schedules` of `optax.linear_schedule` (warmup),
    `optax.constant_schedule` and the decay (`optax.linear_schedule`,
    `optax.cosine_decay_schedule`, or 1 - sqrt, which optax lacks).

    Args:
      peak: peak learning rate.
      warmup: warmup steps.
      total: total steps (including warmup and decay).
      decay_frac: fraction of `total` spent decaying.
      decay: `'linear'`, `'sqrt'` (1 - sqrt) or `'cosine'`.
      end_value_frac: final LR as a fraction of `peak`.

    Returns:
      An optax schedule.

    References:
      Hu et al., `MiniCPM <https://arxiv.org/abs/2404.06395>`_, 2024;
      Hägele et al., `Scaling Laws and Compute-Optimal Training Beyond Fixed Training
      Durations <https://arxiv.org/abs/2405.18392>`_, 2024 (1-sqrt decay)
    """
    _check_steps(warmup, total, "warmup_stable_decay")
    if not 0.0 <= decay_frac <= 1.0:
        raise ValueError(f"warmup_stable_decay: decay_frac must be in [0, 1], got {decay_frac}")
    if decay not in ("linear", "sqrt", "cosine"):
        raise ValueError(
            f"warmup_stable_decay: decay must be 'linear', 'sqrt' or 'cosine', got {decay!r}"
        )
    decay_steps = int(round(decay_frac * total))
    decay_start = total - decay_steps
    if decay_start < warmup:
        raise ValueError(
            f"warmup_stable_decay: decay ({decay_steps} steps from {decay_start}) overlaps the "
            f"warmup ({warmup} steps)"
        )
    end = peak * end_value_frac
    steps = max(decay_steps, 1)  # decay_frac=0: the LR drops to `end` after `total`
    if decay == "linear":
        tail = optax.linear_schedule(peak, end, steps)
    elif decay == "cosine":
        tail = optax.cosine_decay_schedule(peak, steps, alpha=end_value_frac)
    else:
        tail = _one_minus_sqrt_decay(peak, end, steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak), tail],
        [warmup, decay_start],
    )


def constant(peak: float, warmup: int = 0) -> optax.Schedule:
    r"""Linear warmup to `peak` over `warmup` steps, then constant :math:`\eta_{pk}`.

    `optax.warmup_constant_schedule(0, peak, warmup)` (`optax.constant_schedule(peak)` when
    `warmup=0`, where optax's warmup would stay at 0).

    Args:
      peak: the learning rate.
      warmup: warmup steps (0: constant from step 0).

    Returns:
      An optax schedule.

    References:
      Goyal et al., `Accurate, Large Minibatch SGD <https://arxiv.org/abs/1706.02677>`_, 2017
    """
    _check_steps(warmup, None, "constant")
    if warmup == 0:
        return optax.constant_schedule(peak)
    return optax.warmup_constant_schedule(0.0, peak, warmup)


def average_checkpoints(trees: Sequence[Any]) -> Any:
    r"""Uniform average of parameter trees: :math:`\bar\theta = \frac1K \sum_{j=1}^K \theta_j`.

    WSM-style merging of the last K checkpoints of a constant-LR run, which emulates an LR
    decay. Floating-point leaves are accumulated in (at least) float32 and cast back to
    their dtype; other leaves (integer counters, keys) are taken from the last tree.

    Args:
      trees: non-empty sequence of pytrees with the same structure and shapes.

    Returns:
      The averaged pytree.

    References:
      Tian et al., `WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging for LLM
      Pre-training <https://arxiv.org/abs/2507.17634>`_, 2025
    """
    trees = list(trees)
    if not trees:
        raise ValueError("average_checkpoints needs at least one tree")
    k = len(trees)

    def avg(*leaves: Any) -> Any:
        last = leaves[-1]
        dtype = jnp.result_type(last)
        if not jnp.issubdtype(dtype, jnp.inexact):
            return last
        acc_dtype = jnp.promote_types(dtype, jnp.float32)
        acc = jnp.zeros(jnp.shape(last), acc_dtype)
        for leaf in leaves:
            acc = acc + jnp.asarray(leaf).astype(acc_dtype)
        return (acc / k).astype(dtype)

    return jax.tree.map(avg, *trees)

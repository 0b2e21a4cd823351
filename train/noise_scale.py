"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 from two batch sizes.

McCandlish et al. 2018, App. A.1: with G_B the mean gradient over B examples,
E|G_B|^2 = |G|^2 + tr(Sigma) / B (Sigma: the per-example gradient covariance, G the true
gradient). Measuring |G_B|^2 at a small and a big batch size gives unbiased estimates

    |G|^2    ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

and B_simple = tr(Sigma) / |G|^2. Each estimate is noisy and their ratio is biased, so the
paper averages the numerator and the denominator over many steps (an exponential moving
average) before dividing: :class:`NoiseScaleAverage`.

In training (`train.step.StepOptions.noise_scale`, turned on by the trainer's
`train.noise_scale_every > 0`, which needs `train.grad_accum >= 2`) the small batches are
the gradient-accumulation microbatches and the big batch is the step's whole batch: each
step logs `noise/g_small_sq` (the mean over microbatches of the squared norm of each
microbatch's own token-mean gradient), `noise/g_big_sq` (the squared norm of the step's
gradient), and `noise/b_small`, `noise/b_big` (counted tokens per microbatch, mean, and
per step). Batch sizes are counted in *tokens* (those the loss counts, i.e. the mask),
because the loss is a token mean: B_simple then comes out in tokens. Counting sequences
instead only changes the unit (B_simple in sequences = B_simple in tokens / tokens per
sequence, when every sequence counts as many tokens); |G|^2 does not depend on the unit.
Tokens of one sequence are correlated, so the "per-token covariance" is an effective one;
the estimate of the critical batch size (the quantity of interest) is unaffected.

References:
  McCandlish, Kaplan, Amodei et al., `An Empirical Model of Large-Batch Training
  <https://arxiv.org/abs/1812.06162>`_, 2018, Appendix A.1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

METRIC_KEYS = ("noise/g_small_sq", "noise/g_big_sq", "noise/b_small", "noise/b_big")


def _estimates(small_sq_norm, big_sq_norm, b_small, b_big):
    small, big = np.asarray(small_sq_norm, np.float64), np.asarray(big_sq_norm, np.float64)
    bs, bb = np.asarray(b_small, np.float64), np.asarray(b_big, np.float64)
    if np.any(bs <= 0) or np.any(bb <= bs):
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    g_sq = (bb * big - bs * small) / (bb - bs)
    trace = (small - big) / (1.0 / bs - 1.0 / bb)
    return g_sq, trace


def simple_noise_scale(small_sq_norm, big_sq_norm, b_small, b_big):
    """`(B_simple, |G|^2 estimate, tr(Sigma) estimate)` from the squared norms of the mean
    gradients over `b_small` and `b_big` examples (McCandlish et al. 2018, App. A.1).

    Args:
      small_sq_norm: |G_{B_small}|^2 (a mean over several small batches is fine: the
        estimates are linear in it). big_sq_norm: |G_{B_big}|^2.
      b_small, b_big: the batch sizes, 0 < b_small < b_big (any unit: B_simple comes out
        in it). Arrays broadcast (one estimate per step).
    Returns:
      float64 arrays (scalars for scalar inputs). From one step the two estimates are
      unbiased but noisy (|G|^2 can come out negative); average them over steps before
      dividing (:class:`NoiseScaleAverage`).
    """
    g_sq, trace = _estimates(small_sq_norm, big_sq_norm, b_small, b_big)
    with np.errstate(divide="ignore", invalid="ignore"):
        b_simple = trace / g_sq
    return b_simple, g_sq, trace


@dataclasses.dataclass
class NoiseScaleAverage:
    """The paper's estimator over a run: exponential moving averages of the unbiased
    |G|^2 and tr(Sigma) estimates of each step, divided only at the end.

    `decay=None` averages all steps equally (a running mean); `decay=0.99` weighs step t
    back by decay^t (bias-corrected, as Adam's moments, so early values are not pulled to
    0). `value()` is `(B_simple, |G|^2, tr(Sigma))` of the averages.
    """

    decay: float | None = None
    _g_sq: float = 0.0
    _trace: float = 0.0
    _weight: float = 0.0
    count: int = 0

    def update(self, small_sq_norm: float, big_sq_norm: float, b_small: float,
               b_big: float) -> NoiseScaleAverage:
        g_sq, trace = _estimates(small_sq_norm, big_sq_norm, b_small, b_big)
        d = 1.0 - 1.0 / (self.count + 1) if self.decay is None else float(self.decay)
        self._g_sq = d * self._g_sq + (1 - d) * float(g_sq)
        self._trace = d * self._trace + (1 - d) * float(trace)
        self._weight = d * self._weight + (1 - d)
        self.count += 1
        return self

    def value(self) -> tuple[float, float, float]:
        if self.count == 0:
            return math.nan, math.nan, math.nan
        g_sq, trace = self._g_sq / self._weight, self._trace / self._weight
        return (trace / g_sq if g_sq != 0 else math.nan), g_sq, trace


def from_metrics(rows: Iterable[Mapping[str, Any]],
                 decay: float | None = None) -> tuple[float, float, float]:
    """`(B_simple, |G|^2, tr(Sigma))` averaged (:class:`NoiseScaleAverage`) over the metric
    rows (`metrics.jsonl` of a run with `train.noise_scale_every`) that carry
    `METRIC_KEYS`; NaNs when none does."""
    avg = NoiseScaleAverage(decay)
    for r in rows:
        if all(k in r for k in METRIC_KEYS):
            vals = [float(r[k]) for k in METRIC_KEYS]
            if all(math.isfinite(v) for v in vals):
                avg.update(*vals)
    return avg.value()

"""Scaling-law fits and training-curve statistics for the sweeps of `train.sweep`.

IsoFLOP / compute-optimal analysis (Hoffmann et al. 2022, "approach 2"): at each fixed
compute budget C, the final loss of models of N parameters is fitted with a parabola in
log N; its vertex is (N_opt(C), L_opt(C)). Power laws N_opt = k * C^a and
L_opt = a * C^b (+ E, an optional irreducible loss) are then fitted by least squares in
log space. FLOPs come from `train.flops.flops_per_token` (the trainer's MFU basis).

Curve statistics: loss / grad-norm spikes (:func:`count_spikes`), the first step at which
a curve reaches a target (:func:`steps_to_reach`), MaxVio summaries.

References:
  Kaplan et al., `Scaling Laws for Neural Language Models
  <https://arxiv.org/abs/2001.08361>`_, 2020;
  Hoffmann et al., `Training Compute-Optimal Large Language Models
  <https://arxiv.org/abs/2203.15556>`_, 2022
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = coef * x**exponent + offset (offset = 0 unless fitted)."""

    coef: float
    exponent: float
    offset: float = 0.0

    def __call__(self, x):
        return self.coef * np.asarray(x, np.float64) ** self.exponent + self.offset


@dataclasses.dataclass(frozen=True)
class IsoFlopOptimum:
    """The vertex of loss = c2 * log(N)^2 + c1 * log(N) + c0 (natural log)."""

    n_opt: float
    loss_opt: float
    coeffs: tuple[float, float, float]  # (c2, c1, c0)
    interior: bool  # the vertex lies within the sampled range of N


def _log_arrays(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of the same length, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if np.any(x <= 0):
        raise ValueError("power-law fits need x > 0")
    return x, y


def fit_power_law(x: Sequence[float], y: Sequence[float], irreducible: bool = False) -> PowerLaw:
    """Least-squares fit of y = a * x^b (+ E) in log space.

    Without `irreducible`: linear regression of log y on log x. With it: E in [0, min y)
    is chosen to minimize the squared error of log y against log(E + a x^b), a and b being
    the linear fit of log(y - E) on log x for that E (a profile likelihood over E).

    Args:
      x: positive abscissae (compute C, parameters N, ...).
      y: positive values (loss, N_opt, ...). Non-finite pairs are dropped.
      irreducible: also fit the offset E.

    Returns:
      A :class:`PowerLaw`.
    """
    x, y = _log_arrays(x, y)
    need = 3 if irreducible else 2
    if x.size < need:
        raise ValueError(f"a power-law fit needs at least {need} finite points, got {x.size}")
    if np.any(y <= 0):
        raise ValueError("power-law fits need y > 0")
    lx, ly = np.log(x), np.log(y)

    def linear(offset: float) -> tuple[float, float, float]:
        b, log_a = np.polyfit(lx, np.log(y - offset), 1)
        pred = np.log(offset + np.exp(log_a) * x**b)
        return float(np.exp(log_a)), float(b), float(np.sum((ly - pred) ** 2))

    if not irreducible:
        a, b, _ = linear(0.0)
        return PowerLaw(a, b)
    from scipy.optimize import minimize_scalar

    hi = float(np.min(y)) * (1 - 1e-9)
    grid = np.linspace(0.0, hi, 200, endpoint=False)
    errs = [linear(e)[2] for e in grid]
    i = int(np.argmin(errs))
    lo_b, hi_b = grid[max(i - 1, 0)], grid[i + 1] if i + 1 < grid.size else hi
    res = minimize_scalar(lambda e: linear(e)[2], bounds=(lo_b, hi_b), method="bounded",
                          options={"xatol": 1e-12 * max(hi, 1.0)})
    e = float(res.x) if res.fun <= errs[i] else float(grid[i])
    a, b, _ = linear(e)
    return PowerLaw(a, b, e)


def isoflop_optimum(params: Sequence[float], losses: Sequence[float]) -> IsoFlopOptimum:
    """Fits loss = c2 log(N)^2 + c1 log(N) + c0 at one compute budget; returns the vertex.

    Raises ValueError with fewer than 3 finite points or a parabola that opens downwards
    (no minimum: sample N more widely around the optimum).
    """
    n, loss = _log_arrays(params, losses)
    if n.size < 3:
        raise ValueError(f"an IsoFLOP parabola needs at least 3 finite points, got {n.size}")
    ln = np.log(n)
    c2, c1, c0 = np.polyfit(ln, loss, 2)
    if c2 <= 0:
        raise ValueError("the IsoFLOP profile has no minimum (the parabola opens downwards)")
    x = -c1 / (2 * c2)
    return IsoFlopOptimum(
        n_opt=float(np.exp(x)),
        loss_opt=float(c0 - c1 * c1 / (4 * c2)),
        coeffs=(float(c2), float(c1), float(c0)),
        interior=bool(ln.min() <= x <= ln.max()),
    )


@dataclasses.dataclass(frozen=True)
class ComputeOptimal:
    """IsoFLOP optima per budget and the power laws through them."""

    budgets: tuple[float, ...]
    optima: tuple[IsoFlopOptimum, ...]
    n_opt: PowerLaw | None  # N_opt = k * C^a   (None with fewer than 2 budgets)
    loss: PowerLaw | None  # L_opt = a * C^b (+ E)


def compute_optimal(
    flops: Sequence[float], params: Sequence[float], losses: Sequence[float],
    irreducible: bool = False,
) -> ComputeOptimal:
    """IsoFLOP analysis of a sweep: rows (C, N, L) grouped by C (relative tolerance 1e-6),
    a parabola per budget (:func:`isoflop_optimum`), then :func:`fit_power_law` through
    the optima (the loss law with an irreducible term when `irreducible` and >= 3 budgets)."""
    c = np.asarray(flops, np.float64)
    n = np.asarray(params, np.float64)
    loss = np.asarray(losses, np.float64)
    budgets: list[float] = []
    for v in np.sort(c):
        if not budgets or abs(v - budgets[-1]) > 1e-6 * budgets[-1]:
            budgets.append(float(v))
    optima = []
    for b in budgets:
        sel = np.abs(c - b) <= 1e-6 * b
        optima.append(isoflop_optimum(n[sel], loss[sel]))
    n_law = loss_law = None
    if len(budgets) >= 2:
        n_law = fit_power_law(budgets, [o.n_opt for o in optima])
        loss_law = fit_power_law(budgets, [o.loss_opt for o in optima],
                                 irreducible=irreducible and len(budgets) >= 3)
    return ComputeOptimal(tuple(budgets), tuple(optima), n_law, loss_law)


# ---- curve statistics --------------------------------------------------------------------


def spike_mask(values: Sequence[float], window: int, ratio: float) -> np.ndarray:
    """Steps that spike: value > ratio * median of the previous `window` finite values
    (needs at least `window // 2` of them), or a non-finite value."""
    v = np.asarray(values, np.float64)
    out = np.zeros(v.shape, bool)
    hist: list[float] = []
    for i, x in enumerate(v):
        if not np.isfinite(x):
            out[i] = True
            continue
        prev = hist[-window:]
        if len(prev) >= max(window // 2, 1) and x > ratio * float(np.median(prev)):
            out[i] = True
        hist.append(float(x))
    return out


def count_spikes(values: Sequence[float], window: int = 20, ratio: float = 1.2) -> int:
    """Number of spikes in a curve: runs of consecutive :func:`spike_mask` steps count once.

    A spike is a jump above `ratio` times the median of the preceding `window` logged
    values (a local baseline: a loss curve that decreases, or a grad norm that drifts,
    does not count), or a non-finite value.
    """
    m = spike_mask(values, window, ratio)
    return int(np.sum(m[1:] & ~m[:-1]) + (1 if m.size and m[0] else 0))


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average over `window` points (shorter at the start)."""
    v = np.asarray(values, np.float64)
    if window <= 1 or v.size == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def steps_to_reach(steps: Sequence[float], values: Sequence[float], target: float) -> float:
    """The first step at which the curve is <= target, linearly interpolated between the
    logged steps around the crossing; NaN when it never gets there."""
    s = np.asarray(steps, np.float64)
    v = np.asarray(values, np.float64)
    hit = np.nonzero(v <= target)[0]
    if hit.size == 0:
        return math.nan
    i = int(hit[0])
    if i == 0 or not np.isfinite(v[i - 1]) or v[i - 1] == v[i]:
        return float(s[i])
    t = (v[i - 1] - target) / (v[i - 1] - v[i])
    return float(s[i - 1] + t * (s[i] - s[i - 1]))


# ---- compute multiplier of one optimizer over another -------------------------------------


@dataclasses.dataclass(frozen=True)
class ComputeMultiplier:
    """How many times less compute optimizer A needs than B to reach `at_loss`:
    `multiplier = C_B(L) / C_A(L)` (> 1: A is more compute-efficient), from the power laws
    `law_a`, `law_b` of loss against compute, with a bootstrap uncertainty."""

    multiplier: float
    std: float  # standard deviation of the bootstrap multipliers
    ci: tuple[float, float]  # the bootstrap's central `level` interval (percentiles)
    at_loss: float
    law_a: PowerLaw
    law_b: PowerLaw
    n_boot: int  # bootstrap fits used (resamples with too few distinct C are skipped)
    level: float = 0.95


def compute_at_loss(law: PowerLaw, loss: float) -> float:
    """The compute at which `law` (loss = coef * C^exponent + offset) reaches `loss`:
    C = ((loss - offset) / coef)^(1 / exponent); NaN when the law never gets there."""
    gap = float(loss) - law.offset
    if gap <= 0 or law.coef <= 0 or law.exponent == 0:
        return math.nan
    return float((gap / law.coef) ** (1.0 / law.exponent))


def compute_multiplier(
    compute_a: Sequence[float], loss_a: Sequence[float],
    compute_b: Sequence[float], loss_b: Sequence[float],
    at_loss: float | None = None, irreducible: bool = False,
    n_boot: int = 1000, level: float = 0.95, seed: int = 0,
) -> ComputeMultiplier:
    """The compute multiplier of optimizer A over B at a matched loss (Moonlight's method,
    Liu et al. 2025, Sec. 3: fit each optimizer's loss-vs-compute law, compare the compute
    each needs for the same loss).

    Each optimizer's points (training compute C, loss L; e.g. the compute-optimal runs of a
    sweep) are fitted with `fit_power_law`, L = a C^-b (+ E with `irreducible`, this
    module's convention), and the multiplier is C_B(L*) / C_A(L*) with `compute_at_loss`.
    With equal exponents (and offsets) it is the same at every loss; otherwise it depends on
    L*, by default the lowest loss that both optimizers' data reach,
    max(min L_A, min L_B), so that neither law is extrapolated.

    Uncertainty: a nonparametric bootstrap over points: each optimizer's points are
    resampled with replacement (independently, `n_boot` times), both laws refitted and the
    multiplier recomputed at the same L*; `std` is the standard deviation of those
    multipliers and `ci` their central `level` percentile interval. (Not the delta method:
    with few points the fit's covariance understates the spread, and the bootstrap needs
    no linearisation of the nonlinear L*-inversion.)

    Raises:
      ValueError: too few points for a fit, or a law that never reaches `at_loss`.

    References:
      Liu et al., `Muon is Scalable for LLM Training <https://arxiv.org/abs/2502.16982>`_,
      2025.
    """
    ca, la = _log_arrays(compute_a, loss_a)
    cb, lb = _log_arrays(compute_b, loss_b)
    law_a = fit_power_law(ca, la, irreducible)
    law_b = fit_power_law(cb, lb, irreducible)
    target = float(max(la.min(), lb.min())) if at_loss is None else float(at_loss)

    def ratio(fa: PowerLaw, fb: PowerLaw) -> float:
        return compute_at_loss(fb, target) / compute_at_loss(fa, target)

    m = ratio(law_a, law_b)
    if not math.isfinite(m):
        raise ValueError(f"a fitted law never reaches loss {target:g} (A: {law_a}, B: {law_b})")
    rng = np.random.default_rng(seed)
    need = 3 if irreducible else 2
    boots: list[float] = []
    for _ in range(int(n_boot)):
        ia, ib = rng.integers(0, ca.size, ca.size), rng.integers(0, cb.size, cb.size)
        if np.unique(ca[ia]).size < need or np.unique(cb[ib]).size < need:
            continue
        r = ratio(fit_power_law(ca[ia], la[ia], irreducible),
                  fit_power_law(cb[ib], lb[ib], irreducible))
        if math.isfinite(r):
            boots.append(r)
    std, ci = math.nan, (math.nan, math.nan)
    if len(boots) > 1:
        b, q = np.asarray(boots), 100 * (1 - level) / 2
        std, ci = float(b.std(ddof=1)), (float(np.percentile(b, q)),
                                         float(np.percentile(b, 100 - q)))
    return ComputeMultiplier(float(m), std, ci, target, law_a, law_b, len(boots), level)

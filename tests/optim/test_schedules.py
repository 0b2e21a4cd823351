"""Schedules against hand-computed values (numpy formulas); checkpoint averaging."""

import jax.numpy as jnp
import numpy as np
import pytest

import optim


def _at(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def _ref_warmup_cosine(peak, warmup, total, end_frac, t):
    """The formula of the docstring, in numpy float64 (independent of optax)."""
    t = np.asarray(t, np.float64)
    end = peak * end_frac
    progress = np.clip((t - warmup) / (total - warmup), 0.0, 1.0)
    decayed = end + (peak - end) * 0.5 * (1.0 + np.cos(np.pi * progress))
    return np.where(t < warmup, peak * t / max(warmup, 1), decayed)


def _ref_wsd(peak, warmup, total, decay_frac, decay, end_frac, t):
    t = np.asarray(t, np.float64)
    d = int(round(decay_frac * total))
    start, end = total - d, peak * end_frac
    p = np.clip((t - start) / max(d, 1), 0.0, 1.0)
    f = {"linear": 1 - p, "sqrt": 1 - np.sqrt(p), "cosine": 0.5 * (1 + np.cos(np.pi * p))}[decay]
    stable = np.where(t < start, peak, end + (peak - end) * f)
    return np.where(t < warmup, peak * t / max(warmup, 1), stable)


def test_warmup_cosine_hand_values():
    sched = optim.warmup_cosine(1.0, 10, 110, end_value_frac=0.1)
    np.testing.assert_allclose(
        _at(sched, [0, 5, 10, 60, 110, 500]), [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], atol=1e-6
    )
    steps = np.arange(0, 60)
    for warmup in (0, 7):
        np.testing.assert_allclose(_at(optim.warmup_cosine(3e-3, warmup, 50), steps),
                                   _ref_warmup_cosine(3e-3, warmup, 50, 0.1, steps),
                                   rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "decay,mid", [("linear", 0.5), ("sqrt", 1 - np.sqrt(0.5)), ("cosine", 0.5)]
)
def test_warmup_stable_decay_hand_values(decay, mid):
    sched = optim.warmup_stable_decay(2.0, 10, 100, decay_frac=0.2, decay=decay)
    np.testing.assert_allclose(
        _at(sched, [0, 5, 10, 50, 80, 90, 100, 120]),
        [0.0, 1.0, 2.0, 2.0, 2.0, 2.0 * mid, 0.0, 0.0],
        atol=1e-6,
    )
    quarter = {"linear": 0.75, "sqrt": 0.5, "cosine": 0.5 * (1 + np.cos(np.pi / 4))}[decay]
    assert float(sched(85)) == pytest.approx(2.0 * quarter, rel=1e-5)
    end = optim.warmup_stable_decay(2.0, 10, 100, decay=decay, end_value_frac=0.1)
    assert float(end(100)) == pytest.approx(0.2)
    steps = np.arange(0, 130)
    for warmup, total, frac in ((10, 100, 0.2), (0, 50, 0.3), (7, 40, 0.0), (5, 20, 0.75)):
        np.testing.assert_allclose(
            _at(optim.warmup_stable_decay(3e-3, warmup, total, frac, decay, 0.1), steps),
            _ref_wsd(3e-3, warmup, total, frac, decay, 0.1, steps), rtol=1e-5, atol=1e-9,
            err_msg=f"{warmup=} {total=} {frac=}")


def test_constant_and_errors():
    np.testing.assert_allclose(_at(optim.constant(2.0, 4), [0, 2, 4, 9]), [0.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(_at(optim.constant(2.0), [0, 9]), [2.0, 2.0])
    with pytest.raises(ValueError, match="total steps"):
        optim.warmup_cosine(1.0, 10, 10)
    with pytest.raises(ValueError, match="decay must be"):
        optim.warmup_stable_decay(1.0, 0, 10, decay="exp")
    with pytest.raises(ValueError, match="overlaps"):
        optim.warmup_stable_decay(1.0, 9, 10, decay_frac=0.5)


def test_average_checkpoints():
    trees = [
        {"w": jnp.array([1.0, 2.0], jnp.bfloat16), "f": jnp.array([0.1]), "step": jnp.array(s)}
        for s in range(3)
    ]
    trees[1]["w"] = jnp.array([3.0, 4.0], jnp.bfloat16)
    trees[2]["w"] = jnp.array([256.0, 0.5], jnp.bfloat16)
    trees[2]["f"] = jnp.array([0.4])
    avg = optim.average_checkpoints(trees)
    assert avg["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(avg["w"], np.float32), [260 / 3, 6.5 / 3], rtol=4e-3)
    np.testing.assert_allclose(avg["f"], [0.2], rtol=1e-6)
    assert int(avg["step"]) == 2
    # float32 accumulation: (256 + 1 + 1) / 3 = 86; a bfloat16 sum (spacing 2 at 256) would
    # drop both 1s and give 85.5.
    big = [{"w": jnp.array([v], jnp.bfloat16)} for v in (256.0, 1.0, 1.0)]
    assert float(optim.average_checkpoints(big)["w"][0]) == 86.0
    with pytest.raises(ValueError, match="at least one"):
        optim.average_checkpoints([])

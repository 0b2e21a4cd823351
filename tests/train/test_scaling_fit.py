"""`train.scaling.compute_multiplier` (Moonlight's compute multiplier at a matched loss):
exact on noise-free power laws, and within its bootstrap interval on noisy ones."""

from __future__ import annotations

import numpy as np
import pytest

from train.scaling import PowerLaw, compute_at_loss, compute_multiplier

C = np.geomspace(1e15, 1e18, 7)


def _law_b(c):
    return 20.0 * c ** -0.08  # optimizer B: loss = a C^-b


def test_noise_free_power_laws_give_the_exact_multiplier():
    # A reaches any loss with half of B's compute: L_A(C) = L_B(2 C).
    out = compute_multiplier(C, _law_b(2.0 * C), C, _law_b(C), n_boot=50)
    assert out.multiplier == pytest.approx(2.0, rel=1e-6)
    assert out.law_a.exponent == pytest.approx(-0.08, rel=1e-6)
    # The default matched loss is the lowest loss both reach: B's best here.
    assert out.at_loss == pytest.approx(_law_b(C).min())
    assert out.std < 1e-6 and out.ci[0] == pytest.approx(2.0, rel=1e-6)
    # Other losses, and B over A.
    assert compute_multiplier(C, _law_b(2.0 * C), C, _law_b(C), at_loss=1.7,
                              n_boot=0).multiplier == pytest.approx(2.0, rel=1e-6)
    assert compute_multiplier(C, _law_b(C), C, _law_b(2.0 * C),
                              n_boot=0).multiplier == pytest.approx(0.5, rel=1e-6)


def test_noise_free_with_an_irreducible_loss():
    law = PowerLaw(30.0, -0.15, 1.5)
    out = compute_multiplier(C, law(3.0 * C), C, law(C), irreducible=True, n_boot=0)
    assert out.law_b.offset == pytest.approx(1.5, rel=1e-3)
    assert out.multiplier == pytest.approx(3.0, rel=1e-3)
    assert compute_at_loss(law, 1.4) != compute_at_loss(law, 1.4)  # below E: NaN


def test_noisy_power_laws_recover_the_multiplier_within_the_bootstrap_interval():
    rng = np.random.default_rng(0)
    c = np.repeat(C, 2)
    noisy = lambda y: y * np.exp(0.004 * rng.standard_normal(y.shape))  # noqa: E731  (~0.4%)
    out = compute_multiplier(c, noisy(_law_b(2.0 * c)), c, noisy(_law_b(c)), n_boot=400)
    lo, hi = out.ci
    assert lo < 2.0 < hi, out
    assert abs(out.multiplier - 2.0) < 3 * out.std, out
    assert hi - lo < 1.0  # informative: the noise is small
    assert out.n_boot == 400


def test_too_few_points_is_an_error():
    with pytest.raises(ValueError, match="at least 2"):
        compute_multiplier([1e15], [3.0], C, _law_b(C))

"""Newton-Schulz: a hand-computed value, near-orthogonality, the transpose path, batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optim.newton_schulz import newton_schulz


def _ns_numpy(x: np.ndarray, steps: int = 5, coeffs=(3.4445, -4.7750, 2.0315), eps=1e-7):
    """Reference in float64, written from the paper's formula (no transposition trick)."""
    x = x.astype(np.float64)
    x = x / (np.linalg.norm(x) + eps)
    a, b, c = coeffs
    for _ in range(steps):
        x = a * x + b * (x @ x.T @ x) + c * (x @ x.T @ x @ x.T @ x)
    return x


def test_diag_3_4_hand_value():
    out = newton_schulz(jnp.diag(jnp.array([3.0, 4.0])), eps=0.0)
    np.testing.assert_allclose(
        np.asarray(out), np.diag([0.72287617, 1.11920393]), atol=1e-6, rtol=0
    )


def test_singular_values_near_one():
    g = jax.random.normal(jax.random.key(0), (64, 128))
    s = np.linalg.svd(np.asarray(newton_schulz(g)), compute_uv=False)
    assert s.min() > 0.65 and s.max() < 1.25, (s.min(), s.max())
    # Singular vectors are kept: the result is close to U V^T of the input.
    u, _, vt = np.linalg.svd(np.asarray(g), full_matrices=False)
    cos = np.sum(np.asarray(newton_schulz(g)) * (u @ vt)) / np.linalg.norm(u @ vt) ** 2
    assert cos > 0.85


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_matches_float64_reference_both_orientations(shape):
    g = np.asarray(jax.random.normal(jax.random.key(1), shape))
    np.testing.assert_allclose(np.asarray(newton_schulz(jnp.asarray(g))), _ns_numpy(g), atol=2e-5)


def test_tall_is_transpose_of_wide():
    g = jax.random.normal(jax.random.key(2), (40, 12))
    np.testing.assert_allclose(
        np.asarray(newton_schulz(g)), np.asarray(newton_schulz(g.T)).T, atol=1e-6
    )


def test_batched_leading_axes_independent():
    g = jax.random.normal(jax.random.key(3), (2, 3, 8, 5))
    out = newton_schulz(g)
    for i in range(2):
        for j in range(3):
            np.testing.assert_allclose(out[i, j], newton_schulz(g[i, j]), atol=1e-6)


def test_dtype_kept_and_per_step_coeffs():
    g = jax.random.normal(jax.random.key(4), (8, 8)).astype(jnp.bfloat16)
    assert newton_schulz(g).dtype == jnp.bfloat16
    g32 = g.astype(jnp.float32)
    same = newton_schulz(g32, steps=2, coeffs=[(3.4445, -4.7750, 2.0315)] * 2)
    np.testing.assert_array_equal(same, newton_schulz(g32, steps=2))
    with pytest.raises(ValueError, match="one per step"):
        newton_schulz(g32, steps=3, coeffs=[(1.0, 0.0, 0.0)] * 2)
    with pytest.raises(ValueError, match="ndim"):
        newton_schulz(jnp.ones(3))

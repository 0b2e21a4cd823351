"""Grouped GEMM backends on the hardware they need: the Hopper Pallas kernels against
`jax.lax.ragged_dot` (values and gradients) where an H100/H200 is present, skipped with the
reason elsewhere; the self-check that gates them names why they cannot run here. The
backends that run on a CPU are checked against a per-token loop in test_moe.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.grouped_matmul import expert_swiglu, pallas_gpu_problem

HOPPER = pallas_gpu_problem("bfloat16")


def test_pallas_gpu_self_check_names_why_it_cannot_run_here():
    if jax.default_backend() == "gpu":
        pytest.skip("runs on a machine without a GPU")
    assert HOPPER == f"needs an NVIDIA Hopper GPU; this process runs on {jax.default_backend()}"
    assert pallas_gpu_problem("float32") == HOPPER  # the device is checked first


@pytest.mark.skipif(HOPPER is not None, reason=f"pallas_gpu kernels: {HOPPER}")
def test_pallas_gpu_equals_ragged_dot_on_hopper():
    e, d, f, rows = 8, 256, 128, 1000
    rng = np.random.default_rng(0)
    sizes = jnp.asarray([300, 0, 1, 255, 0, 200, 44, 100], jnp.int32)  # 900 of 1000 rows
    xs = jnp.asarray(rng.standard_normal((rows, d)), jnp.bfloat16)
    w = tuple(jnp.asarray(rng.standard_normal(s) * 0.05, jnp.bfloat16)
              for s in ((e, d, f), (e, d, f), (e, f, d)))
    dy = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)

    def run(gemm):
        def loss(xs, w):
            return jnp.sum(expert_swiglu(xs, sizes, *w, gemm).astype(jnp.float32) * dy)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(xs, w)

    got, want = run("pallas_gpu"), run("ragged_dot")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, atol=3e-2 * (np.abs(b).max() + 1e-6))

"""`model.matmul.matmul` / `transposed_dot` (the product of every `model.layers.Linear`):
values and gradients equal `jnp.dot`'s, and on CPU the weight gradient is a canonical
`[in, tokens] @ [tokens, out]` product and bfloat16 dots keep bfloat16 operands."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.matmul import matmul, transposed_dot


def _swiglu_loss(mm):
    def loss(x, wg, wu, wd):
        h = jax.nn.silu(mm(x, wg)) * mm(x, wu)
        return jnp.sum(jnp.tanh(mm(h, wd)) ** 2)

    return loss


def _args(seed=0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 4)
    return (
        jax.random.normal(k[0], (3, 10, 16), dtype),
        (jax.random.normal(k[1], (16, 24)) / 4).astype(dtype),
        (jax.random.normal(k[2], (16, 24)) / 4).astype(dtype),
        (jax.random.normal(k[3], (24, 16)) / 5).astype(dtype),
    )


def test_matmul_value_and_gradients_equal_plain_dot():
    args = _args()
    ours = jax.jit(jax.value_and_grad(_swiglu_loss(matmul), argnums=(0, 1, 2, 3)))(*args)
    ref = jax.jit(jax.value_and_grad(_swiglu_loss(jnp.dot), argnums=(0, 1, 2, 3)))(*args)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)


def test_matmul_bfloat16_keeps_dtypes():
    x, w = _args(1, jnp.bfloat16)[:2]
    y, vjp = jax.vjp(matmul, x, w)
    dx, dw = vjp(jnp.ones_like(y))
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
    assert dw.shape == w.shape and dx.shape == x.shape
    ref = jnp.einsum("btk,btn->kn", x.astype(jnp.float32), jnp.ones(y.shape))
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(ref), rtol=2e-2)


def test_transposed_dot_is_a_transpose_b():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 3)), rng.standard_normal((7, 5))
    out = transposed_dot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                         preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(out), a.T @ b, rtol=1e-5, atol=1e-6)


def _transposed_dots(mm) -> list[str]:
    """Dots in the compiled gradient of a SwiGLU block that contract the lhs on its major
    axis and the rhs on its minor one: the form XLA:CPU hands to its slow Eigen fallback."""
    hlo = jax.jit(jax.grad(_swiglu_loss(mm), argnums=(1, 2, 3))).lower(*_args()).compile().as_text()
    dots = re.findall(r"= \w+\[[\d,]*\]\{[\d,]*\} dot\(.*", hlo)
    assert dots, "no dot in the compiled program"
    return [d for d in dots if "lhs_contracting_dims={0}" in d and "rhs_contracting_dims={1}" in d]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="needs the CPU backend: checks its dot forms")
def test_weight_gradients_compile_to_canonical_dots_on_cpu():
    # Plain autodiff of jnp.dot gets the slow form here (the check below is not vacuous) ...
    assert _transposed_dots(jnp.dot)
    # ... matmul's weight gradients do not.
    assert _transposed_dots(matmul) == []


def test_matmul_bfloat16_accumulates_in_float32():
    # A long contraction: the bfloat16 result must be the float32 product of the bfloat16
    # inputs rounded once (within one bfloat16 ulp), not a sum rounded term by term.
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((4, 4096)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((4096, 8)), jnp.bfloat16)
    y = jax.jit(matmul)(x, w)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2**-8, atol=0.05)


def _dot_operand_types(fn, args) -> list[tuple[str, str]]:
    """Element types of the two operands of every dot in `fn`'s compiled input gradient."""
    hlo = jax.jit(jax.grad(fn)).lower(*args).compile().as_text()
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    dots = re.findall(r"\bdot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
    assert dots, "no dot in the compiled program"
    return [(types[a], types[b]) for a, b in dots]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="needs the CPU backend: checks its dot forms")
def test_bfloat16_dots_stay_bfloat16_on_cpu():
    # For a bf16 -> bf16 dot XLA:CPU converts the operands to f32 and runs an f32 dot (half
    # the rate of a bf16 dot with an f32 result); matmul's forward and input-gradient dots
    # keep bf16 operands. (The weight gradient's `x^T dy` is upcast either way.)
    args = _args(2, jnp.bfloat16)
    assert ("f32", "f32") in _dot_operand_types(_swiglu_loss(jnp.dot), args)
    assert set(_dot_operand_types(_swiglu_loss(matmul), args)) == {("bf16", "bf16")}


def test_matmul_keeps_float64_precision():
    # Only narrow floats get the float32 result: a float64 matmul (x64 mode) and its
    # gradients stay float64 to float64 rounding.
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((4, 512)))
        w = jnp.asarray(rng.standard_normal((512, 8)))
        dy = rng.standard_normal((4, 8))
        y, vjp = jax.vjp(matmul, x, w)
        dx, dw = vjp(jnp.asarray(dy))
        assert y.dtype == dx.dtype == dw.dtype == jnp.float64
        xn, wn = np.asarray(x), np.asarray(w)
        np.testing.assert_allclose(np.asarray(y), xn @ wn, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(dx), dy @ wn.T, rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.asarray(dw), xn.T @ dy, rtol=0, atol=1e-12)

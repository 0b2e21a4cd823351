"""The model's projection matmul and the XLA:CPU kernel workarounds behind it, in one place.

`matmul(x, w)` is `x @ w` for `x [..., in]`, `w [in, out]`; every `Linear` calls it. Its
numerics are those of a plain dot in the inputs' dtype (narrow floats accumulated in
float32, as every backend's GEMM does); what differs per backend is only the *form* of the
dots XLA is given, so that they reach fast kernels. Both workarounds apply on the CPU
backend only (`jax.default_backend() == "cpu"`); GPU and TPU get plain dots.

1. Weight gradients as canonical dots (`transposed_dot`). Autodiff writes the weight
   gradient as `x^T dy`. XLA:CPU folds that transpose into the dot and, because `dy` has a
   second consumer (the input gradient), lays `dy` out transposed instead, emitting a
   `dot(x: contract 0, dy^T: contract 1)` that no fast kernel (YNNPACK/XNNPACK) accepts; the
   Eigen fallback ran it at ~40% of the canonical form's rate (1024 x 512 x 1536 on 2 Zen 5
   cores: 183 vs 467 GFLOP/s), and weight gradients are a third of a transformer's matmul
   FLOPs. `matmul` has a custom VJP whose weight gradient materializes `x^T` behind an
   `optimization_barrier`, so XLA keeps the canonical `[in, tokens] @ [tokens, out]` dot
   (dense train step 1.21x, MLA+MoE 1.09x; bench/RESULTS.md, session 2).
2. Narrow-float dots with a float32 result (`dot_f32_acc`). XLA:CPU runs a
   bfloat16 x bfloat16 -> bfloat16 dot by converting the operands to float32 (about half the
   rate of the same dot written with a float32 result: 400 vs 890 GFLOP/s at
   1024 x 512 x 1536), so on CPU the forward and input-gradient dots ask for a float32
   result and cast it back (bfloat16 dense train step 1.16x; bench/RESULTS.md, session 3).
   Float32 and float64 dots are left as they are.

tests/model/test_layers.py checks the values and gradients against `jnp.dot`, and on CPU
that the compiled dots have the intended forms.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def accum_dtype(dtype) -> jnp.dtype:
    """float32 for floating dtypes narrower than 32 bits (bfloat16, float16), else `dtype`."""
    dtype = jnp.dtype(dtype)
    narrow = jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32
    return jnp.dtype(jnp.float32) if narrow else dtype


def transposed_dot(a: jax.Array, b: jax.Array, preferred_element_type=None) -> jax.Array:
    """`a^T b` for `a [n, p]`, `b [n, q]` -> `[p, q]`: a weight gradient (inputs^T @ output
    gradients, summed over the `n` tokens).

    On the CPU backend `a^T` is materialized behind an optimization barrier first, so that
    XLA gets the canonical `[p, n] @ [n, q]` product (workaround 1 of the module docstring).
    Other backends get the plain `einsum` (their GEMMs take transposed operands natively).
    """
    if _on_cpu():
        a = jax.lax.optimization_barrier(a.T)
        return jnp.dot(a, b, preferred_element_type=preferred_element_type)
    return jnp.einsum("np,nq->pq", a, b, preferred_element_type=preferred_element_type)


def dot_f32_acc(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b` in the inputs' dtype; on the CPU backend a narrow float dot is accumulated
    into a float32 result first and cast after (workaround 2 of the module docstring). GPU
    and TPU GEMMs accumulate in float32 and write bfloat16 natively."""
    out = jnp.result_type(a, b)
    acc = accum_dtype(out)
    if _on_cpu() and acc != out:
        return jnp.dot(a, b, preferred_element_type=acc).astype(out)
    return jnp.dot(a, b)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` for `x [..., in]`, `w [in, out]` -> `[..., out]`, whose weight gradient is
    formed by `transposed_dot` (the `x [tokens, in]` flattened over its leading axes)."""
    return dot_f32_acc(x, w)


def _matmul_fwd(x: jax.Array, w: jax.Array):
    return dot_f32_acc(x, w), (x, w)


def _matmul_bwd(res, dy: jax.Array):
    x, w = res
    dx = dot_f32_acc(dy, w.T)
    dw = transposed_dot(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]),
                        preferred_element_type=accum_dtype(w.dtype)).astype(w.dtype)
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)

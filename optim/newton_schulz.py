"""Newton-Schulz orthogonalization, the core of Muon."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

NSCoeffs = tuple[float, float, float]

#: Keller Jordan's quintic coefficients (modded-nanogpt), tuned to maximize the slope at 0.
DEFAULT_NS_COEFFS: NSCoeffs = (3.4445, -4.7750, 2.0315)


def _per_step_coeffs(
    coeffs: NSCoeffs | Sequence[NSCoeffs], steps: int
) -> list[tuple[float, float, float]]:
    """Normalizes `coeffs` to one `(a, b, c)` triple per step."""
    if len(coeffs) == 3 and all(isinstance(c, (int, float)) for c in coeffs):
        a, b, c = coeffs  # type: ignore[misc]
        return [(float(a), float(b), float(c))] * steps
    triples = [tuple(float(v) for v in t) for t in coeffs]  # type: ignore[union-attr]
    if any(len(t) != 3 for t in triples) or len(triples) != steps:
        raise ValueError(
            f"coeffs must be one (a, b, c) triple or {steps} of them (one per step), got {coeffs}"
        )
    return triples  # type: ignore[return-value]


def explicit_sharding(x: jax.Array) -> jax.sharding.NamedSharding | None:
    """The sharding of `x` if its type carries one over a mesh with `Explicit` axes, else None."""
    typeof = getattr(jax, "typeof", None)
    if typeof is None:  # older JAX: no sharding in types
        return None
    sharding = getattr(typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    axis_types = getattr(mesh, "axis_types", ()) or ()
    if any(t == jax.sharding.AxisType.Explicit for t in axis_types):
        return sharding
    return None


def with_auto_sharding(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """`fn(x)`, run with the compiler choosing intermediate shardings, output sharded like `x`.

    Under explicit sharding (`jax.sharding.AxisType.Explicit` mesh axes) the matmuls of
    Newton-Schulz contract sharded axes, which explicit mode refuses to resolve on its own;
    `jax.sharding.auto_axes` hands those axes to the compiler (GSPMD) for the body. With
    auto-sharded or unsharded inputs this is just `fn(x)`.
    """
    sharding = explicit_sharding(x)
    if sharding is None:
        return fn(x)
    return jax.sharding.auto_axes(fn, out_sharding=sharding)(x)


def newton_schulz(
    x: jax.Array,
    steps: int = 5,
    coeffs: NSCoeffs | Sequence[NSCoeffs] = DEFAULT_NS_COEFFS,
    eps: float = 1e-7,
) -> jax.Array:
    r"""Approximately orthogonalizes the matrices on the last two axes of `x`.

    With `X_0 = G / (||G||_F + eps)` (transposed first when rows > cols, so that
    `A = X X^T` is the smaller Gram matrix), each step applies the quintic

    .. math::
      A = X X^T, \qquad X \leftarrow a X + (b A + c A^2) X = (a I + A (b I + c A)) X,

    which maps every singular value `s` of `X` through `p(s) = a s + b s^3 + c s^5`
    and leaves the singular vectors alone. With the default coefficients the
    singular values land in roughly `[0.7, 1.2]` after 5 steps, so the result is
    close to `U V^T` for `G = U S V^T`. Leading axes are batch axes: every matrix
    is orthogonalized independently. Arithmetic is float32 (matmuls follow JAX's
    default matmul precision), with the step evaluated in the Horner form on the
    right; the result has the dtype of `x`.

    Args:
      x: array of shape `[..., rows, cols]`.
      steps: number of iterations.
      coeffs: `(a, b, c)`, or a sequence of `steps` such triples (one per step).
      eps: added to the Frobenius norm before dividing.

    Returns:
      An array of the shape and dtype of `x`.

    References:
      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024;
      Bernstein & Newhouse, `Old Optimizer, New Norm: An Anthology
      <https://arxiv.org/abs/2409.20325>`_, 2024
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs an array with ndim >= 2, got shape {x.shape}")
    per_step = _per_step_coeffs(coeffs, steps)
    return with_auto_sharding(lambda v: _newton_schulz(v, per_step, eps), x)


def _newton_schulz(x: jax.Array, per_step: list[tuple[float, float, float]], eps: float) -> jax.Array:
    dtype = x.dtype
    y = x.astype(jnp.float32)
    transposed = y.shape[-2] > y.shape[-1]
    if transposed:
        y = jnp.swapaxes(y, -1, -2)
    norm = jnp.sqrt(jnp.sum(jnp.square(y), axis=(-2, -1), keepdims=True))
    y = y / (norm + eps)
    eye = jnp.eye(y.shape[-2], dtype=jnp.float32)
    for a, b, c in per_step:
        gram = jnp.einsum("...ij,...kj->...ik", y, y)
        # Horner form a I + A (b I + c A): the same two matmuls as b A + c A^2 followed by
        # a separate a X, with less float32 rounding error.
        poly = a * eye + jnp.einsum("...ij,...jk->...ik", gram, b * eye + c * gram)
        y = jnp.einsum("...ij,...jk->...ik", poly, y)
    if transposed:
        y = jnp.swapaxes(y, -1, -2)
    return y.astype(dtype)

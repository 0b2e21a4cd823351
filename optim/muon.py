"""Muon: momentum orthogonalized by Newton-Schulz, for matrix (and stacked-matrix) parameters."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim._tree import Path, join, map_with_names, path_names
from optim.newton_schulz import DEFAULT_NS_COEFFS, NSCoeffs, newton_schulz, with_auto_sharding

UpdateScale = Literal["original", "moonlight", "spectral"]
UPDATE_SCALES: tuple[str, ...] = ("original", "moonlight", "spectral")

#: Which axes of a leaf form the matrix: `(row_axes, col_axes)`, each an int or a tuple of
#: ints (several axes are flattened, in order). Rows are the fan-in, columns the fan-out.
AxesSpec = tuple[int | Sequence[int], int | Sequence[int]]
#: One spec for all leaves, a pytree of specs (or `None` = default) keyed like the params,
#: or a callable `(path_names, leaf) -> spec | None`.
MatrixAxes = AxesSpec | Any | Callable[[Path, jax.Array], AxesSpec | None] | None


class ScaleByMuonState(NamedTuple):
    """State of `scale_by_muon`: the step count and the momentum buffer (a pytree like params)."""

    count: jax.Array  # int32 scalar
    mu: optax.Updates


def _is_axes(x: Any) -> bool:
    return isinstance(x, int) or (
        isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(i, int) for i in x)
    )


def is_axes_spec(x: Any) -> bool:
    """Whether `x` is one `(row_axes, col_axes)` spec (rather than a pytree of them)."""
    return isinstance(x, tuple) and len(x) == 2 and all(_is_axes(e) for e in x)


def _spec_resolver(matrix_axes: MatrixAxes) -> Callable[[Path, jax.Array], AxesSpec | None]:
    """Turns any accepted form of `matrix_axes` into `(path, leaf) -> spec | None`."""
    if matrix_axes is None:
        return lambda path, x: None
    if is_axes_spec(matrix_axes):
        return lambda path, x: matrix_axes
    if callable(matrix_axes):
        return matrix_axes
    flat, _ = jax.tree_util.tree_flatten_with_path(
        matrix_axes, is_leaf=lambda x: x is None or is_axes_spec(x)
    )
    table = {path_names(kp): spec for kp, spec in flat}

    def lookup(path: Path, x: jax.Array) -> AxesSpec | None:
        for n in range(len(path), -1, -1):  # longest matching prefix: prefix trees work too
            if path[:n] in table:
                return table[path[:n]]
        return None

    return lookup


def matrix_axes_of(
    path: Path, shape: Sequence[int], spec: AxesSpec | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Normalizes a spec to `(row_axes, col_axes)` of non-negative ints for a leaf of `shape`.

    `None` means the last two axes. Raises a ValueError naming `path` for a leaf with
    ndim < 2 or an invalid spec.
    """
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"Muon got parameter {join(path)!r} with shape {tuple(shape)} (ndim {ndim}); Muon "
            "only handles matrices (ndim >= 2). Route vectors such as norm scales and biases "
            "to AdamW (see optim.label_params / optim.build)."
        )
    if spec is None:
        return (ndim - 2,), (ndim - 1,)
    if not is_axes_spec(spec):
        raise ValueError(
            f"matrix_axes for {join(path)!r} must be (row_axes, col_axes), got {spec!r}"
        )

    def norm(axes: int | Sequence[int]) -> tuple[int, ...]:
        axes = (axes,) if isinstance(axes, int) else tuple(axes)
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"matrix_axes {spec!r} for {join(path)!r}: axis {a} out of range for "
                    f"shape {tuple(shape)}"
                )
        return tuple(a % ndim for a in axes)

    rows, cols = norm(spec[0]), norm(spec[1])
    if set(rows) & set(cols) or len(set(rows)) != len(rows) or len(set(cols)) != len(cols):
        raise ValueError(
            f"matrix_axes {spec!r} for {join(path)!r}: row and column axes must be distinct"
        )
    return rows, cols


def update_scale_factor(scale: str, fan_in: int, fan_out: int) -> float:
    r"""The shape-dependent multiplier of the orthogonalized update.

    - `'original'`: :math:`\sqrt{\max(1, d_{out}/d_{in})}` (Jordan et al.),
    - `'moonlight'`: :math:`0.2\sqrt{\max(d_{in}, d_{out})}`, which matches the update
      RMS of AdamW (Liu et al.),
    - `'spectral'`: :math:`\sqrt{d_{out}/d_{in}}`, the spectral-norm / muP scaling
      (Yang et al., "A Spectral Condition for Feature Learning").
    """
    if scale == "original":
        return math.sqrt(max(1.0, fan_out / fan_in))
    if scale == "moonlight":
        return 0.2 * math.sqrt(max(fan_in, fan_out))
    if scale == "spectral":
        return math.sqrt(fan_out / fan_in)
    raise ValueError(f"update_scale must be one of {UPDATE_SCALES}, got {scale!r}")


def orthogonalize(
    x: jax.Array,
    rows: tuple[int, ...],
    cols: tuple[int, ...],
    steps: int,
    coeffs: NSCoeffs | Sequence[NSCoeffs],
    eps: float,
) -> jax.Array:
    """Newton-Schulz on the matrix `(prod rows) x (prod cols)`; all other axes are batch axes.

    Returns float32 with the shape (and, under explicit sharding, the sharding) of `x`.
    """
    return with_auto_sharding(lambda v: _orthogonalize(v, rows, cols, steps, coeffs, eps), x)


def _orthogonalize(
    x: jax.Array,
    rows: tuple[int, ...],
    cols: tuple[int, ...],
    steps: int,
    coeffs: NSCoeffs | Sequence[NSCoeffs],
    eps: float,
) -> jax.Array:
    ndim = x.ndim
    batch = tuple(a for a in range(ndim) if a not in rows and a not in cols)
    perm = batch + rows + cols
    moved = x if perm == tuple(range(ndim)) else jnp.transpose(x, perm)
    batch_shape = tuple(x.shape[a] for a in batch)
    mat_shape = (math.prod(x.shape[a] for a in rows), math.prod(x.shape[a] for a in cols))
    y = newton_schulz(
        moved.reshape(batch_shape + mat_shape).astype(jnp.float32), steps, coeffs, eps
    )
    y = y.reshape(moved.shape)
    if perm == tuple(range(ndim)):
        return y
    return jnp.transpose(y, tuple(perm.index(a) for a in range(ndim)))


def scale_by_muon(
    beta: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: NSCoeffs | Sequence[NSCoeffs] = DEFAULT_NS_COEFFS,
    eps: float = 1e-7,
    update_scale: UpdateScale = "original",
    matrix_axes: MatrixAxes = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Momentum followed by Newton-Schulz orthogonalization, per matrix.

    For a gradient :math:`G_t` of a matrix parameter (momentum :math:`M_0 = 0`):

    .. math::
      M_t = \beta M_{t-1} + G_t, \qquad
      U_t = G_t + \beta M_t \text{ (Nesterov) or } M_t, \qquad
      O_t = s(d_{in}, d_{out}) \cdot \mathrm{NS}_5(U_t),

    with no bias correction (NS normalizes the scale away), :math:`\mathrm{NS}_5` as in
    :func:`optim.newton_schulz` and the shape factor `s` chosen by `update_scale`
    (see :func:`update_scale_factor`), where :math:`d_{in}` is the size of the row axes
    and :math:`d_{out}` of the column axes (`[in, out]` kernels).

    Every leaf must be a matrix on its last two axes (leading axes, e.g. stacked experts
    `[E, in, out]` or scanned layers `[L, E, in, out]`, are batch axes: each matrix is
    orthogonalized on its own), unless `matrix_axes` says otherwise: a spec
    `(row_axes, col_axes)` for all leaves, e.g. `(1, 0)` for `[out, in]` weights or
    `((0,), (1, 2))` for a `[D, H, Dh]` kernel seen as `[D, H*Dh]`; a pytree of specs
    (or `None` for the default) keyed like the params (a prefix tree works); or a callable
    `(path_names, leaf) -> spec | None`. Leaves with ndim < 2 raise a ValueError naming
    their path: route them to AdamW.

    Args:
      beta: momentum decay.
      nesterov: use the Nesterov form `G + beta M` instead of `M`.
      ns_steps: Newton-Schulz iterations.
      ns_coeffs: quintic coefficients `(a, b, c)` (or one triple per step).
      eps: added to the Frobenius norm in Newton-Schulz.
      update_scale: `'original'`, `'moonlight'` or `'spectral'`.
      matrix_axes: which axes form the matrix (see above).
      mu_dtype: dtype of the momentum buffer (default: the parameter's dtype).

    Returns:
      An `optax.GradientTransformation` with state `ScaleByMuonState(count, mu)`.

    References:
      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024;
      Liu et al., `Muon is Scalable for LLM Training <https://arxiv.org/abs/2502.16982>`_, 2025
    """
    if update_scale not in UPDATE_SCALES:
        raise ValueError(f"update_scale must be one of {UPDATE_SCALES}, got {update_scale!r}")
    resolve = _spec_resolver(matrix_axes)

    def axes_tree(tree: optax.Params) -> Any:
        return map_with_names(lambda path, x: matrix_axes_of(path, x.shape, resolve(path, x)), tree)

    def init_fn(params: optax.Params) -> ScaleByMuonState:
        axes_tree(params)  # validates shapes and specs early, naming the offending leaf
        mu = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype), params)
        return ScaleByMuonState(count=jnp.zeros([], jnp.int32), mu=mu)

    def update_fn(
        updates: optax.Updates, state: ScaleByMuonState, params: optax.Params | None = None
    ) -> tuple[optax.Updates, ScaleByMuonState]:
        del params

        def leaf(path: Path, g: jax.Array, m: jax.Array) -> tuple[jax.Array, jax.Array]:
            rows, cols = matrix_axes_of(path, g.shape, resolve(path, g))
            g32 = g.astype(jnp.float32)
            m32 = beta * m.astype(jnp.float32) + g32
            u = g32 + beta * m32 if nesterov else m32
            o = orthogonalize(u, rows, cols, ns_steps, ns_coeffs, eps)
            fan_in = math.prod(g.shape[a] for a in rows)
            fan_out = math.prod(g.shape[a] for a in cols)
            o = o * update_scale_factor(update_scale, fan_in, fan_out)
            return o.astype(g.dtype), m32.astype(m.dtype)

        pairs = map_with_names(leaf, updates, state.mu)
        treedef = jax.tree.structure(updates)
        flat = treedef.flatten_up_to(pairs)
        new_updates = treedef.unflatten([p[0] for p in flat])
        new_mu = treedef.unflatten([p[1] for p in flat])
        return new_updates, ScaleByMuonState(count=optax.safe_increment(state.count), mu=new_mu)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    beta: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_coeffs: NSCoeffs | Sequence[NSCoeffs] = DEFAULT_NS_COEFFS,
    eps: float = 1e-7,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    update_scale: UpdateScale = "original",
    matrix_axes: MatrixAxes = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Muon with decoupled weight decay, for a pytree of matrices.

    .. math::
      W_{t+1} = W_t - \eta_t \left(O_t + \lambda W_t\right),

    where :math:`O_t` is the output of :func:`scale_by_muon` and the decay
    :math:`\eta_t \lambda W_t` is decoupled (Loshchilov & Hutter) and scaled by the
    learning rate, as in Moonlight. It is
    `optax.chain(scale_by_muon(...), optax.add_decayed_weights(weight_decay,
    weight_decay_mask), optax.scale_by_learning_rate(learning_rate))`. Every leaf must
    be a matrix (see `matrix_axes`); combine with AdamW for the others via
    `optax.partition` (as :func:`optim.build` does).

    Args:
      learning_rate: a scalar or an optax schedule.
      beta, nesterov, ns_steps, ns_coeffs, eps, update_scale, matrix_axes, mu_dtype:
        see :func:`scale_by_muon`.
      weight_decay: decoupled weight decay coefficient :math:`\lambda`.
      weight_decay_mask: optax mask (pytree of bools or callable) of leaves to decay.

    Returns:
      An `optax.GradientTransformation`.

    References:
      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024;
      Liu et al., `Muon is Scalable for LLM Training <https://arxiv.org/abs/2502.16982>`_, 2025
    """
    return optax.chain(
        scale_by_muon(
            beta=beta,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coeffs=ns_coeffs,
            eps=eps,
            update_scale=update_scale,
            matrix_axes=matrix_axes,
            mu_dtype=mu_dtype,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )

r"""Maximal Update Parametrization (muP) for Adam(W), and its Muon counterpart.

With width multiplier :math:`m = d / d_{base}` (e.g. `d_model / base_d_model`), muP for
Adam (Tensor Programs V, Table 3) assigns each parameter a *kind*:

- hidden: matrices whose fan-in and fan-out both scale with m (attention and MLP
  kernels, experts): init std / sqrt(m), Adam LR / m;
- input: embeddings (fan-in = vocab, fixed): init std and LR unchanged;
- output: `lm_head`, whose logits the model multiplies by 1/m: std and LR unchanged;
- readout: width -> fixed matrices *without* a 1/m multiplier (the MoE router kernel
  `[D, E]`): init std / m, Adam LR / m;
- vector: norm gains, biases, router biases: unchanged.

The output layer: the model multiplies the output logits by 1/m (the `MuReadout` form of
the `mup` package, Table 8/9 of the paper). Then `W_eff = W / m` already has Table 3's
init std ~ 1/m and Adam update ~ lr/m, so `lm_head` keeps the base init std and the base
LR. The router kernel gets no multiplier in the model, so it follows Table 3's output row
directly ('readout': std / m, LR / m). The attention-logit scale 1/d_head is a model
option. Everything at m = 1 is the base model.

**With Muon** no LR multipliers are needed: use `update_scale='spectral'`, which makes every
hidden update's spectral norm :math:`\eta\sqrt{d_{out}/d_{in}}` -- the spectral condition
for feature learning -- so the Muon LR is width-independent. The AdamW-handled leaves
(embeddings, head, vectors, router) keep the table above (:func:`optim.build` applies
`scale_by_mup` to the Adam partition only).

The kinds come from parameter names (see `optim.partition`); anything unrecognized is a
'vector' (multiplier 1): pass explicit kinds when a model has other parameters.

References:
  Yang et al., `Tensor Programs V: Tuning Large Neural Networks via Zero-Shot
  Hyperparameter Transfer <https://arxiv.org/abs/2203.03466>`_, 2022;
  Yang, Simon & Bernstein, `A Spectral Condition for Feature Learning
  <https://arxiv.org/abs/2310.17813>`_, 2023
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import optax

from optim._tree import Path, join, map_with_names, path_names
from optim.partition import (
    is_embedding,
    is_head,
    is_hidden_matrix,
    is_router,
    is_router_bias,
    is_vector,
)

MupKind = Literal["hidden", "input", "output", "readout", "vector"]
MUP_KINDS: tuple[str, ...] = ("hidden", "input", "output", "readout", "vector")
#: A pytree of kinds (keyed like the params; a prefix tree works), or a callable
#: `params -> such a pytree`, or None for :func:`mup_kind` by name.
KindsOrFn = Any | Callable[[Any], Any] | None


def mup_kind(path: Sequence[str], shape: Sequence[int]) -> MupKind:
    """The muP kind of one parameter from its names and shape (see the module docstring)."""
    path = tuple(path)
    if is_router_bias(path) or is_vector(path, shape):
        return "vector"
    if is_embedding(path):
        return "input"
    if is_head(path):
        return "output"
    if is_router(path):
        return "readout"
    if is_hidden_matrix(path, shape):
        return "hidden"
    return "vector"


def _check_m(width_multiplier: float) -> float:
    m = float(width_multiplier)
    if not m > 0 or math.isinf(m):
        raise ValueError(f"muP width_multiplier must be a positive number, got {width_multiplier}")
    return m


def _lr_multiplier(kind: str, m: float, where: str) -> float:
    if kind not in MUP_KINDS:
        raise ValueError(f"muP kind of {where!r} must be one of {MUP_KINDS}, got {kind!r}")
    return 1.0 / m if kind in ("hidden", "readout") else 1.0


def mup_init_std(base_std: float, width_multiplier: float, kind: MupKind) -> float:
    r"""Init std of a parameter of `kind` at width multiplier m, given its std at the base width.

    hidden: :math:`\sigma/\sqrt{m}` (variance ~ 1/fan_in); readout: :math:`\sigma/m`
    (variance ~ 1/fan_in^2); input, output (with the 1/m logit multiplier), vector:
    :math:`\sigma`.

    References:
      Yang et al., Tensor Programs V, Table 3 <https://arxiv.org/abs/2203.03466>
    """
    m = _check_m(width_multiplier)
    if kind == "hidden":
        return base_std / math.sqrt(m)
    if kind == "readout":
        return base_std / m
    if kind in ("input", "output", "vector"):
        return base_std
    raise ValueError(f"muP kind must be one of {MUP_KINDS}, got {kind!r}")


def _kind_resolver(params_or_updates: Any, kinds: KindsOrFn) -> Callable[[Path, Any], str]:
    if kinds is None:
        return lambda path, x: mup_kind(path, x.shape)
    tree = kinds(params_or_updates) if callable(kinds) else kinds
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    table = {path_names(kp): k for kp, k in flat}

    def lookup(path: Path, x: Any) -> str:
        for n in range(len(path), -1, -1):
            if path[:n] in table:
                return table[path[:n]]
        raise ValueError(f"no muP kind given for parameter {join(path)!r}")

    return lookup


def mup_lr_multipliers(params: Any, width_multiplier: float, kinds: KindsOrFn = None) -> Any:
    """Per-leaf Adam learning-rate multipliers: 1/m for hidden and readout matrices, else 1.

    Args:
      params: pytree of arrays (only names and shapes are read).
      width_multiplier: m = width / base width.
      kinds: optional pytree of kinds (or callable `params -> kinds`); default by name.

    Returns:
      A pytree of Python floats shaped like `params`.

    References:
      Yang et al., Tensor Programs V, Table 3 <https://arxiv.org/abs/2203.03466>
    """
    m = _check_m(width_multiplier)
    kind_of = _kind_resolver(params, kinds)
    return map_with_names(lambda p, x: _lr_multiplier(kind_of(p, x), m, join(p)), params)


def scale_by_mup(width_multiplier: float, labels_or_fn: KindsOrFn = None) -> optax.GradientTransformation:
    r"""Rescales each leaf's update by its muP Adam LR multiplier.

    .. math::
      u_i \leftarrow c_i u_i, \qquad c_i = 1/m \text{ for hidden and readout matrices,
      } 1 \text{ otherwise},

    so `optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(wd), scale_by_mup(m),
    optax.scale_by_learning_rate(lr))` is muP AdamW (the decoupled decay is scaled with the
    LR, as with per-group learning rates in torch). Stateless.

    Args:
      width_multiplier: m = width / base width.
      labels_or_fn: pytree of muP kinds keyed like the params (a prefix tree works), a
        callable `updates -> such a pytree`, or None for :func:`mup_kind` by name.
        Looked up by key path, so it also works inside `optax.partition`.

    Returns:
      An `optax.GradientTransformation`.

    References:
      Yang et al., `Tensor Programs V <https://arxiv.org/abs/2203.03466>`_, 2022
    """
    m = _check_m(width_multiplier)

    def update_fn(updates: optax.Updates, state: optax.EmptyState, params: Any = None):
        del params
        kind_of = _kind_resolver(updates, labels_or_fn)

        def scale(path: Path, u: jax.Array) -> jax.Array:
            c = _lr_multiplier(kind_of(path, u), m, join(path))
            return u if c == 1.0 else (u * c).astype(u.dtype)

        return map_with_names(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)

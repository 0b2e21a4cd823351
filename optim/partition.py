"""Which optimizer handles which parameter: labels from parameter names and shapes.

Labels: `'muon'` (hidden matrices and stacked expert matrices), `'adam'` (embeddings,
LM head, norm gains, biases, router kernels, anything unrecognized) and `'none'`
(no optimizer: the update is zero, e.g. MoE router biases that are adjusted by the
load-balancing rule rather than by gradients).

The rules read the flax parameter names of `model/` (this module never imports it):
`embed/embedding` `[V, D]`, `lm_head/kernel` `[D, V]`, `.../scale`, `.../bias`,
`.../<proj>/kernel` `[in, out]`, `.../router/kernel`, `.../experts/w_gate|w_up|w_down`
`[E, in, out]`; under layer scan the same names sit under `dense_stack/...` or
`moe_stack/...` with a leading `[L]` axis, which is why the rules look at names first
and at ndim only second (a scanned norm gain is `[L, D]`, 2-D but not a matrix).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from optim._tree import Path, join, map_with_names

Label = Literal["muon", "adam", "none"]
LABELS: tuple[str, ...] = ("muon", "adam", "none")

#: Leaf names that are vectors (per layer) whatever their ndim.
VECTOR_NAMES: frozenset[str] = frozenset({"scale", "bias"})
#: Module names whose parameters are embeddings or the output layer.
EMBED_MODULES: frozenset[str] = frozenset({"embed", "tok_embeddings", "wte"})
HEAD_MODULES: frozenset[str] = frozenset({"lm_head"})
#: Parameter names of stacked expert matrices.
EXPERT_NAMES: frozenset[str] = frozenset({"w_gate", "w_up", "w_down", "w1", "w2", "w3"})


def is_router_bias(path: Sequence[str]) -> bool:
    """MoE router bias (auxiliary-loss-free balancing): updated by a rule, not by gradients."""
    return any("router_bias" in name for name in path)


def is_embedding(path: Sequence[str]) -> bool:
    """Token (or other) embedding tables: `embed/embedding`, `.../embedding`."""
    return bool(path) and (path[-1] == "embedding" or any(n in EMBED_MODULES for n in path[:-1]))


def is_head(path: Sequence[str]) -> bool:
    """The output layer (`lm_head/kernel`)."""
    return any(n in HEAD_MODULES for n in path[:-1])


def is_vector(path: Sequence[str], shape: Sequence[int]) -> bool:
    """Norm gains, biases and anything with ndim < 2 (stack axes do not make a matrix)."""
    return len(shape) < 2 or (bool(path) and path[-1] in VECTOR_NAMES)


def is_router(path: Sequence[str]) -> bool:
    """The MoE router's kernel `[D, E]` (its output dim is the expert count, not a width)."""
    return "router" in path[:-1]


def is_hidden_matrix(path: Sequence[str], shape: Sequence[int]) -> bool:
    """Hidden `.../kernel` matrices and stacked experts (possibly under a scan axis)."""
    if len(shape) < 2 or not path:
        return False
    return path[-1] == "kernel" or (path[-1] in EXPERT_NAMES)


def default_label(path: Sequence[str], shape: Sequence[int]) -> Label:
    """The default optimizer label of one parameter, from its names and shape.

    In order: a path containing `router_bias` -> `'none'`; embeddings, the LM head,
    norm gains (`scale`), biases, vectors and the router kernel -> `'adam'`; other
    `kernel`s and stacked experts (`w_gate`, `w_up`, `w_down`) with ndim >= 2 ->
    `'muon'`; anything else -> `'adam'` (AdamW is safe for any shape, Muon is not).

    Args:
      path: the parameter's key path as names, e.g. `('layers_0', 'mlp', 'up_proj', 'kernel')`.
      shape: the parameter's shape.

    Returns:
      `'muon'`, `'adam'` or `'none'`.

    References:
      Liu et al., `Muon is Scalable for LLM Training <https://arxiv.org/abs/2502.16982>`_,
      2025 (embeddings, head and vectors stay on AdamW)
    """
    path = tuple(path)
    if is_router_bias(path):
        return "none"
    if is_embedding(path) or is_head(path) or is_vector(path, shape) or is_router(path):
        return "adam"
    if is_hidden_matrix(path, shape):
        return "muon"
    return "adam"


def _compile_overrides(overrides: Sequence[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    compiled = []
    for item in overrides:
        if len(item) != 2:
            raise ValueError(f"label override must be (regex, label), got {item!r}")
        pattern, label = item
        if label not in LABELS:
            raise ValueError(
                f"label override {pattern!r} -> {label!r}: label must be one of {LABELS}"
            )
        try:
            compiled.append((re.compile(pattern), label))
        except re.error as e:
            raise ValueError(f"label override {pattern!r} is not a valid regex: {e}") from e
    return compiled


def label_params(params: Any, overrides: Sequence[tuple[str, str]] = ()) -> Any:
    """A pytree of labels (`'muon'`, `'adam'`, `'none'`) shaped like `params`.

    Each `(regex, label)` in `overrides` is tried in order with `re.search` on the
    `/`-joined path (e.g. `'moe_stack/mlp/experts/w_up'`); the first match wins, and
    leaves no override matches get :func:`default_label`. Use with
    `optax.partition(transforms, label_params(params))`.

    Args:
      params: any pytree of arrays (or shape-dtype structs).
      overrides: sequence of `(regex, label)` pairs.

    Returns:
      A pytree of strings with the structure of `params`.
    """
    compiled = _compile_overrides(overrides)

    def label(path: Path, x: Any) -> str:
        joined = join(path)
        for pattern, lab in compiled:
            if pattern.search(joined):
                return lab
        return default_label(path, getattr(x, "shape", ()))

    return map_with_names(label, params)

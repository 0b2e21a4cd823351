"""Small pytree helpers shared by the optim modules: key paths as tuples of names."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

Path = tuple[str, ...]


def path_names(key_path: Sequence[Any]) -> Path:
    """A JAX key path as a tuple of names, e.g. `('layers_0', 'attn', 'q_proj', 'kernel')`.

    Each entry is named by `jax.tree_util.keystr((key,), simple=True)` (a dict key, an
    attribute name, a sequence index). A trailing `.value` attribute (flax `nn.Partitioned`
    boxes) is dropped so boxed and unboxed parameter trees get the same names. This is the
    one key-path-to-names helper; `join(path_names(kp))` is
    `jax.tree_util.keystr(kp, simple=True, separator='/')` but for that `.value`.
    """
    names = tuple(jax.tree_util.keystr((k,), simple=True) for k in key_path)
    if key_path and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return names


def join(path: Sequence[str]) -> str:
    """`('a', 'b')` -> `'a/b'`, the form used in messages and regex overrides."""
    return "/".join(path)


def map_with_names(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """`jax.tree.map` where `fn(path_names, leaf, *rest_leaves)` also gets the leaf's names."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x, *r: fn(path_names(kp), x, *r), tree, *rest
    )


def get_path(tree: Any, path: Sequence[str]) -> Any:
    """`tree[path[0]][path[1]]...`; raises KeyError naming the full path if missing."""
    node = tree
    for i, key in enumerate(path):
        try:
            node = node[key]
        except (KeyError, TypeError, IndexError) as e:
            raise KeyError(
                f"no parameter at path {join(path)!r} (missing {key!r} under "
                f"{join(path[:i]) or '<root>'!r})"
            ) from e
    return node


def set_path(tree: Any, path: Sequence[str], value: Any) -> Any:
    """A copy of `tree` with `tree[path...] = value`; only the dicts along `path` are copied."""
    if not path:
        return value
    key = path[0]
    child = set_path(tree[key], path[1:], value)
    if isinstance(tree, dict):
        out = dict(tree)
        out[key] = child
        return out
    if isinstance(tree, Mapping):  # e.g. flax FrozenDict
        return type(tree)({**tree, key: child})
    raise TypeError(f"cannot set {key!r} in a {type(tree).__name__}: expected a mapping")

"""Logical axis names and the one table that maps them to mesh axes.

Every parameter and activation is annotated with *logical* axis names (`embed`, `heads`,
`mlp`, `expert`, `vocab`, `batch`, ...). `LOGICAL_RULES` says where each goes on the device
mesh, whose axes are `data`, `fsdp`, `tensor` and `expert`. Changing the parallelism is a
change of the mesh shape (or of this table), never of a layer.

Flax resolves a logical name with the first rule whose mesh axis is still unused in the
same array, so `embed` is sharded over `fsdp` on parameters but stays replicated on
activations, whose `batch` axis already uses `fsdp`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", "expert"),
    ("capacity", None),
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("q_lora", None),
    ("kv_lora", None),
    ("norm", None),
    ("layers", None),
    ("cache_length", None),
)


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `MESH_AXES` with sizes from `shape` (missing axes get 1, one -1 takes the rest).

    Raises:
      ValueError: naming the axis sizes when they do not divide the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axis {unknown}; valid axes: {MESH_AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    bad = [a for a, s in sizes.items() if s == 0 or s < -1]
    if bad:
        raise ValueError(f"mesh axis sizes must be positive or -1: {bad}")
    fixed = int(np.prod([s for s in sizes.values() if s != -1]))
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh {sizes} does not divide the {len(devices)} devices (fixed axes take {fixed})"
            )
        sizes[free[0]] = len(devices) // fixed
    total = int(np.prod(list(sizes.values())))
    if total != len(devices):
        raise ValueError(f"mesh {sizes} has {total} slots but there are {len(devices)} devices")
    arr = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(arr, MESH_AXES)


def logical_to_sharding(tree, mesh: Mesh, rules=LOGICAL_RULES):
    """Maps a pytree of logical `PartitionSpec`s (e.g. `nn.get_partition_spec(boxed)`) to
    `NamedSharding`s on `mesh`."""
    specs = nn.logical_to_mesh(tree, rules)
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=LOGICAL_RULES) -> NamedSharding:
    """Sharding of a `[batch, length, ...]` input array."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)

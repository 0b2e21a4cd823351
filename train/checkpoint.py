"""Orbax checkpoints of the whole `TrainState` (step, params, optimizer state, router
biases, RNG; the data position is the step).

Saves are asynchronous, every `config.checkpoint.every` steps and at the end, keeping the
last `config.checkpoint.keep`. Restoring takes an *abstract* state (shapes, dtypes and the
target shardings), so a checkpoint saved on one mesh restores onto another. A checkpoint
that cannot be read, or whose tree does not match the configured model, raises `UserError`
and nothing on disk is touched.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from train.errors import UserError


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for one `TrainState` tree."""

    def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(every, 1),
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores `step` (default: latest) into the shapes/shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint found in {self.directory}")
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax raises many types for unreadable / mismatched trees
            msg = str(e).strip().splitlines()
            first = msg[0] if msg else type(e).__name__
            raise UserError(
                f"cannot restore checkpoint step {step} from {self.directory} "
                f"(corrupt, or saved by an incompatible config): {type(e).__name__}: {first[:300]}. "
                "Nothing was deleted; point config.workdir elsewhere or fix the config."
            ) from e

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s (with shardings) of a concrete tree."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )

"""Orbax checkpoints of the whole `TrainState` (step, params, optimizer state, router
biases, RNG; the data position is the step).

Saves are asynchronous, every `config.checkpoint.every` steps and at the end, keeping the
last `config.checkpoint.keep`. Restoring takes an *abstract* state (shapes, dtypes and the
target shardings), so a checkpoint saved on one mesh restores onto another. A checkpoint
that cannot be read, or whose tree does not match the configured model, raises `UserError`
and nothing on disk is touched.
"""

from __future__ import annotations

import gc
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from train.errors import UserError


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` for one `TrainState` tree.

    `Checkpointer.open(directory)` reads an existing directory without creating anything
    (for `restore_partial` from another run)."""

    def __init__(self, directory: str, every: int = 1, keep: int | None = None,
                 async_save: bool = True, create: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(every, 1),
            create=create,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @classmethod
    def open(cls, directory: str) -> Checkpointer:
        """An existing checkpoint directory, to read (`UserError` if it is not a directory)."""
        if not os.path.isdir(directory):
            raise UserError(f"no checkpoint directory {directory!r}")
        return cls(directory, async_save=False, create=False)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

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
            error = UserError(
                f"cannot restore checkpoint step {step} from {self.directory} "
                f"(corrupt, or saved by an incompatible config): {_first_line(e)}. "
                "Nothing was deleted; point config.workdir elsewhere or fix the config.")
        raise self._after_failed_read(error)

    def restore_partial(self, abstract: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """Restores only `abstract`'s top-level entries (e.g. `{'params': ..., 'router_bias':
        ...}` as `jax.ShapeDtypeStruct`s with shardings) of the saved state at `step`
        (default: latest); the rest (optimizer state, ...) is not read. Empty entries are
        skipped. A missing step, an unreadable checkpoint or other shapes raise `UserError`.
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self.all_steps():
            what = "no checkpoint" if step is None else f"no checkpoint of step {step}"
            raise UserError(f"{what} in {self.directory} (steps: {self.all_steps()})")
        abstract = {k: v for k, v in abstract.items() if jax.tree.leaves(v)}
        where = f"{self.directory} step {step}"
        error = None
        try:
            out = self.manager.restore(step, args=ocp.args.PyTreeRestore(
                item=abstract, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
        except Exception as e:  # orbax raises many types for unreadable / mismatched trees
            error = UserError(f"cannot restore {sorted(abstract)} from {where} (saved by a "
                              f"different model config?): {_first_line(e)}")
        if error is not None:
            raise self._after_failed_read(error)
        for k, v in abstract.items():
            got = jax.tree.map(lambda x: (x.shape, x.dtype), out[k])
            want = jax.tree.map(lambda x: (x.shape, x.dtype), v)
            if got != want:
                raise UserError(f"checkpoint {where}: '{k}' shapes differ from the configured model")
        return out

    def _after_failed_read(self, error: UserError) -> UserError:
        """Closes the manager and collects what the failed Orbax read left behind (its
        un-awaited per-shard read coroutines) now, instead of at an arbitrary later garbage
        collection: finalized inside an unrelated `compile()` they crash CPython 3.11 ('AST
        constructor recursion depth mismatch'). The original exception is not chained for
        the same reason; its type and first line are in the message."""
        self.close()
        gc.collect()
        return error

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s (with shardings) of a concrete tree."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )

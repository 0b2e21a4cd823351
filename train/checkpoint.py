"""Orbax checkpoints of the whole `TrainState` (step, params, optimizer state, router
biases, RNG; the data position is the step).

Saves are asynchronous, every `config.checkpoint.every` steps and at the end, keeping the
last `config.checkpoint.keep`. Restoring takes an *abstract* state (shapes, dtypes and the
target shardings), so a checkpoint saved on one mesh restores onto another. A checkpoint
that cannot be read, or whose tree does not match the configured model, raises `UserError`
and nothing on disk is touched.

Integrity: every saved step gets `<step>/fingerprints.json`, a 32-bit fingerprint of each
array (`fingerprints`: any single flipped bit changes it), written once Orbax has finalized
the step. A restore recomputes them on the restored arrays; a mismatch is a `UserError`
that names the arrays and the earlier steps (`config.checkpoint.restore_step` resumes from
one of them; nothing is ever deleted or skipped silently). A step saved without the file (a
kill between Orbax's finalization and the write) restores unverified, with a warning.
"""

from __future__ import annotations

import gc
import json
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from model.hf.checkpoint import stored_shape_diff
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
        self._async = async_save
        self._pending: dict[int, dict[str, list]] = {}

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
        self._flush_fingerprints()  # Orbax finishes the previous save before a new one
        saved = self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
        if saved:
            self._pending[step] = fingerprints(state)
            if not self._async:
                self._flush_fingerprints()
        return saved

    def _flush_fingerprints(self) -> None:
        """Writes the fingerprints of the steps whose save Orbax has finished."""
        if not self._pending:
            return
        self.manager.wait_until_finished()
        for step, fps in self._pending.items():
            path = os.path.join(self.directory, str(step), FINGERPRINTS)
            if jax.process_index() == 0 and os.path.isdir(os.path.dirname(path)):
                with open(path + ".tmp", "w") as f:
                    json.dump(fps, f)
                os.replace(path + ".tmp", path)
        self._pending = {}

    def verify(self, step: int, tree: Any) -> None:
        """Checks restored arrays (all of a state, or the entries of a partial restore)
        against the fingerprints saved with `step`; `UserError` on a mismatch."""
        path = os.path.join(self.directory, str(step), FINGERPRINTS)
        if not os.path.exists(path):
            warnings.warn(f"checkpoint step {step} in {self.directory} has no {FINGERPRINTS} "
                          "(saved by an older version, or killed before it was written): "
                          "restored without an integrity check", stacklevel=2)
            return
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is unreadable ({e}): the checkpoint of step {step} "
                            f"cannot be verified. {self._earlier(step)}") from e
        bad = [k for k, v in fingerprints(tree).items()
               if k in saved and saved[k][1:] == v[1:] and saved[k][0] != v[0]]
        if bad:
            raise self._after_failed_read(UserError(
                f"cannot restore checkpoint step {step} from {self.directory}: it is corrupt, "
                f"{len(bad)} array(s) differ from the fingerprints written at save "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}). {self._earlier(step)}"))

    def _check_stored_shapes(self, step: int, abstract: Any, partial: bool = False) -> None:
        """`UserError` naming the arrays whose stored shape differs from `abstract`'s (only
        those `abstract` asks for when `partial`), before Orbax reads anything
        (`model.hf.checkpoint.stored_shape_diff`)."""
        where = f"cannot restore checkpoint step {step} from {self.directory}"
        try:
            diff = stored_shape_diff(os.path.join(self.directory, str(step), "default"),
                                     abstract, only_wanted=partial)
        except ValueError as e:
            raise self._after_failed_read(UserError(
                f"{where}: it is corrupt or incomplete ({e}). {self._earlier(step)}")) from None
        if diff:
            raise self._after_failed_read(UserError(
                f"{where}: it was saved by another model or optimizer config ({len(diff)} "
                f"arrays differ: {'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''}). "
                "Nothing was deleted; point config.workdir elsewhere or restore the config it "
                "was saved with."))

    def set_aside_after(self, step: int) -> list[str]:
        """Renames the step directories after `step` to `<step>.set-aside` (Orbax no longer
        sees them; nothing is deleted) and returns the new paths."""
        moved = []
        for s in self.all_steps():
            if s > step:
                src = os.path.join(self.directory, str(s))
                dst, n = f"{src}.set-aside", 1
                while os.path.exists(dst):
                    n += 1
                    dst = f"{src}.set-aside-{n}"
                os.replace(src, dst)
                moved.append(dst)
                print(f"set aside checkpoint step {s} (after restore_step={step}): {dst}")
        if moved:
            self.manager.reload()
        return moved

    def _earlier(self, step: int) -> str:
        earlier = [s for s in self.all_steps() if s < step][::-1]
        if not earlier:
            return "There is no earlier checkpoint; nothing was deleted."
        return (f"Earlier checkpoints: {', '.join(map(str, earlier))}; resume from one with "
                f"--config.checkpoint.restore_step={earlier[0]} (nothing was deleted).")

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores `step` (default: latest) into the shapes/shardings of `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise UserError(f"no checkpoint found in {self.directory}")
        if step not in self.all_steps():
            raise UserError(f"no checkpoint of step {step} in {self.directory} "
                            f"(steps: {self.all_steps()})")
        self._check_stored_shapes(step, abstract_state)
        try:
            state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax raises many types for unreadable / mismatched trees
            error = UserError(
                f"cannot restore checkpoint step {step} from {self.directory} "
                f"(corrupt, or saved by an incompatible config): {_first_line(e)}. "
                f"{self._earlier(step)} Or point config.workdir elsewhere, or fix the config.")
            state = None
        if state is None:
            raise self._after_failed_read(error)
        self.verify(step, state)
        return state

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
        self._check_stored_shapes(step, abstract, partial=True)
        error = None
        try:
            out = self.manager.restore(step, args=ocp.args.PyTreeRestore(
                item=abstract, partial_restore=True,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
        except Exception as e:  # orbax raises many types for unreadable / mismatched trees
            error = UserError(f"cannot restore {sorted(abstract)} from {self.directory} step "
                              f"{step}: {_first_line(e)}")
        if error is not None:
            raise self._after_failed_read(error)
        self.verify(step, out)
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
        self._flush_fingerprints()
        self.manager.wait_until_finished()
        self.manager.close()


FINGERPRINTS = "fingerprints.json"
_MULT = 0x9E3779B1  # odd: any single-bit change of an element changes the weighted sum


@jax.jit
def _fingerprint(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(_MULT) | jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


def fingerprints(tree: Any) -> dict[str, list]:
    """`{key path: [fingerprint, dtype, shape]}` of every array in `tree`: the sum over
    elements of (bits x an odd per-position weight) modulo 2^32, computed where the arrays
    live (sharded arrays are reduced across devices), so a single flipped bit anywhere
    changes it. Key paths are `params/layers_0/...`, the same for a dataclass state and for
    the dict of a partial restore."""
    flat = [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if isinstance(x, jax.Array)]
    # One program per array, each finished before the next starts: many small collective
    # programs in flight at once can deadlock XLA:CPU's rendezvous on few cores.
    values = [jax.device_get(_fingerprint(x)) for _, x in flat]
    return {k: [int(v), str(x.dtype), list(x.shape)] for (k, x), v in zip(flat, values, strict=True)}


def _first_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:300]}"


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s (with shardings) of a concrete tree."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )

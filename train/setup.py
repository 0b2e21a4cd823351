"""The setup every job shares: model config, mesh, optimizer, sharded state, checkpoints.

A job (`train.loop` for pretraining, `rl.loop`, ...) reads top to bottom as these calls,
then one call of `train.runner.run_steps`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.traverse_util import flatten_dict, unflatten_dict
from ml_collections import ConfigDict

import optim
from model import ModelConfig, Transformer, lora
from model.attention import choose_backend
from model.moe import choose_moe
from model.sharding import logical_to_sharding, make_mesh
from train.checkpoint import Checkpointer, abstract_like
from train.errors import UserError
from train.metrics import drop_metrics_after
from train.qkclip import make_qk_clip_hook
from train.step import TrainState

# With `init_from`, the architecture comes from the checkpoint; these fields still come
# from `config.model` (they change how the model runs, not its parameters; the LoRA
# adapters are added on top of the checkpoint's weights, see `load_init_from`).
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "capacity_factor", "bias_update_rate",
                  "aux_loss_alpha", "max_seq_len", "attn_impl", "attn_max_logits", "lora_rank",
                  "lora_alpha", "lora_dropout", "lora_targets")

BATCH_AXES = ("data", "fsdp", "expert")  # the mesh axes the batch is split over


def model_config(config: ConfigDict) -> ModelConfig:
    """`config.model` as a validated `ModelConfig` (errors name the field); with
    `config.init_from`, the imported checkpoint's architecture plus `RUNTIME_FIELDS`. With
    QK-clip on, the attention must report exact max logits (`attn_max_logits=True`)."""
    cfg = _model_config(config)
    if config.optim.qk_clip.enabled:
        if cfg.attn_max_logits is False:
            raise UserError("config.optim.qk_clip.enabled needs the per-head max logits, which "
                            "config.model.attn_max_logits=False turns off")
        cfg = cfg.replace(attn_max_logits=True)
    return cfg


def _model_config(config: ConfigDict) -> ModelConfig:
    try:
        init_from = str(config.get("init_from", "") or "")
        if not init_from:
            return ModelConfig.from_dict(config.model.to_dict())
        saved = source_model_config(init_from).to_dict()
        saved.update({k: config.model[k] for k in RUNTIME_FIELDS})
        return ModelConfig.from_dict(saved)
    except (ValueError, TypeError) as e:
        raise UserError(f"config.model: {e}") from e


def is_run_workdir(path: str) -> bool:
    """Whether `path` is a training run's workdir (any job's: it has `config.json`, written
    by `write_config`) rather than a `python -m model.hf import` directory."""
    return (os.path.isfile(os.path.join(path, "config.json"))
            and not os.path.isfile(os.path.join(path, "model_config.json")))


def source_model_config(path: str, _seen: tuple[str, ...] = ()) -> ModelConfig:
    """The architecture of the weights `config.init_from=path` names: a `model.hf` import's
    `model_config.json`, or a run workdir's effective model, i.e. its saved `config.json`'s
    `model` section, or (when that run itself started from an `init_from`) the source's
    architecture with the run's `RUNTIME_FIELDS` (its LoRA settings included, so that its
    adapters can be read and merged). `UserError` when `path` is neither."""
    if os.path.isfile(os.path.join(path, "model_config.json")):
        with open(os.path.join(path, "model_config.json")) as f:
            return ModelConfig.from_dict(json.load(f))
    fname = os.path.join(path, "config.json")
    if not os.path.isfile(fname):
        raise UserError(
            f"config.init_from={path!r} is neither a model checkpoint (no model_config.json; "
            "create one with `python -m model.hf import SRC DST`) nor a training run's workdir "
            "(no config.json)")
    try:
        with open(fname) as f:
            saved = json.load(f)
        model = dict(saved["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"config.init_from={path!r}: cannot read the run's model config from "
                        f"{fname}: {e}") from e
    parent = str(saved.get("init_from", "") or "")
    if parent:
        if os.path.abspath(parent) in _seen + (os.path.abspath(path),):
            raise UserError(f"config.init_from={path!r}: its runs start from each other "
                            f"in a cycle ({parent!r})")
        base = source_model_config(parent, _seen + (os.path.abspath(path),)).to_dict()
        model = {**base, **{k: model[k] for k in RUNTIME_FIELDS if k in model}}
    try:
        return ModelConfig.from_dict(model)
    except (ValueError, TypeError) as e:
        raise UserError(f"config.init_from={path!r}: the model of {fname}: {e}") from e


def attention_backend(cfg: ModelConfig, seq_len: int) -> str:
    """The kernel lines printed at start: the attention backend
    (`model.attention.choose_backend`) and, for an MoE, its dispatch and grouped GEMM
    (`model.moe.choose_moe`); `UserError` when a requested one cannot run here."""
    try:
        lines = [choose_backend(cfg, seq_len).describe()]
    except ValueError as e:
        raise UserError(f"config.model.attn_impl: {e}") from e
    if cfg.is_moe:
        try:
            lines.append(choose_moe(cfg).describe())
        except ValueError as e:
            raise UserError(f"config.model: {e}") from e
    return "\n".join(lines)


def total_steps(config: ConfigDict) -> int:
    """`config.train.steps`, which must be positive."""
    steps = int(config.train.steps)
    if steps <= 0:
        raise UserError(f"config.train.steps={steps} must be > 0")
    return steps


def build_mesh(config: ConfigDict) -> jax.sharding.Mesh:
    try:
        return make_mesh(dict(config.mesh.to_dict()))
    except ValueError as e:
        raise UserError(f"config.mesh: {e}") from e


def data_parallel_size(mesh: jax.sharding.Mesh) -> int:
    """How many ways the batch is split: data x fsdp x expert."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def abstract_params(model: Transformer, seq_len: int) -> Any:
    """The parameters' shapes and dtypes (`jax.ShapeDtypeStruct`s), nothing allocated."""
    return jax.eval_shape(
        lambda r: nn.unbox(model.init(r, jnp.zeros((1, seq_len), jnp.int32)))["params"],
        jax.random.PRNGKey(0))


def optim_config(config: ConfigDict, cfg: ModelConfig, steps: int) -> ConfigDict:
    """`config.optim` with the schedule length (default: the run) and muP filled in."""
    opt_cfg = ConfigDict(config.optim.to_dict())
    if opt_cfg.total_steps is None or opt_cfg.total_steps <= 0:
        opt_cfg.total_steps = steps
    if cfg.mup_base_d_model:
        opt_cfg.mup.enabled = True
        opt_cfg.mup.width_multiplier = cfg.width_multiplier
    elif opt_cfg.mup.enabled:
        raise UserError(
            "config.optim.mup.enabled needs config.model.mup_base_d_model (the base width); "
            "set that instead: the trainer derives the width multiplier from it")
    return opt_cfg


def build_optimizer(
    opt_cfg: ConfigDict, params: Any, key: str = "config.optim"
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
    """`(tx, schedule)` of `opt_cfg` for `params` (concrete or abstract); errors name `key`.
    When `params` hold LoRA adapters (`model.lora`), only those are trained
    (`freeze_all_but_adapters`)."""
    try:
        if lora.has_adapters(params):
            return freeze_all_but_adapters(opt_cfg, params), optim.build_schedule(opt_cfg)
        return optim.build(opt_cfg, params), optim.build_schedule(opt_cfg)
    except ValueError as e:
        raise UserError(f"{key}: {e}") from e


def freeze_all_but_adapters(opt_cfg: ConfigDict, params: Any) -> optax.GradientTransformation:
    """The optimizer of `opt_cfg` on the LoRA adapters of `params` alone; every other
    parameter (the base weights) is frozen: `optax.set_to_zero()`, which keeps no state.

    `optax.partition` over the labels `'adapter'` / `'frozen'`; the inner optimizer is
    `optim.build` for the adapter-only tree (the base leaves are `optax.MaskedNode`s), so its
    gradient-norm clip is over the adapters' gradients and its moments exist only for them.
    The adapter factors are not `kernel`s, so `optim.label_params` gives them AdamW (also
    with `optim.name='muon'`) with the usual decoupled weight decay.
    """
    mask = lora.adapter_mask(params)
    adapters = jax.tree.map(lambda m, p: p if m else optax.MaskedNode(), mask, params)
    labels = jax.tree.map(lambda m: "adapter" if m else "frozen", mask)
    return optax.partition(
        {"adapter": optim.build(opt_cfg, adapters), "frozen": optax.set_to_zero()}, labels)


def qk_clip_hook(config: ConfigDict, cfg: ModelConfig):
    """The QK-clip post-update hook of `config.optim.qk_clip`, or None when disabled."""
    if not config.optim.qk_clip.enabled:
        return None
    if cfg.lora_rank:
        raise UserError(
            f"config.optim.qk_clip.enabled with config.model.lora_rank={cfg.lora_rank}: QK-clip "
            "rescales the query/key weights, which LoRA freezes; disable one of them")
    try:
        return make_qk_clip_hook(cfg, float(config.optim.qk_clip.tau))
    except ValueError as e:
        raise UserError(f"config.optim.qk_clip: {e}") from e


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any,
                        param_shardings: Any, replicated: jax.sharding.Sharding) -> Any:
    """Shardings of an optax state: every copy of the parameter tree inside it (Adam
    moments, Muon momentum, ...) takes the parameters' shardings
    (`optax.tree_utils.tree_map_params`); everything else (step counters) is replicated."""
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (optax.partition's gaps)
    return optax.tree_utils.tree_map_params(
        tx, lambda leaf, s: leaf if masked(leaf) else s, abstract_opt_state, param_shardings,
        transform_non_params=lambda _: replicated, is_leaf=masked)


def replicated_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def init_opt_state(tx: optax.GradientTransformation, params: Any, mesh) -> Any:
    """`tx.init(params)` created directly in its shardings (those of `opt_state_shardings`)."""
    p_shard = jax.tree.map(lambda x: x.sharding, params)
    shardings = opt_state_shardings(tx, jax.eval_shape(tx.init, params), p_shard,
                                    replicated_sharding(mesh))
    return jax.jit(tx.init, out_shardings=shardings)(params)


def init_state(model: Transformer, tx, mesh, seed: int, seq_len: int) -> TrainState:
    """A fresh `TrainState` with every array created directly in its sharding on `mesh`
    (works unchanged when the mesh spans several processes).

    Parameters are sharded by their logical axes (`model.sharding.LOGICAL_RULES`); the
    optimizer state's moments take their parameter's sharding; scalars are replicated.
    """
    rng = jax.random.PRNGKey(seed)
    dummy = jnp.zeros((1, seq_len), jnp.int32)
    abstract = jax.eval_shape(lambda r: model.init(r, dummy), rng)
    param_shardings = logical_to_sharding(nn.get_partition_spec(abstract["params"]), mesh)
    replicated = replicated_sharding(mesh)
    bias_shardings = jax.tree.map(lambda _: replicated, abstract.get("router_bias", {}))

    def _init(r):
        v = nn.unbox(model.init(r, dummy))
        return v["params"], v.get("router_bias", {})

    _init = jax.jit(_init, out_shardings=(param_shardings, bias_shardings))
    params, router_bias = _init(jax.random.fold_in(rng, 1))
    opt_state = init_opt_state(tx, params, mesh)
    step, key, bad = jax.jit(
        lambda: (jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed), jnp.zeros((), jnp.int32)),
        out_shardings=replicated,
    )()
    return TrainState(
        step=step, params=params, opt_state=opt_state, router_bias=router_bias, rng=key,
        bad_steps=bad,
    )


def load_init_from(path: str, state: TrainState, mesh) -> TrainState:
    """Replaces the fresh params / router biases by those `config.init_from=path` names,
    each array in the state's dtype and sharding: an imported checkpoint (`model.hf` Orbax
    format), or a training run's workdir (any job's; its latest checkpoint, read with
    `restore_variables`, architecture from `source_model_config`).

    LoRA (`model.lora`): the state's adapters keep their fresh initialisation (B = 0, so the
    run starts from exactly the checkpoint's function); adapters stored in the checkpoint
    are first merged into their kernels (`merge_lora`), so any checkpoint, adapted or not,
    starts a run with or without adapters."""
    if is_run_workdir(path):
        saved_cfg = source_model_config(path)
        from model.hf.convert import abstract_variables

        abstract, shardings = abstract_variables(saved_cfg, mesh)
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
        variables = restore_variables(path, abstract, key="config.init_from")
    else:
        from model.hf.checkpoint import read_orbax

        try:
            saved_cfg, variables = read_orbax(path, mesh)
        except Exception as e:  # a wrong directory or a tree that does not match
            raise UserError(f"config.init_from={path!r}: cannot read the checkpoint: {e}") from e

    def place(new, old):
        if new.shape != old.shape:
            raise UserError(f"config.init_from: shape {new.shape} does not match {old.shape}")
        return jax.device_put(new.astype(old.dtype), old.sharding)

    loaded = flatten_dict(lora.merge_lora(saved_cfg, variables["params"]), sep="/")
    fresh = flatten_dict(state.params, sep="/")
    missing = [k for k in fresh if k not in loaded and not lora.is_adapter(k.split("/"))]
    extra = [k for k in loaded if k not in fresh]
    if missing or extra:
        raise UserError(f"config.init_from={path!r}: its parameters do not match the model "
                        f"(missing: {', '.join(missing[:5]) or 'none'}; unexpected: "
                        f"{', '.join(extra[:5]) or 'none'})")
    params = unflatten_dict(
        {k: place(loaded[k], v) if k in loaded else v for k, v in fresh.items()}, sep="/")
    bias = state.router_bias
    if "router_bias" in variables and variables["router_bias"]:
        bias = jax.tree.map(place, variables["router_bias"], state.router_bias)
    return state.replace(params=params, router_bias=bias)


def restore_variables(
    directory: str, abstract: dict[str, Any], step: int | None = None, key: str = ""
) -> dict[str, Any]:
    """Restores only `abstract`'s entries (e.g. `{'params': ..., 'router_bias': ...}` as
    `jax.ShapeDtypeStruct`s with shardings) from a checkpoint of a training or RL run
    (`step`, default the latest): `directory` is a workdir (its `checkpoints/`, else
    `warmup/checkpoints/`) or a checkpoint directory. The rest of the saved state
    (optimizer, ...) is not read, so any optimizer works. Mismatched shapes or a missing
    checkpoint raise `UserError` (naming the config `key` when given)."""
    for d in (os.path.join(directory, "checkpoints"),
              os.path.join(directory, "warmup", "checkpoints"), directory):
        if not os.path.isdir(d):
            continue
        ckpt = Checkpointer.open(d)
        try:
            if ckpt.latest_step() is not None:
                return ckpt.restore_partial(abstract, step)
        finally:
            ckpt.close()
    what = f"{key}={directory!r}" if key else repr(directory)
    raise UserError(f"{what}: no checkpoint found (looked in checkpoints/, "
                    "warmup/checkpoints/ and the directory itself); has the run saved one?")


def checkpointer(config: ConfigDict, directory: str) -> Checkpointer:
    """The checkpoints of `config.checkpoint` (every, keep, async_save) in `directory`."""
    keep = config.checkpoint.keep
    return Checkpointer(directory, int(config.checkpoint.every),
                        None if keep is None else int(keep), bool(config.checkpoint.async_save))


def write_config(workdir: str, config: ConfigDict) -> None:
    """`workdir/config.json`: the resolved config."""
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))


def global_batch(batch: dict[str, np.ndarray], shardings: dict[str, Any]) -> dict[str, jax.Array]:
    """Places this process's rows of the global batch (`DataPipeline.batch`) into their
    shardings; each process supplies only its own part."""
    return {
        k: jax.make_array_from_process_local_data(
            shardings[k], v, (v.shape[0] * jax.process_count(),) + v.shape[1:]
        )
        for k, v in batch.items()
    }


def check_process_rows(sharding, global_rows: int) -> None:
    """The pipeline gives process p rows [p*B/P, (p+1)*B/P): the mesh's batch axes must
    split the batch across processes in process order (the default device order does)."""
    per = global_rows // jax.process_count()
    lo, hi = jax.process_index() * per, (jax.process_index() + 1) * per
    for idx in sharding.addressable_devices_indices_map((global_rows, 1)).values():
        r = idx[0]
        start = 0 if r.start is None else r.start
        stop = global_rows if r.stop is None else r.stop
        if start < lo or stop > hi:
            raise UserError(
                f"config.mesh: the batch axes (data, fsdp, expert) do not split the batch across "
                f"the {jax.process_count()} processes in order; put model axes (tensor) within hosts"
            )


def resume(ckpt: Checkpointer, template: Any, workdir: str, lead: bool,
           name: str = "step", step: int | None = None) -> Any | None:
    """The checkpoint of `step` (default: the latest) restored into `template`'s shapes and
    shardings, or None if there is none. Metric rows logged after it are set aside
    (`train.metrics.drop_metrics_after`; all of them when starting afresh: a run killed
    before its first checkpoint leaves rows that would repeat). Checkpoints later than an
    explicit `step` are renamed `<step>.set-aside` (the run will save those steps again)."""
    if ckpt.latest_step() is None:
        if step is not None:
            raise UserError(f"config.checkpoint.restore_step={step}: there is no checkpoint "
                            f"in {ckpt.directory}")
        if lead:
            drop_metrics_after(workdir, 0)
        return None
    state = ckpt.restore(abstract_like(template), step)
    if step is not None and lead:
        ckpt.set_aside_after(step)
    if lead:
        print(f"resumed from {ckpt.directory} at {name} {int(state.step)}")
        drop_metrics_after(workdir, int(state.step))
    return state


@contextlib.contextmanager
def workdir_lock(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Creates `workdir` and holds an exclusive lock on `workdir/.lock` for the block, so
    that a second run on the same workdir refuses with a `UserError` naming the holder
    (pid, host, start time, command). The lock is an `fcntl.flock`, which the kernel drops
    when its process dies: a killed run never leaves it stuck (the next run says that it
    takes over from it). `enabled=False` (processes other than the first) only checks that
    the workdir can be created."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"config.workdir={workdir!r} cannot be created: "
                        f"{e.strerror or e}") from e
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise UserError(f"config.workdir={workdir!r} is not writable")
    if not enabled:
        yield
        return
    path = os.path.join(workdir, ".lock")
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = f.read().strip() or "unknown holder"
            raise UserError(f"config.workdir={workdir!r} is in use by another run ({holder}; "
                            f"lock {path}): wait for it to finish or use another workdir") from e
        f.seek(0)
        previous = f.read().strip()
        if previous:
            print(f"taking over {workdir} from a run that ended without releasing it "
                  f"({previous})")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv)[:200]}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        f.close()

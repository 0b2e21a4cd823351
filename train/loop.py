"""`run(config)`: the whole training job, top to bottom.

config -> mesh -> data -> state (init or restore) -> jitted step in a loop -> logs and
checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from tqdm.auto import tqdm

import optim
from model import LOGICAL_RULES, ModelConfig, Transformer
from model.sharding import batch_sharding, logical_to_sharding, make_mesh
from train import data as data_lib
from train import distributed
from train.checkpoint import Checkpointer, abstract_like
from train.errors import UserError
from train.flops import flops_per_token, peak_flops
from train.metrics import MetricWriter, to_python
from train.qkclip import make_qk_clip_hook
from train.step import StepOptions, TrainState, make_eval_step, make_train_step

# With `init_from`, the architecture comes from the checkpoint; these fields still come
# from `config.model` (they change how the model runs, not its parameters).
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "capacity_factor", "bias_update_rate",
                  "aux_loss_alpha", "max_seq_len")


def model_config(config: ConfigDict) -> ModelConfig:
    """`config.model` as a validated `ModelConfig` (errors name the field); with
    `config.init_from`, the imported checkpoint's architecture plus `RUNTIME_FIELDS`."""
    try:
        init_from = str(config.get("init_from", "") or "")
        if not init_from:
            return ModelConfig.from_dict(config.model.to_dict())
        fname = os.path.join(init_from, "model_config.json")
        if not os.path.exists(fname):
            raise UserError(
                f"config.init_from={init_from!r} is not a model checkpoint (no model_config.json; "
                "create one with `python -m model.hf import SRC DST`)"
            )
        with open(fname) as f:
            saved = json.load(f)
        saved.update({k: config.model[k] for k in RUNTIME_FIELDS})
        return ModelConfig.from_dict(saved)
    except (ValueError, TypeError) as e:
        raise UserError(f"config.model: {e}") from e


def load_init_from(path: str, state: TrainState, mesh) -> TrainState:
    """Replaces the fresh params / router biases by those of an imported checkpoint
    (`model.hf` Orbax format), each array in the state's dtype and sharding."""
    from model.hf.checkpoint import read_orbax

    try:
        _, variables = read_orbax(path, mesh)
    except Exception as e:  # a wrong directory or a tree that does not match
        raise UserError(f"config.init_from={path!r}: cannot read the checkpoint: {e}") from e

    def place(new, old):
        if new.shape != old.shape:
            raise UserError(f"config.init_from: shape {new.shape} does not match {old.shape}")
        return jax.device_put(new.astype(old.dtype), old.sharding)

    params = jax.tree.map(place, variables["params"], state.params)
    bias = state.router_bias
    if "router_bias" in variables and variables["router_bias"]:
        bias = jax.tree.map(place, variables["router_bias"], state.router_bias)
    return state.replace(params=params, router_bias=bias)


def build_mesh(config: ConfigDict):
    try:
        return make_mesh(dict(config.mesh.to_dict()))
    except ValueError as e:
        raise UserError(f"config.mesh: {e}") from e


def _path_keys(path) -> tuple[str, ...]:
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
    return tuple(out)


def opt_state_shardings(
    abstract_opt_state: Any, abstract_params: Any, param_shardings: Any, replicated
) -> Any:
    """Shardings for an optax state: a leaf whose path ends with a parameter's path and
    has its shape (Adam moments, Muon momentum, ... mirror the parameter tree) takes that
    parameter's sharding; everything else (step counters) is replicated."""
    flat_s = jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    flat_p = jax.tree.leaves(abstract_params)
    by_path = {_path_keys(p): (s, a.shape) for (p, s), a in zip(flat_s, flat_p, strict=True)}

    def pick(path, leaf):
        keys = _path_keys(path)
        for i in range(len(keys)):
            hit = by_path.get(keys[i:])
            if hit is not None and tuple(hit[1]) == tuple(leaf.shape):
                return hit[0]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


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
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    bias_shardings = jax.tree.map(lambda _: replicated, abstract.get("router_bias", {}))

    def _init(r):
        v = nn.unbox(model.init(r, dummy))
        return v["params"], v.get("router_bias", {})

    _init = jax.jit(_init, out_shardings=(param_shardings, bias_shardings))
    params, router_bias = _init(jax.random.fold_in(rng, 1))
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_shardings = opt_state_shardings(abstract_opt, params, param_shardings, replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    step, key, bad = jax.jit(
        lambda: (jnp.zeros((), jnp.int32), jax.random.PRNGKey(seed), jnp.zeros((), jnp.int32)),
        out_shardings=replicated,
    )()
    return TrainState(
        step=step, params=params, opt_state=opt_state, router_bias=router_bias, rng=key,
        bad_steps=bad,
    )


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


def _state_summary(cfg: ModelConfig, state: TrainState, mesh) -> str:
    counts = cfg.param_counts()
    n_dev = mesh.devices.size
    per_dev = 0
    for x in jax.tree.leaves((state.params, state.opt_state)):
        if hasattr(x, "addressable_shards") and x.addressable_shards:
            shard = x.addressable_shards[0].data
            per_dev += shard.size * shard.dtype.itemsize
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    return (
        f"mesh {sizes} over {n_dev} {jax.devices()[0].platform} device(s); params "
        f"{counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active/token; "
        f"params+optimizer {per_dev / 2**20:.1f} MiB per device"
    )


def _check_compat(cfg: ModelConfig, config: ConfigDict, tokens: data_lib.DataPipeline) -> None:
    if tokens.vocab_size > cfg.vocab_size:
        raise UserError(
            f"config.model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
            f"vocabulary ({tokens.vocab_size})"
        )
    if config.data.seq_len > cfg.max_seq_len:
        raise UserError(
            f"config.data.seq_len={config.data.seq_len} exceeds config.model.max_seq_len="
            f"{cfg.max_seq_len}"
        )


def run(config: ConfigDict) -> dict[str, Any]:
    """Trains per `config`; returns the last logged metrics. Resumes from the latest
    checkpoint in `config.workdir/checkpoints` when there is one."""
    cfg = model_config(config)
    distributed.initialize(config.get("distributed"))
    lead = jax.process_index() == 0  # the process that writes logs and prints
    steps = int(config.train.steps)
    if steps <= 0:
        raise UserError(f"config.train.steps={steps} must be > 0")
    mesh = build_mesh(config)
    bsz, seq = int(config.data.batch_size), int(config.data.seq_len)
    batch_div = int(np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert")]))
    if bsz % batch_div:
        raise UserError(
            f"config.data.batch_size={bsz} is not divisible by the data-parallel mesh size "
            f"{batch_div} (data x fsdp x expert)"
        )
    tokens = data_lib.DataPipeline(
        config.data, seq, bsz, int(config.seed), jax.process_index(), jax.process_count()
    )
    _check_compat(cfg, config, tokens)
    eval_sets = tokens.eval_batches(int(config.train.eval_batches))

    opt_cfg = ConfigDict(config.optim.to_dict())
    if opt_cfg.total_steps <= 0:
        opt_cfg.total_steps = steps
    if cfg.mup_base_d_model:
        opt_cfg.mup.enabled = True
        opt_cfg.mup.width_multiplier = cfg.width_multiplier
    elif opt_cfg.mup.enabled:
        raise UserError(
            "config.optim.mup.enabled needs config.model.mup_base_d_model (the base width); "
            "set that instead: the trainer derives the width multiplier from it"
        )
    model = Transformer(cfg)
    workdir = config.workdir
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        abstract_params = jax.eval_shape(
            lambda r: nn.unbox(model.init(r, jnp.zeros((1, seq), jnp.int32)))["params"],
            jax.random.PRNGKey(0),
        )
        try:
            tx = optim.build(opt_cfg, abstract_params)
            schedule = optim.build_schedule(opt_cfg)
        except ValueError as e:
            raise UserError(f"config.optim: {e}") from e
        state = init_state(model, tx, mesh, int(config.seed), seq)

        os.makedirs(workdir, exist_ok=True)
        ckpt = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            int(config.checkpoint.every),
            int(config.checkpoint.keep),
            bool(config.checkpoint.async_save),
        )
        start = ckpt.latest_step()
        if start is None and config.get("init_from", ""):
            state = load_init_from(str(config.init_from), state, mesh)
            if lead:
                print(f"initialized params from {config.init_from}")
        if start is not None:
            state = ckpt.restore(abstract_like(state))
            if lead:
                print(f"resumed from {ckpt.directory} at step {int(state.step)}")
                drop_metrics_after(workdir, int(state.step))
        if lead:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json(indent=2))
        summary = _state_summary(cfg, state, mesh)
        model_flops = flops_per_token(cfg, seq)
        peak, peak_src = peak_flops(cfg.dtype)
        summary += (f"\nMFU basis: {model_flops / 1e6:.2f} MFLOPs/token; "
                    f"peak {peak / 1e12:.3f} TFLOP/s ({peak_src})")
        if lead:
            print(summary)

        shardings = jax.tree.map(lambda x: x.sharding, state)
        data_sharding = batch_sharding(mesh)
        check_process_rows(data_sharding, bsz)
        batch_shardings = {
            k: data_sharding for k in ("inputs", "targets", "positions", "segment_ids", "mask")
        }
        options = StepOptions(
            grad_accum=int(config.train.grad_accum),
            z_loss=float(config.train.z_loss),
            skip_nonfinite=True,
        )
        if bsz % (options.grad_accum * batch_div):
            raise UserError(
                f"config.data.batch_size={bsz} is not divisible by config.train.grad_accum="
                f"{options.grad_accum} x the data-parallel mesh size {batch_div}"
            )
        hook = None
        if config.optim.qk_clip.enabled:
            try:
                hook = make_qk_clip_hook(cfg, float(config.optim.qk_clip.tau))
            except ValueError as e:
                raise UserError(f"config.optim.qk_clip: {e}") from e
        step_fn = jax.jit(
            make_train_step(model, tx, schedule, options, hook),
            in_shardings=(shardings, batch_shardings),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        eval_fn = jax.jit(make_eval_step(model), in_shardings=(shardings, batch_shardings))

        writer = MetricWriter(workdir, enabled=lead)
        log_every = max(int(config.train.log_every), 1)
        eval_every = int(config.train.eval_every)
        max_bad = int(config.train.max_bad_steps)
        ckpt_every = max(int(config.checkpoint.every), 1)
        first = int(state.step)
        bar = tqdm(total=steps, initial=first, disable=not (config.train.progress and lead),
                   dynamic_ncols=True, desc="train")
        last: dict[str, Any] = {}
        preempted: list[str] = []
        restore_signals = on_preemption(preempted)
        t0, tok0 = time.perf_counter(), 0
        metrics = None
        profile = tuple(int(x) for x in config.train.profile_steps)
        batches = tokens.batches(first)
        for step in range(first, steps):
            if profile and step == profile[0] and lead:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            if profile and step == profile[1] and lead:
                jax.profiler.stop_trace()
            batch = global_batch(next(batches), batch_shardings)
            state, metrics = step_fn(state, batch)
            tok0 += bsz * seq
            done = step + 1
            if done % log_every == 0 or done == steps:
                if max_bad and int(state.bad_steps) >= max_bad:
                    ckpt.close()
                    raise UserError(
                        f"aborting at step {done}: {int(state.bad_steps)} steps in a row had a "
                        "non-finite loss or gradient (updates skipped; checkpoints kept). Lower "
                        "config.optim.lr or change config.train.max_bad_steps"
                    )
                m = to_python(jax.device_get(metrics))
                dt = time.perf_counter() - t0
                m["tokens_per_s"] = tok0 / max(dt, 1e-9)
                m["mfu"] = m["tokens_per_s"] * model_flops / peak
                if eval_every > 0 and (done % eval_every == 0 or done == steps):
                    m["eval_loss"] = _evaluate(eval_fn, state, eval_sets, batch_shardings)
                writer.write(done, m)
                last = {"step": done, **m}
                bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}")
                t0, tok0 = time.perf_counter(), 0
            bar.update(1)
            stop = should_stop(preempted, done % log_every == 0)
            if done % ckpt_every == 0 or done == steps or stop:
                ckpt.save(done, state, force=True)
            if stop:
                if lead:
                    print(f"\nreceived {stop}: saved step {done}; rerun the command to resume")
                break
        bar.close()
        restore_signals()
        ckpt.close()
        writer.close()
    if lead:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(last, f, indent=2)
    return last


def should_stop(flag: list[str], sync_point: bool) -> str:
    """The preemption decision, identical on every process: single-process runs read the
    local flag every step; multi-process runs agree (any process signalled) at log steps."""
    if jax.process_count() == 1:
        return flag[0] if flag else ""
    if not sync_point:
        return ""
    from jax.experimental import multihost_utils

    any_flag = multihost_utils.process_allgather(np.array([1 if flag else 0], np.int32))
    return "a preemption signal" if int(np.max(any_flag)) else ""


def on_preemption(flag: list[str]):
    """SIGTERM/SIGINT set `flag` (the loop saves a checkpoint and stops after the current
    step) instead of killing the process; returns a function restoring the old handlers."""
    old = {}

    def handler(signum, frame):
        flag.append(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, handler)

    def restore():
        for sig, h in old.items():
            signal.signal(sig, h)

    return restore


def drop_metrics_after(workdir: str, step: int) -> None:
    """On resume, rows logged after the restored step (by a run that died before its next
    checkpoint) are moved to `metrics.jsonl.stale` so that the curve is not duplicated."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep, stale = [], []
    for line in lines:
        try:
            (keep if json.loads(line)["step"] <= step else stale).append(line)
        except (ValueError, KeyError):
            stale.append(line)  # a line cut short by a kill
    if stale:
        with open(path + ".stale", "a") as f:
            f.writelines(stale)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)


def _evaluate(eval_fn, state, eval_sets, shardings) -> float:
    total, count = 0.0, 0.0
    for b in eval_sets:
        out = eval_fn(state, global_batch(b, shardings))
        total += float(out["loss_sum"])
        count += float(out["tokens"])
    return total / max(count, 1.0)

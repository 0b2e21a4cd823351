"""`run(config)`: the whole RL job, top to bottom.

config -> task -> mesh -> state (resume, or init / `config.init_from` (a `model.hf`
import, as in pretraining) / `rl.init_from` (a training or RL run's checkpoint), then the
optional supervised warm-up) -> the jitted `rl_step` in a loop -> logs, greedy held-out
evaluation and checkpoints.

Files under `config.workdir`: `metrics.jsonl` + TensorBoard (`tb/`), `config.json`,
`checkpoints/` (the `RLState`, step = RL step; step 0 = the policy RL starts from),
`final_metrics.json`, and for the warm-up `warmup/metrics.jsonl` + `warmup/tb/` (step =
warm-up step) and `warmup/checkpoints/` (its `TrainState`). `eval_accuracy` (greedy,
held-out prompts) is logged in both phases; RL's row 0 is where the warm-up ended.
Running the same command again resumes from the latest checkpoint (RL, or the warm-up
when RL has not started).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import ConfigDict
from tqdm.auto import tqdm

import optim
from model import LOGICAL_RULES, Transformer
from model.sharding import batch_sharding
from rl import losses
from rl.sampling import EOS
from rl.step import (
    RLOptions,
    RLState,
    demo_batch,
    eval_prompts,
    make_eval_fn,
    make_rl_step,
    train_prompts,
)
from rl.tasks import make_task
from train import distributed
from train.checkpoint import Checkpointer, abstract_like
from train.errors import UserError
from train.loop import (
    build_mesh,
    drop_metrics_after,
    global_batch,
    init_state,
    load_init_from,
    model_config,
    on_preemption,
    opt_state_shardings,
    should_stop,
)
from train.metrics import MetricWriter, to_python
from train.qkclip import make_qk_clip_hook
from train.step import StepOptions, TrainState, make_train_step

__all__ = ["latest_checkpoint", "make_options", "make_task_from_config", "restore_variables", "run"]


# ------------------------------------------------------------------------ config -> objects
def make_task_from_config(r: ConfigDict):
    """The task of `config.rl` (`rl.task` with its fields from `rl.tasks.<task>`)."""
    name = r.task
    fields = r.tasks.get(name) if name in r.tasks else None
    try:
        return make_task(name, **(fields.to_dict() if fields is not None else {}))
    except (ValueError, TypeError) as e:
        raise UserError(f"config.rl.task / config.rl.tasks.{name}: {e}") from e


def _tristate(value: Any, key: str, auto: bool) -> bool:
    v = str(value).lower()
    if v == "auto":
        return auto
    if v in ("on", "true", "1"):
        return True
    if v in ("off", "false", "0"):
        return False
    raise UserError(f"config.rl.{key}={value!r} must be 'auto', 'on' or 'off'")


def make_options(r: ConfigDict, task) -> RLOptions:
    """`RLOptions` from `config.rl` (errors name the key)."""
    if r.loss not in losses.LOSSES:
        raise UserError(f"config.rl.loss={r.loss!r} is not one of {tuple(losses.LOSSES)}")
    n = int(r.max_new_tokens) or int(task.min_new_tokens)
    dapo = r.loss == "dapo"
    overlong = int(r.overlong_cache_len)
    try:
        return RLOptions(
            n_prompts=int(r.n_prompts), group_size=int(r.group_size), max_new_tokens=n,
            temperature=float(r.temperature), top_k=int(r.top_k), top_p=float(r.top_p),
            loss=r.loss,
            eps_lo=None if float(r.eps_lo) < 0 else float(r.eps_lo),
            eps_hi=None if float(r.eps_hi) < 0 else float(r.eps_hi),
            beta=float(r.beta), tis=bool(r.tis), tis_cap=float(r.tis_cap),
            updates_per_batch=int(r.updates_per_batch), minibatches=int(r.minibatches),
            dynamic_sampling=_tristate(r.dynamic_sampling, "dynamic_sampling", dapo),
            overlong_cache_len=(max(n // 4, 1) if dapo else 0) if overlong < 0 else overlong,
            normalize_adv_std=_tristate(r.adv_std, "adv_std", r.loss != "dr_grpo"),
            holdout_modulus=int(r.holdout_modulus),
        )
    except ValueError as e:
        raise UserError(f"config.rl: {e}") from e


# ------------------------------------------------------------------------ checkpoints
def latest_checkpoint(directory: str) -> int | None:
    """The latest finished step saved under an Orbax checkpoint directory (None if none)."""
    if not os.path.isdir(directory):
        return None
    steps = [int(d) for d in os.listdir(directory)
             if d.isdigit() and os.path.isdir(os.path.join(directory, d, "default"))]
    return max(steps) if steps else None


def restore_variables(
    directory: str, abstract: dict[str, Any], step: int | None = None
) -> dict[str, Any]:
    """Restores only `abstract`'s entries (e.g. `{'params': ..., 'router_bias': ...}` as
    `jax.ShapeDtypeStruct`s with shardings) from a checkpoint of a training or RL run
    (`step`, default the latest): `directory` is a workdir (its `checkpoints/`, else
    `warmup/checkpoints/`) or a checkpoint directory. The rest of the saved state
    (optimizer, ...) is not read, so any optimizer works. Mismatched shapes or a missing
    checkpoint raise `UserError`."""
    for d in (os.path.join(directory, "checkpoints"),
              os.path.join(directory, "warmup", "checkpoints"), directory):
        latest = latest_checkpoint(d)
        if latest is not None:
            step = latest if step is None else step
            break
    else:
        raise UserError(f"no checkpoint found under {directory!r} (looked in checkpoints/, "
                        "warmup/checkpoints/ and the directory itself)")
    if not os.path.isdir(os.path.join(d, str(step), "default")):
        raise UserError(f"no checkpoint of step {step} in {d}")
    path = os.path.join(os.path.abspath(d), str(step), "default")
    abstract = {k: v for k, v in abstract.items() if jax.tree.leaves(v)}
    try:
        with ocp.PyTreeCheckpointer() as ck:
            out = ck.restore(path, args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=True))
    except Exception as e:  # orbax raises many types for unreadable / mismatched trees
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot restore the model variables from {path} (saved by a "
                        f"different model config?): {type(e).__name__}: {first[:300]}") from e
    for k, v in abstract.items():
        got = jax.tree.map(lambda x: (x.shape, x.dtype), out[k])
        want = jax.tree.map(lambda x: (x.shape, x.dtype), v)
        if got != want:
            raise UserError(f"checkpoint {path}: '{k}' shapes differ from the configured model")
    return out


# ------------------------------------------------------------------------------- run
def run(config: ConfigDict) -> dict[str, Any]:
    """RL per `config`; returns the last logged metrics. Resumes from the latest
    checkpoint in `config.workdir` when there is one."""
    cfg = model_config(config)
    r = config.rl
    task = make_task_from_config(r)
    opts = make_options(r, task)
    distributed.initialize(config.get("distributed"))
    lead = jax.process_index() == 0
    steps = int(config.train.steps)
    if steps <= 0:
        raise UserError(f"config.train.steps={steps} must be > 0")
    mesh = build_mesh(config)
    dp = int(np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert")]))
    mb = opts.batch_size // opts.minibatches
    if mb % dp:
        raise UserError(
            f"the RL minibatch config.rl.n_prompts x group_size / minibatches = {mb} is not "
            f"divisible by the data-parallel mesh size {dp} (data x fsdp x expert)")
    n_eval, wsteps, wbs = int(r.eval_prompts), int(r.warmup_steps), int(r.warmup_batch_size)
    if n_eval < 1 or n_eval % dp:
        raise UserError(f"config.rl.eval_prompts={n_eval} must be a positive multiple of the "
                        f"data-parallel mesh size {dp}")
    if wsteps < 0 or (wsteps and (wbs < 1 or wbs % dp)):
        raise UserError(f"config.rl.warmup_steps={wsteps} must be >= 0 and "
                        f"config.rl.warmup_batch_size={wbs} a positive multiple of {dp}")
    seq = int(task.prompt_width) + opts.max_new_tokens
    if seq > cfg.max_seq_len:
        raise UserError(
            f"the task's prompt width {task.prompt_width} + config.rl.max_new_tokens "
            f"{opts.max_new_tokens} = {seq} exceeds config.model.max_seq_len={cfg.max_seq_len}")
    if cfg.vocab_size <= EOS:
        raise UserError(f"config.model.vocab_size={cfg.vocab_size} must exceed the byte "
                        f"tokenizer's EOS id {EOS}")
    try:
        ev = eval_prompts(task, int(r.eval_seed), n_eval, opts.holdout_modulus)
    except ValueError as e:
        raise UserError(f"config.rl.eval_prompts: {e}") from e

    opt_cfg = ConfigDict(config.optim.to_dict())
    per_step = opts.updates_per_batch * opts.minibatches
    if opt_cfg.total_steps <= 0:
        opt_cfg.total_steps = steps * per_step
    model = Transformer(cfg)
    workdir = config.workdir
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        abstract_params = jax.eval_shape(
            lambda k: nn.unbox(model.init(k, jnp.zeros((1, seq), jnp.int32)))["params"],
            jax.random.PRNGKey(0))
        try:
            tx = optim.build(opt_cfg, abstract_params)
            schedule = optim.build_schedule(opt_cfg)
        except ValueError as e:
            raise UserError(f"config.optim: {e}") from e
        hook = None
        if config.optim.qk_clip.enabled:
            try:
                hook = make_qk_clip_hook(cfg, float(config.optim.qk_clip.tau))
            except ValueError as e:
                raise UserError(f"config.optim.qk_clip: {e}") from e

        os.makedirs(workdir, exist_ok=True)
        if lead:
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json(indent=2))
        ckpt_every = max(int(config.checkpoint.every), 1)
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), ckpt_every,
                            int(config.checkpoint.keep), bool(config.checkpoint.async_save))

        eval_jit = jax.jit(make_eval_fn(model, task, opts.max_new_tokens))
        eval_sets = {"eval": _place(ev, mesh)}
        if wsteps and float(r.warmup_target_accuracy) > 0:  # fixed training-split prompts
            tr = jax.device_get(train_prompts(task, jax.random.PRNGKey(int(r.eval_seed) + 1),
                                              n_eval, opts.holdout_modulus))
            eval_sets["train"] = _place(tr, mesh)

        def evaluate(params, router_bias, split: str = "eval") -> dict[str, Any]:
            out = to_python(jax.device_get(eval_jit(params, router_bias, *eval_sets[split])))
            return out if split == "eval" else {"train_accuracy": out["eval_accuracy"]}

        base = init_state(model, tx, mesh, int(config.seed), seq)
        template = RLState(step=base.step, params=base.params, opt_state=base.opt_state,
                           router_bias=base.router_bias, rng=base.rng, bad_steps=base.bad_steps,
                           ref=_ref(base.params, base.router_bias, opts.beta))
        preempted: list[str] = []
        restore_signals = on_preemption(preempted)
        start = ckpt.latest_step()
        if start is not None:
            state = ckpt.restore(abstract_like(template))
            if lead:
                print(f"resumed from {ckpt.directory} at RL step {int(state.step)}")
                drop_metrics_after(workdir, int(state.step))
        else:
            if config.get("init_from", ""):  # a `python -m model.hf import` checkpoint
                base = load_init_from(str(config.init_from), base, mesh)
                if lead:
                    print(f"initialized the policy from {config.init_from}")
            params, router_bias = base.params, base.router_bias
            if r.init_from:
                got = restore_variables(r.init_from, abstract_like(
                    {"params": params, "router_bias": router_bias}))
                params, router_bias = got["params"], got.get("router_bias", router_bias)
                if lead:
                    print(f"initialized the policy from {r.init_from}")
            if wsteps:
                params, router_bias = _warmup(config, model, task, opts, mesh, params,
                                              router_bias, hook, evaluate, preempted, lead)
                if params is None:  # preempted during the warm-up (saved)
                    restore_signals()
                    ckpt.close()
                    return {}
            shardings = jax.tree.map(lambda x: x.sharding, base.opt_state)
            opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
            state = template.replace(params=params, router_bias=router_bias, opt_state=opt_state,
                                     ref=_ref(params, router_bias, opts.beta))
            if lead:
                drop_metrics_after(workdir, 0)  # rows of an earlier attempt that never saved
            first_eval = evaluate(state.params, state.router_bias)
            ckpt.save(0, state, force=True)
            if lead:
                print(f"RL starts at greedy held-out accuracy {first_eval['eval_accuracy']:.3f}")
        writer = MetricWriter(workdir, enabled=lead)  # after drop_metrics_after rewrote it
        if start is None:
            writer.write(0, first_eval)
        if lead:
            print(_summary(cfg, opts, mesh, task))

        shardings = jax.tree.map(lambda x: x.sharding, state)
        rl_step = make_rl_step(model, tx, task, opts, schedule, hook)
        step_fn = jax.jit(lambda s: rl_step(s, jax.random.fold_in(s.rng, s.step)),
                          in_shardings=(shardings,), out_shardings=(shardings, None),
                          donate_argnums=0)

        log_every = max(int(config.train.log_every), 1)
        eval_every = int(r.eval_every)
        max_bad = int(config.train.max_bad_steps)
        first = int(state.step)
        bar = tqdm(total=steps, initial=first, disable=not (config.train.progress and lead),
                   dynamic_ncols=True, desc="rl")
        last: dict[str, Any] = {}
        t0, n0 = time.perf_counter(), 0
        for step in range(first, steps):
            state, metrics = step_fn(state)
            n0 += 1
            done = step + 1
            is_eval = eval_every > 0 and done % eval_every == 0 or done == steps
            if done % log_every == 0 or is_eval:
                m = to_python(jax.device_get(metrics))
                m["step_s"] = (time.perf_counter() - t0) / n0
                m["samples_per_s"] = opts.batch_size / max(m["step_s"], 1e-9)
                if max_bad and int(state.bad_steps) >= max_bad:
                    ckpt.close()
                    raise UserError(
                        f"aborting at RL step {done}: {int(state.bad_steps)} steps in a row had "
                        "a non-finite loss or gradient (updates skipped; checkpoints kept). "
                        "Lower config.optim.lr or change config.train.max_bad_steps")
                if is_eval:
                    m.update(evaluate(state.params, state.router_bias))
                writer.write(done, m)
                last = {"step": done, **m}
                post = dict(reward=f"{m['reward_mean']:.3f}", acc=f"{m['accuracy']:.3f}")
                if "eval_accuracy" in m:
                    post["eval_acc"] = f"{m['eval_accuracy']:.3f}"
                bar.set_postfix(post)
                t0, n0 = time.perf_counter(), 0
            bar.update(1)
            stop = should_stop(preempted, done % log_every == 0)
            if done % ckpt_every == 0 or done == steps or stop:
                ckpt.save(done, state, force=True)
            if stop:
                if lead:
                    print(f"\nreceived {stop}: saved RL step {done}; rerun the command to resume")
                break
        bar.close()
        restore_signals()
        ckpt.close()
        writer.close()
    if lead and last:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(last, f, indent=2)
    return last


def _ref(params, router_bias, beta: float):
    """The frozen reference policy: a copy of (params, router_bias) when beta > 0."""
    if beta <= 0:
        return {}
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(
        {"params": params, "router_bias": router_bias})


def _summary(cfg, opts: RLOptions, mesh, task) -> str:
    counts = cfg.param_counts()
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    return (f"RL {opts.loss} on {type(task).__name__}: {opts.n_prompts} prompts x G="
            f"{opts.group_size}, N={opts.max_new_tokens} new tokens, mu="
            f"{opts.updates_per_batch} x {opts.minibatches} minibatch(es); model "
            f"{counts['total'] / 1e6:.2f}M params; mesh {sizes}")


def _place(split, mesh):
    """Host (prompts, lens, answer) -> global arrays sharded on the batch axis."""
    prompts, lens, answer = split
    arrays = {"prompts": prompts, "lens": lens, **{f"answer/{k}": v for k, v in answer.items()}}
    arrays = global_batch({k: np.asarray(v) for k, v in arrays.items()},
                          {k: batch_sharding(mesh, np.ndim(v)) for k, v in arrays.items()})
    ans = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("answer/")}
    return arrays["prompts"], arrays["lens"], ans


def _warmup(config, model, task, opts: RLOptions, mesh, params, router_bias, hook, evaluate,
            preempted, lead):
    """Supervised warm-up on task demonstrations (prompt -> answer + EOS, loss on the
    answer tokens only) with `train.step.make_train_step`: the same model, a fresh
    optimizer = config.optim with `rl.warmup_lr` and `rl.warmup_schedule` over
    `rl.warmup_steps` (linear warm-up over the first 10%). With
    `rl.warmup_target_accuracy` > 0 it stops at the first evaluation (every
    `rl.eval_every` steps) where the greedy accuracy on fixed training-split prompts
    reaches the target. Logs to `workdir/warmup/metrics.jsonl` (+ `tb/`); resumable
    (`workdir/warmup/checkpoints`). Returns the final (params, router_bias), or Nones
    when a preemption stopped it."""
    r = config.rl
    w_total, bs = int(r.warmup_steps), int(r.warmup_batch_size)
    target = float(r.warmup_target_accuracy)
    wcfg = ConfigDict(config.optim.to_dict())
    wcfg.lr = float(r.warmup_lr)
    wcfg.schedule = r.warmup_schedule
    wcfg.total_steps = w_total
    wcfg.warmup_steps = min(max(w_total // 10, 1), w_total - 1)
    try:
        wtx = optim.build(wcfg, params)
        wsched = optim.build_schedule(wcfg)
    except ValueError as e:
        raise UserError(f"config.rl.warmup_* (warm-up optimizer): {e}") from e
    try:  # fail early (no demonstrations, answers too long)
        jax.eval_shape(lambda k: demo_batch(task, k, bs, opts.max_new_tokens,
                                            opts.holdout_modulus), jax.random.PRNGKey(0))
    except ValueError as e:
        raise UserError(f"config.rl.warmup_steps: {e}") from e
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    p_shard = jax.tree.map(lambda x: x.sharding, params)
    o_shard = opt_state_shardings(jax.eval_shape(wtx.init, params), params, p_shard, replicated)

    def scalar(x):
        return jax.device_put(x, replicated)

    state = TrainState(
        step=scalar(jnp.zeros((), jnp.int32)), params=params,
        opt_state=jax.jit(wtx.init, out_shardings=o_shard)(params), router_bias=router_bias,
        rng=scalar(jax.random.PRNGKey(int(config.seed) + 1)),
        bad_steps=scalar(jnp.zeros((), jnp.int32)))
    wdir = os.path.join(config.workdir, "warmup")
    every = max(int(config.checkpoint.every), 1)
    ckpt = Checkpointer(os.path.join(wdir, "checkpoints"), every, int(config.checkpoint.keep),
                        bool(config.checkpoint.async_save))
    if ckpt.latest_step() is not None:
        state = ckpt.restore(abstract_like(state))
        if lead:
            print(f"resumed the warm-up from {ckpt.directory} at step {int(state.step)}")
            drop_metrics_after(wdir, int(state.step))
    train_step = make_train_step(model, wtx, wsched, StepOptions(), hook)

    def wstep(s: TrainState):
        key = jax.random.fold_in(s.rng, s.step)
        return train_step(s, demo_batch(task, key, bs, opts.max_new_tokens, opts.holdout_modulus))

    shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jax.jit(wstep, in_shardings=(shardings,), out_shardings=(shardings, None),
                      donate_argnums=0)
    writer = MetricWriter(wdir, enabled=lead)
    log_every = max(int(config.train.log_every), 1)
    eval_every = int(r.eval_every)
    first = int(state.step)
    bar = tqdm(total=w_total, initial=first, dynamic_ncols=True, desc="warm-up",
               disable=not (config.train.progress and lead))
    stopped = None
    for w in range(first, w_total):
        state, metrics = step_fn(state)
        done = w + 1
        is_eval = eval_every > 0 and done % eval_every == 0 or done == w_total
        reached = False
        if done % log_every == 0 or is_eval:
            m = {k: v for k, v in to_python(jax.device_get(metrics)).items()
                 if not isinstance(v, list)}
            if is_eval:
                m.update(evaluate(state.params, state.router_bias))
                if target > 0:
                    m.update(evaluate(state.params, state.router_bias, "train"))
                    reached = m["train_accuracy"] >= target
            writer.write(done, m)
            bar.set_postfix(loss=f"{m['loss']:.3f}")
        bar.update(1)
        stop = should_stop(preempted, done % log_every == 0)
        if done % every == 0 or done == w_total or stop or reached:
            ckpt.save(done, state, force=True)
        if reached:
            if lead:
                print(f"\nwarm-up reached train_accuracy {m['train_accuracy']:.3f} >= "
                      f"{target} at step {done}")
            break
        if stop:
            if lead:
                print(f"\nreceived {stop}: saved warm-up step {done}; rerun the command to resume")
            stopped = stop
            break
    bar.close()
    ckpt.close()
    writer.close()
    if stopped:
        return None, None
    return state.params, state.router_bias

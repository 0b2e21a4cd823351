"""The RL job, `run(config)`, top to bottom.

config -> task -> mesh -> state (resume, or init / `config.init_from` (a `model.hf`
import or any job's workdir, as in pretraining: its architecture replaces `config.model`) /
`rl.init_from` (a training or RL run's checkpoint, into `config.model`'s architecture), then the
optional supervised warm-up) -> the jitted `rl_step`, run by `train.runner.run_steps` ->
logs, greedy held-out evaluation and checkpoints.

Files under `config.workdir`: `metrics.jsonl` + TensorBoard (`tb/`), `config.json`,
`checkpoints/` (the `RLState`, step = RL step; step 0 = the policy RL starts from),
`final_metrics.json`, and for the warm-up `warmup/metrics.jsonl` + `warmup/tb/` (step =
warm-up step) and `warmup/checkpoints/` (its `TrainState`). `eval_accuracy` (greedy,
held-out prompts) is logged in both phases; RL's row 0 is where the warm-up ended.
Running the same command again resumes from the latest checkpoint (RL, or the warm-up
when RL has not started).
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

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
from train import distributed, setup
from train.checkpoint import abstract_like
from train.errors import UserError
from train.metrics import MetricWriter, to_python
from train.runner import Cadence, Job, on_preemption, run_steps, write_final_metrics
from train.setup import restore_variables  # re-exported: its home is train.setup
from train.step import StepOptions, TrainState, make_train_step
from train.validate import validate

__all__ = ["make_options", "make_task_from_config", "restore_variables", "run"]


# ------------------------------------------------------------------------ config -> objects
def make_task_from_config(r: ConfigDict):
    """The task of `config.rl` (`rl.task` with its fields from `rl.tasks.<task>`)."""
    name = r.task
    fields = r.tasks.get(name) if name in r.tasks else None
    try:
        return make_task(name, **(fields.to_dict() if fields is not None else {}))
    except (ValueError, TypeError) as e:
        raise UserError(f"config.rl.task / config.rl.tasks.{name}: {e}") from e


def _auto(value: Any, key: str, auto: bool) -> bool:
    """A boolean option whose None means `auto` (the loss's convention)."""
    if value is None:
        return auto
    if isinstance(value, bool):
        return value
    raise UserError(f"config.rl.{key}={value!r} must be None (auto), True or False")


def _maybe(value: Any) -> float | None:
    return None if value is None else float(value)


def make_options(r: ConfigDict, task) -> RLOptions:
    """`RLOptions` from `config.rl` (errors name the key); None picks the loss's default."""
    if r.loss not in losses.LOSSES:
        raise UserError(f"config.rl.loss={r.loss!r} is not one of {tuple(losses.LOSSES)}")
    n = int(r.max_new_tokens or task.min_new_tokens)
    dapo = r.loss == "dapo"
    overlong = r.overlong_cache_len
    try:
        return RLOptions(
            n_prompts=int(r.n_prompts), group_size=int(r.group_size), max_new_tokens=n,
            temperature=float(r.temperature), top_k=int(r.top_k), top_p=float(r.top_p),
            loss=r.loss, eps_lo=_maybe(r.eps_lo), eps_hi=_maybe(r.eps_hi),
            beta=float(r.beta), tis=bool(r.tis), tis_cap=float(r.tis_cap),
            updates_per_batch=int(r.updates_per_batch), minibatches=int(r.minibatches),
            dynamic_sampling=_auto(r.dynamic_sampling, "dynamic_sampling", dapo),
            overlong_cache_len=(max(n // 4, 1) if dapo else 0) if overlong is None else int(overlong),
            normalize_adv_std=_auto(r.adv_std, "adv_std", r.loss != "dr_grpo"),
            dr_grpo_constant=bool(r.get("dr_grpo_constant", False)),
            holdout_modulus=int(r.holdout_modulus),
        )
    except ValueError as e:
        raise UserError(f"config.rl: {e}") from e


# ------------------------------------------------------------------------------- run
def run(config: ConfigDict) -> dict[str, Any]:
    """RL per `config`; returns the last logged metrics. Resumes from the latest
    checkpoint in `config.workdir` when there is one."""
    validate(config)  # every numeric field, before anything is written
    cfg = setup.model_config(config)
    r = config.rl
    task = make_task_from_config(r)
    opts = make_options(r, task)
    distributed.initialize(config.get("distributed"))
    lead = jax.process_index() == 0
    steps = setup.total_steps(config)
    mesh = setup.build_mesh(config)
    seq = _check(config, cfg, opts, task, setup.data_parallel_size(mesh))
    attention = setup.attention_backend(cfg, seq)
    try:
        ev = eval_prompts(task, int(r.eval_seed), int(r.eval_prompts), opts.holdout_modulus)
    except ValueError as e:
        raise UserError(f"config.rl.eval_prompts: {e}") from e
    opt_cfg = ConfigDict(config.optim.to_dict())
    if opt_cfg.total_steps is None or opt_cfg.total_steps <= 0:
        opt_cfg.total_steps = steps * opts.updates_per_batch * opts.minibatches
    model = Transformer(cfg, mesh=mesh)
    workdir = config.workdir
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):  # errors before any write
        tx, schedule = setup.build_optimizer(opt_cfg, setup.abstract_params(model, seq))
        hook = setup.qk_clip_hook(config, cfg)
    with (setup.workdir_lock(workdir, lead), jax.set_mesh(mesh),
          nn.logical_axis_rules(LOGICAL_RULES)):
        if lead:
            setup.write_config(workdir, config)
        ckpt = setup.checkpointer(config, os.path.join(workdir, "checkpoints"))
        evaluate = _evaluator(config, model, task, opts, mesh, ev)
        base = setup.init_state(model, tx, mesh, int(config.seed), seq)
        template = RLState(step=base.step, params=base.params, opt_state=base.opt_state,
                           router_bias=base.router_bias, rng=base.rng, bad_steps=base.bad_steps,
                           ref=_ref(base.params, base.router_bias, opts.beta))
        with on_preemption() as preempted:
            state = setup.resume(ckpt, template, workdir, lead, "RL step",
                                 step=config.checkpoint.get("restore_step"))
            first_eval = None
            if state is None:
                params, router_bias = _initial_policy(config, model, task, opts, mesh, base,
                                                      hook, evaluate, preempted, lead)
                state = template.replace(
                    params=params, router_bias=router_bias,
                    opt_state=setup.init_opt_state(tx, params, mesh),
                    ref=_ref(params, router_bias, opts.beta))
                first_eval = evaluate(state.params, state.router_bias)
                ckpt.save(0, state, force=True)
                if lead:
                    print(f"RL starts at greedy held-out accuracy "
                          f"{first_eval['eval_accuracy']:.3f}")
            writer = MetricWriter(workdir, enabled=lead)  # after resume set stale rows aside
            if first_eval is not None:
                writer.write(0, first_eval)
            if lead:
                print(_summary(cfg, opts, mesh, task) + "\n" + attention)
            out = run_steps(
                state, _rl_job(model, tx, task, opts, schedule, hook, state, evaluate),
                Cadence.from_config(config, steps, int(r.eval_every)), ckpt, writer,
                preempted=preempted, progress=bool(config.train.progress), lead=lead,
                desc="rl")
        if lead and out.last:  # a rerun of a finished run logs nothing and keeps the file
            write_final_metrics(workdir, out.last)
    return out.last


def _check(config: ConfigDict, cfg, opts: RLOptions, task, dp: int) -> int:
    """Validates the batch sizes against the mesh and the lengths against the model;
    returns the sequence length (prompt width + completion budget)."""
    r = config.rl
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
    return seq


def _evaluator(config: ConfigDict, model, task, opts: RLOptions, mesh, ev):
    """`evaluate(params, router_bias, split='eval')`: greedy accuracy on the held-out
    prompts `ev` ('eval'), or, for the warm-up's target, on fixed training-split prompts
    ('train', reported as `train_accuracy`)."""
    r = config.rl
    eval_jit = jax.jit(make_eval_fn(model, task, opts.max_new_tokens))
    eval_sets = {"eval": _place(ev, mesh)}
    if int(r.warmup_steps) and float(r.warmup_target_accuracy) > 0:
        tr = jax.device_get(train_prompts(task, jax.random.PRNGKey(int(r.eval_seed) + 1),
                                          int(r.eval_prompts), opts.holdout_modulus))
        eval_sets["train"] = _place(tr, mesh)

    def evaluate(params, router_bias, split: str = "eval") -> dict[str, Any]:
        out = to_python(jax.device_get(eval_jit(params, router_bias, *eval_sets[split])))
        return out if split == "eval" else {"train_accuracy": out["eval_accuracy"]}

    return evaluate


def _initial_policy(config, model, task, opts, mesh, base: TrainState, hook, evaluate,
                    preempted, lead):
    """(params, router_bias) RL starts from: fresh, `config.init_from` (a `model.hf`
    import or a run's workdir), `rl.init_from` (a run's checkpoint), then the optional
    warm-up."""
    r = config.rl
    if config.get("init_from", ""):
        base = setup.load_init_from(str(config.init_from), base, mesh)
        if lead:
            print(f"initialized the policy from {config.init_from}")
    params, router_bias = base.params, base.router_bias
    if r.init_from:
        got = restore_variables(r.init_from, abstract_like(
            {"params": params, "router_bias": router_bias}), key="config.rl.init_from")
        params, router_bias = got["params"], got.get("router_bias", router_bias)
        if lead:
            print(f"initialized the policy from {r.init_from}")
    if int(r.warmup_steps):
        return _warmup(config, model, task, opts, mesh, params, router_bias, hook, evaluate,
                       preempted, lead)
    return params, router_bias


def _rl_job(model, tx, task, opts: RLOptions, schedule, hook, state: RLState, evaluate) -> Job:
    """The runner's view of the RL step: one jitted `rl_step` per RL step."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    rl_step = make_rl_step(model, tx, task, opts, schedule, hook)
    step_fn = jax.jit(lambda s: rl_step(s, jax.random.fold_in(s.rng, s.step)),
                      in_shardings=(shardings,), out_shardings=(shardings, None),
                      donate_argnums=0)

    def row(m: dict[str, Any], n: int, seconds: float) -> dict[str, Any]:
        m["step_s"] = seconds / n
        m["samples_per_s"] = opts.batch_size / max(m["step_s"], 1e-9)
        return m

    postfix = {"reward": "reward_mean", "acc": "accuracy", "eval_acc": "eval_accuracy"}
    return Job(step=lambda s, i: step_fn(s), name="RL step", row=row, postfix=postfix,
               evaluate=lambda s: evaluate(s.params, s.router_bias))


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
    arrays = setup.global_batch({k: np.asarray(v) for k, v in arrays.items()},
                                {k: batch_sharding(mesh, np.ndim(v)) for k, v in arrays.items()})
    ans = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("answer/")}
    return arrays["prompts"], arrays["lens"], ans


# ------------------------------------------------------------------------------- warm-up
def _warmup(config, model, task, opts: RLOptions, mesh, params, router_bias, hook, evaluate,
            preempted, lead):
    """Supervised warm-up on task demonstrations (prompt -> answer + EOS, loss on the
    answer tokens only) with `train.step.make_train_step`: the same model, a fresh
    optimizer = config.optim with `rl.warmup_lr` and `rl.warmup_schedule` over
    `rl.warmup_steps` (linear warm-up over the first 10%). With
    `rl.warmup_target_accuracy` > 0 it stops at the first evaluation (every
    `rl.eval_every` steps) where the greedy accuracy on fixed training-split prompts
    reaches the target. Logs to `workdir/warmup/metrics.jsonl` (+ `tb/`); resumable
    (`workdir/warmup/checkpoints`). Returns the final (params, router_bias)."""
    r = config.rl
    w_total, bs = int(r.warmup_steps), int(r.warmup_batch_size)
    target = float(r.warmup_target_accuracy)
    wcfg = ConfigDict(config.optim.to_dict())
    wcfg.lr = float(r.warmup_lr)
    wcfg.schedule = r.warmup_schedule
    wcfg.total_steps = w_total
    wcfg.warmup_steps = min(max(w_total // 10, 1), w_total - 1)
    wtx, wsched = setup.build_optimizer(wcfg, params, "config.rl.warmup_* (warm-up optimizer)")
    try:  # fail early (no demonstrations, answers too long)
        jax.eval_shape(lambda k: demo_batch(task, k, bs, opts.max_new_tokens,
                                            opts.holdout_modulus), jax.random.PRNGKey(0))
    except ValueError as e:
        raise UserError(f"config.rl.warmup_steps: {e}") from e
    replicated = setup.replicated_sharding(mesh)
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
        opt_state=setup.init_opt_state(wtx, params, mesh), router_bias=router_bias,
        rng=jax.device_put(jax.random.PRNGKey(int(config.seed) + 1), replicated),
        bad_steps=jax.device_put(jnp.zeros((), jnp.int32), replicated))
    wdir = os.path.join(config.workdir, "warmup")
    ckpt = setup.checkpointer(config, os.path.join(wdir, "checkpoints"))
    resumed = setup.resume(ckpt, state, wdir, lead, "warm-up step")
    state = state if resumed is None else resumed
    train_step = make_train_step(model, wtx, wsched, StepOptions(), hook)

    def wstep(s: TrainState):
        key = jax.random.fold_in(s.rng, s.step)
        return train_step(s, demo_batch(task, key, bs, opts.max_new_tokens, opts.holdout_modulus))

    shardings = jax.tree.map(lambda x: x.sharding, state)
    step_fn = jax.jit(wstep, in_shardings=(shardings,), out_shardings=(shardings, None),
                      donate_argnums=0)

    def evaluate_warmup(s: TrainState) -> dict[str, Any]:
        m = evaluate(s.params, s.router_bias)
        if target > 0:
            m.update(evaluate(s.params, s.router_bias, "train"))
        return m

    def done(m: dict[str, Any]) -> str:
        if target > 0 and m.get("train_accuracy", -1.0) >= target:
            return f"warm-up reached train_accuracy {m['train_accuracy']:.3f} >= {target}"
        return ""

    job = Job(step=lambda s, i: step_fn(s), name="warm-up step",
              row=lambda m, n, dt: {k: v for k, v in m.items() if not isinstance(v, list)},
              evaluate=evaluate_warmup, postfix={"loss": "loss"},
              done=done)
    out = run_steps(state, job, Cadence.from_config(config, w_total, int(r.eval_every)), ckpt,
                    MetricWriter(wdir, enabled=lead), preempted=preempted,
                    progress=bool(config.train.progress), lead=lead, desc="warm-up")
    return out.state.params, out.state.router_bias

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
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from model import LOGICAL_RULES, Transformer
from model.sharding import batch_sharding
from rl import dataset as rl_dataset
from rl import losses
from rl.curriculum import CurriculumOptions, PromptPool, init_curriculum, pool_fingerprint
from rl.sampling import EOS
from rl.step import (
    RLOptions,
    RLState,
    demo_batch,
    eval_prompts,
    make_eval_fn,
    make_rl_step,
    make_rollout,
    train_prompts,
)
from rl.tasks import make_task
from train import distributed, setup
from train.checkpoint import abstract_like
from train.errors import UserError
from train.flops import flops_per_token, peak_flops
from train.metrics import MetricWriter, to_python
from train.runner import Cadence, Job, on_preemption, run_steps, write_final_metrics
from train.setup import restore_variables  # re-exported: its home is train.setup
from train.step import StepOptions, TrainState, make_train_step
from train.validate import validate

__all__ = ["make_options", "make_prompt_pool", "make_task_from_config", "restore_variables",
           "run"]


# ------------------------------------------------------------------------ config -> objects
def make_task_from_config(config: ConfigDict):
    """The task of `config.rl`: `rl.task` with its fields from `rl.tasks.<task>`, or for
    `rl.task="dataset"` the `rl.dataset.DatasetTask` of `rl.dataset` (prompts from JSONL
    files, the run's tokenizer: `config.data`, `config.init_from`)."""
    r = config.rl
    name = r.task
    if name == "dataset":
        if "dataset" not in r:
            raise UserError("config.rl.task='dataset' needs a config.rl.dataset section "
                            "(configs/rl_dataset.py)")
        if r.max_new_tokens is None:
            raise UserError("config.rl.max_new_tokens must be set for config.rl.task='dataset' "
                            "(dataset prompts have no natural completion budget)")
        if int(r.warmup_steps):
            raise UserError("config.rl.warmup_steps must be 0 for config.rl.task='dataset' (the "
                            "supervised warm-up needs token demonstrations; run the sft job "
                            "first and start from it with config.init_from)")
        return rl_dataset.from_config(config)
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
            curriculum=_curriculum_options(r),
        )
    except ValueError as e:
        raise UserError(f"config.rl: {e}") from e


def _curriculum_options(r: ConfigDict) -> CurriculumOptions | None:
    """`config.rl.curriculum` -> `CurriculumOptions` when enabled, else None."""
    c = r.get("curriculum")
    if c is None or not c.get("enabled", False):
        return None
    try:
        return CurriculumOptions(candidates=int(c.candidates), target=float(c.target),
                                 ema=float(c.ema), prior=_maybe(c.get("prior")))
    except ValueError as e:
        raise UserError(f"config.rl.curriculum: {e}") from e


def make_prompt_pool(config: ConfigDict, task, opts: RLOptions):
    """The task RL trains on: `task` itself, or with `config.rl.prompt_pool` > 0 a fixed
    pool of that many distinct training-split prompts of the synthetic `task`
    (`rl.curriculum.PromptPool`, drawn from `config.seed`). The curriculum needs a pool:
    a dataset task is one, a synthetic task needs `prompt_pool`."""
    size = int(config.rl.get("prompt_pool", 0) or 0)
    if hasattr(task, "pool_size"):
        if size:
            raise UserError(f"config.rl.prompt_pool={size} applies to the synthetic tasks; "
                            f"the {type(task).__name__}'s pool is its training split (set it "
                            "to 0)")
        pool = task
    elif size:
        try:
            pool = PromptPool.from_task(task, size, int(config.seed), opts.holdout_modulus)
        except ValueError as e:
            raise UserError(f"config.rl.prompt_pool: {e}") from e
    else:
        pool = task
    if opts.curriculum is not None:
        if not hasattr(pool, "pool_size"):
            raise UserError("config.rl.curriculum.enabled needs a finite prompt pool: set "
                            "config.rl.prompt_pool > 0 (or use a dataset task)")
        if pool.pool_size < opts.n_prompts:
            raise UserError(f"config.rl.n_prompts={opts.n_prompts} exceeds the {pool.pool_size} "
                            "prompts of the curriculum's pool")
    return pool


# ------------------------------------------------------------------------------- run
def run(config: ConfigDict) -> dict[str, Any]:
    """RL per `config`; returns the last logged metrics. Resumes from the latest
    checkpoint in `config.workdir` when there is one."""
    validate(config)  # every numeric field, before anything is written
    cfg = setup.model_config(config)
    r = config.rl
    task = make_task_from_config(config)
    opts = make_options(r, task)
    distributed.initialize(config.get("distributed"))
    lead = jax.process_index() == 0
    steps = setup.total_steps(config)
    mesh = setup.build_mesh(config)
    seq = _check(config, cfg, opts, task, setup.data_parallel_size(mesh))
    attention = setup.attention_backend(cfg, seq)
    try:  # a dataset's own held-out split, else a hash split of the task's prompt space
        ev = (task.eval_split(int(r.eval_prompts), setup.data_parallel_size(mesh))
              if hasattr(task, "eval_split") else
              eval_prompts(task, int(r.eval_seed), int(r.eval_prompts), opts.holdout_modulus))
    except ValueError as e:
        raise UserError(f"config.rl.eval_prompts: {e}") from e
    task = make_prompt_pool(config, task, opts)  # after the held-out prompts: those come
    # from the task's whole prompt space, the pool from its training split
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
        ckpt = setup.checkpointer(config, os.path.join(workdir, "checkpoints"))
        evaluate = _evaluator(config, model, task, opts, mesh, ev)
        base = setup.init_state(model, tx, mesh, int(config.seed), seq)
        template = RLState(step=base.step, params=base.params, opt_state=base.opt_state,
                           router_bias=base.router_bias, rng=base.rng, bad_steps=base.bad_steps,
                           ref=_ref(base.params, base.router_bias, opts.beta),
                           curriculum=_curriculum_state(task, opts, mesh))
        with on_preemption() as preempted:
            state = setup.resume(ckpt, template, workdir, lead, "RL step",
                                 step=config.checkpoint.get("restore_step"))
            if state is not None:
                _check_pool(state, template, ckpt.directory)
            if lead:  # after a resume that fits the config: a refused one keeps the old file
                setup.write_config(workdir, config)
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
            peak, peak_src = peak_flops(cfg.dtype)
            if lead:
                print(_summary(cfg, opts, mesh, task) + "\n" + attention +
                      f"\nMFU basis: {rl_step_flops(cfg, opts, task.prompt_width, 0) / 1e9:.3f}"
                      f" GFLOPs per RL step + the decode steps; peak {peak / 1e12:.3f} "
                      f"TFLOP/s ({peak_src})")
            out = run_steps(
                state, _rl_job(model, tx, task, opts, schedule, hook, state, evaluate,
                               int(r.get("throughput_every", 0)), peak),
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
    tokenizer = getattr(task, "tokenizer", None)  # a dataset task's; else the byte tokenizer
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(
            f"the tokenizer {getattr(tokenizer, 'path', 'byte')} has {tokenizer.vocab_size} "
            f"tokens, more than the model's vocab_size={cfg.vocab_size} (config.model, or "
            "config.init_from's architecture)")
    if tokenizer is None and cfg.vocab_size <= EOS:
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


def rl_step_flops(cfg, opts: RLOptions, prompt_width: int, decode_steps: float) -> float:
    """Model FLOPs of one RL step on the trainer's per-token basis (`train.flops`,
    f = `flops_per_token(cfg, P + N)` for forward + backward, f / 3 for a forward):
    mu passes of forward + backward over the B x (P + N) rollout tokens, one forward of them
    for the old log-probs (and one for the reference when beta > 0), and the sampler's
    forwards: the B x P prefill and B tokens per decode step."""
    seq = prompt_width + opts.max_new_tokens
    f = flops_per_token(cfg, seq)
    b = opts.batch_size
    forwards = 1 + (opts.beta > 0)
    train = b * seq * (opts.updates_per_batch * f + forwards * f / 3)
    sampling = b * (prompt_width + decode_steps) * f / 3
    return float(train + sampling)


def _rl_job(model, tx, task, opts: RLOptions, schedule, hook, state: RLState, evaluate,
            throughput_every: int, peak: float) -> Job:
    """The runner's view of the RL step: one jitted `rl_step` per RL step.

    Throughput (every logged row): `step_s`, `samples_per_s`, `mfu` (`rl_step_flops` /
    step_s / peak). Every `throughput_every` RL steps (0: never) the two phases are timed
    on the state about to be stepped: the rollout alone (its own jitted program, run
    once more for the measurement and left out of step_s) and then the whole step; the
    latest measurement gives `sampling_frac` (rollout / step seconds), `rollout_tokens_per_s`
    (generated tokens / rollout seconds) and `update_tokens_per_s` (B x (P + N) x mu /
    the rest of the step)."""
    shardings = jax.tree.map(lambda x: x.sharding, state)
    rl_step = make_rl_step(model, tx, task, opts, schedule, hook)
    step_fn = jax.jit(lambda s: rl_step(s, jax.random.fold_in(s.rng, s.step)),
                      in_shardings=(shardings,), out_shardings=(shardings, None),
                      donate_argnums=0)
    rollout = make_rollout(model, task, opts)
    # generated tokens, summed in the program: a replicated scalar every process can read
    rollout_fn = jax.jit(
        lambda s: jnp.sum(rollout(s, jax.random.fold_in(s.rng, s.step))["out"]["lengths"]),
        in_shardings=(shardings,), out_shardings=setup.replicated_sharding(model.mesh))
    timing: dict[str, float] = {"extra_s": 0.0}
    first = int(state.step)
    p, b = int(task.prompt_width), opts.batch_size
    update_tokens = b * (p + opts.max_new_tokens) * opts.updates_per_batch

    def step(s: RLState, i: int):
        if not (throughput_every and i > first and (i + 1) % throughput_every == 0):
            return step_fn(s)
        jax.block_until_ready(s)  # the steps queued before: part of step_s
        t0 = time.perf_counter()
        if "rollout_s" not in timing:
            jax.block_until_ready(rollout_fn(s))  # compile, outside the measurement
        t1 = time.perf_counter()
        generated = jax.block_until_ready(rollout_fn(s))
        t2 = time.perf_counter()
        timing["rollout_tokens"] = float(generated)
        out = jax.block_until_ready(step_fn(s))
        t3 = time.perf_counter()
        timing.update(rollout_s=t2 - t1, step_s=t3 - t2, extra_s=timing["extra_s"] + t2 - t0)
        return out

    def row(m: dict[str, Any], n: int, seconds: float) -> dict[str, Any]:
        seconds = max(seconds - timing["extra_s"], 1e-9)
        timing["extra_s"] = 0.0
        m["step_s"] = seconds / n
        m["samples_per_s"] = b / m["step_s"]
        m["mfu"] = rl_step_flops(model.cfg, opts, p, float(m["decode_steps"])) / m["step_s"] / peak
        if "rollout_s" in timing:
            roll, whole = timing["rollout_s"], timing["step_s"]
            m["sampling_frac"] = roll / whole
            m["rollout_tokens_per_s"] = timing["rollout_tokens"] / roll
            m["update_tokens_per_s"] = update_tokens / max(whole - roll, 1e-9)
        return m

    postfix = {"reward": "reward_mean", "acc": "accuracy", "eval_acc": "eval_accuracy"}
    return Job(step=step, name="RL step", row=row, postfix=postfix,
               evaluate=lambda s: evaluate(s.params, s.router_bias))


def _curriculum_state(task, opts: RLOptions, mesh):
    """A fresh curriculum over the task's pool (replicated), or {} when it is off."""
    if opts.curriculum is None:
        return {}
    state = init_curriculum(task.pool_size, pool_fingerprint(task.prompts[: task.pool_size]))
    return jax.device_put(state, setup.replicated_sharding(mesh))


def _check_pool(state: RLState, template: RLState, directory: str) -> None:
    """A resumed curriculum's estimates belong to the pool the run starts with: the same
    prompts in the same order (`rl.curriculum.pool_fingerprint`), else `UserError`."""
    if not template.curriculum:
        return
    saved, now = int(state.curriculum["pool"]), int(template.curriculum["pool"])
    if saved != now:
        raise UserError(
            f"cannot resume from {directory}: the curriculum's prompt pool differs from the "
            f"one its checkpoint was saved with (fingerprint {saved:#x}, now {now:#x}: the "
            "prompts of config.rl.dataset.paths, or config.seed / config.rl.prompt_pool's "
            "draw changed), so its per-prompt estimates would belong to other prompts. "
            "Nothing was deleted; restore those settings or point config.workdir elsewhere")


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
            f"{counts['total'] / 1e6:.2f}M params; mesh {sizes}"
            + (f"\n{task.summary()}" if hasattr(task, "summary") else ""))


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

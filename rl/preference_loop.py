"""The preference-optimization job, `run(config)` (`config.job = "preference"`), top to
bottom: config -> preference data (`rl.preference_data`) -> mesh -> state (resume, or
init / `config.init_from`, then the frozen reference) -> the jitted preference step
(`rl.preference.make_preference_step`) run by `train.runner.run_steps` -> logs, held-out
evaluation, checkpoints.

    python -m train --config configs/preference.py --config.data.paths=pairs.jsonl \\
        [--config.init_from=runs/imported] [--config.preference.loss=ipo]

Losses (`config.preference.loss`): dpo (cDPO with `label_smoothing`), ipo, simpo, orpo
(reference-free) and kto (unpaired examples). Their hyperparameters `beta`,
`label_smoothing`, `nll_weight` (dpo: + that weight x the chosen completions' token-mean
NLL, RPO), `gamma`, `lam`, `lambda_d`, `lambda_u` are passed through; None (the
default) is the loss's own default, and setting one the loss does not take is an error.

Reference (dpo, ipo, kto): the weights the run starts from (`init_from`, else the scratch
initialization of `config.seed`), frozen. `config.preference.precompute_ref`:
  * True (the default for dpo / ipo): the reference's summed log-probs of every training
    and held-out completion are computed once before the first step and kept in the state
    (`ref_logps`, 2 floats per pair); training then holds no second copy of the weights
    and runs no reference forward per step.
  * False (the default and the only choice for kto, whose KL rows pair each prompt with
    another example's completion of the same shuffled batch): a frozen copy of the
    starting weights lives in the state (`ref`; one more copy of the parameters in device
    memory and in each checkpoint) and the step runs its forward under stop_gradient.
    The held-out reference log-probs are still computed once.
Either way the reference travels in the checkpoints, so a resumed run keeps the ORIGINAL
starting weights' reference, never the resumed ones; resuming with data whose records
differ from those the run started with is a `UserError` (the stored log-probs belong to
the old records).

Metrics (`workdir/metrics.jsonl`, TensorBoard): the loss's metrics (`loss`,
`reward_margin`, `reward_accuracy` (pairs), `reward_chosen` / `reward_rejected`,
`logps_chosen` / `logps_rejected`, ORPO's `nll_loss` / `or_loss` / `log_odds_ratio`,
DPO's `dpo_loss` / `nll_loss` with `nll_weight` > 0,
KTO's `kl`), `lr`, `grad_norm`, `pairs_per_s` (examples for KTO), `tokens_per_s`; every
`train.eval_every` steps and at the last, the same loss metrics on the held-out pairs as
`eval_*` (`eval_reward_accuracy` is the held-out preference accuracy), over at most
`train.eval_batches` x `data.batch_size` of them. Checkpoints, resume, preemption and
`final_metrics.json` as in pretraining.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from model import LOGICAL_RULES, Transformer
from model.sharding import batch_sharding
from rl import preference
from rl.preference_data import PreferenceData, Split, rows_batch
from train import distributed, setup
from train.errors import UserError
from train.metrics import MetricWriter
from train.runner import Cadence, Job, on_preemption, run_steps, write_final_metrics
from train.validate import validate

__all__ = ["HPARAMS", "PreferenceState", "loss_kwargs", "make_data", "run", "use_precompute"]

HPARAMS = ("beta", "label_smoothing", "nll_weight", "gamma", "lam", "lambda_d", "lambda_u")


class PreferenceState(flax.struct.PyTreeNode):
    """The `train.step.TrainState` fields plus the frozen reference: `ref` =
    {'params', 'router_bias'} when its forward runs in the step (else {}), `ref_logps` =
    the reference's summed log-probs computed once ('chosen' / 'rejected' `[train pairs]`
    when precomputed, 'eval_*' of the held-out rows, 'data_key' of the records), {} for
    the reference-free losses."""

    step: jax.Array
    params: Any
    opt_state: Any
    router_bias: Any
    rng: jax.Array
    bad_steps: jax.Array
    ref: Any
    ref_logps: Any


# ------------------------------------------------------------------------ config -> objects
def loss_kwargs(p: ConfigDict) -> dict[str, float]:
    """The hyperparameters of `config.preference` that are set (not None); `UserError` for
    an unknown loss or one the loss does not take."""
    try:
        fn = preference.get(str(p.loss))
    except ValueError as e:
        raise UserError(f"config.preference.loss: {e}") from e
    takes = set(inspect.signature(fn).parameters)
    kw = {}
    for k in HPARAMS:
        v = p.get(k)
        if v is None:
            continue
        if k not in takes:
            raise UserError(f"config.preference.{k}={v!r}: loss {p.loss!r} has no {k!r} "
                            f"(it takes {', '.join(h for h in HPARAMS if h in takes)}); "
                            "leave it None")
        kw[k] = float(v)
    return kw


def use_precompute(p: ConfigDict) -> bool:
    """Whether the reference log-probs of the training data are computed once (see the
    module docstring); False for the reference-free losses."""
    loss, pre = str(p.loss), p.get("precompute_ref")
    if loss not in preference.NEEDS_REF:
        return False
    if loss == "kto":
        if pre:
            raise UserError("config.preference.precompute_ref=True does not work with loss "
                            "'kto': its KL rows pair prompts and completions of each shuffled "
                            "batch; leave it None")
        return False
    return True if pre is None else bool(pre)


def make_data(config: ConfigDict, eval_wanted: bool) -> PreferenceData:
    data = PreferenceData(
        config.data, int(config.data.seq_len), int(config.data.batch_size), int(config.seed),
        kto=str(config.preference.loss) == "kto", process_index=jax.process_index(),
        process_count=jax.process_count(), eval_wanted=eval_wanted,
        init_from=str(config.get("init_from", "") or ""))
    if jax.process_index() == 0:
        print(data.summary())
    return data


# ------------------------------------------------------------------------------- run
def run(config: ConfigDict) -> dict[str, Any]:
    """Preference-optimizes per `config`; returns the last logged metrics. Resumes from the
    latest checkpoint in `config.workdir/checkpoints` when there is one."""
    validate(config)
    p = config.preference
    kw = loss_kwargs(p)
    loss = str(p.loss)
    precompute = use_precompute(p)
    needs_ref = loss in preference.NEEDS_REF
    chunk = int(p.chunk_tokens)
    cfg = setup.model_config(config)
    distributed.initialize(config.get("distributed"))
    lead = jax.process_index() == 0
    steps = setup.total_steps(config)
    mesh = setup.build_mesh(config)
    bsz, seq = int(config.data.batch_size), int(config.data.seq_len)
    dp = setup.data_parallel_size(mesh)
    if bsz % dp:
        raise UserError(f"config.data.batch_size={bsz} is not divisible by the data-parallel "
                        f"mesh size {dp} (data x fsdp x expert)")
    if seq > cfg.max_seq_len:
        raise UserError(f"config.data.seq_len={seq} exceeds config.model.max_seq_len="
                        f"{cfg.max_seq_len}")
    attention = setup.attention_backend(cfg, seq)
    eval_every = int(config.train.eval_every)
    data = make_data(config, eval_every > 0)
    if data.vocab_size > cfg.vocab_size:
        raise UserError(f"config.model.vocab_size={cfg.vocab_size} is smaller than the "
                        f"tokenizer's vocabulary ({data.vocab_size})")
    n_eval = 0 if data.eval is None or eval_every <= 0 else min(
        len(data.eval), int(config.train.eval_batches) * bsz)
    model = Transformer(cfg, mesh=mesh)
    workdir = config.workdir
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):  # errors before any write
        tx, schedule = setup.build_optimizer(setup.optim_config(config, cfg, steps),
                                             setup.abstract_params(model, seq))
        hook = setup.qk_clip_hook(config, cfg)
        try:
            pstep = preference.make_preference_step(model, tx, loss, kw, schedule=schedule,
                                                    post_update=hook, chunk_tokens=chunk)
        except ValueError as e:
            raise UserError(f"config.preference: {e}") from e
    with (setup.workdir_lock(workdir, lead), jax.set_mesh(mesh),
          nn.logical_axis_rules(LOGICAL_RULES)):
        logps = _logps_fn(model, mesh, chunk)
        base = setup.init_state(model, tx, mesh, int(config.seed), seq)
        ref_logps = _ref_logps_template(data, precompute, n_eval, needs_ref, mesh)
        template = PreferenceState(
            step=base.step, params=base.params, opt_state=base.opt_state,
            router_bias=base.router_bias, rng=base.rng, bad_steps=base.bad_steps,
            ref={"params": base.params, "router_bias": base.router_bias}
            if needs_ref and not precompute else {},  # restore's shapes; copied below
            ref_logps=ref_logps)
        ckpt = setup.checkpointer(config, os.path.join(workdir, "checkpoints"))
        state = setup.resume(ckpt, template, workdir, lead,
                             step=config.checkpoint.get("restore_step"))
        if state is not None:
            _check_data_key(state, data)
        else:
            if config.get("init_from", ""):
                base = setup.load_init_from(str(config.init_from), base, mesh)
                if lead:
                    print(f"initialized params from {config.init_from} (also the reference)")
            ref = {"params": base.params, "router_bias": base.router_bias}
            state = template.replace(
                params=base.params, router_bias=base.router_bias,
                ref=_copy(ref) if template.ref else {},
                ref_logps=_compute_ref_logps(logps, ref, data, precompute, n_eval, needs_ref,
                                             mesh, bsz))
        if lead:
            setup.write_config(workdir, config)
            print(_summary(cfg, loss, kw, precompute, needs_ref, mesh, n_eval) + "\n" + attention)
        job = _job(pstep, state, data, logps, loss, kw, n_eval, mesh, bsz, seq)
        with on_preemption() as preempted:
            out = run_steps(state, job, Cadence.from_config(config, steps, eval_every), ckpt,
                            MetricWriter(workdir, enabled=lead), preempted=preempted,
                            progress=bool(config.train.progress), lead=lead,
                            desc="preference")
        if lead and out.last:
            write_final_metrics(workdir, out.last)
    return out.last


# ------------------------------------------------------------------------------- pieces
def _copy(tree):
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t))(tree)


def _logps_fn(model, mesh, chunk: int):
    """`logps(params, router_bias, rows) -> (summed log-probs [n], lengths [n])` of a
    `rows_batch` (batch-sharded in, replicated out), jitted."""
    def fn(params, router_bias, rows):
        lp, n, _ = preference.rows_logps(model, params, router_bias, rows["inputs"],
                                          rows["targets"], rows["mask"], rows["positions"],
                                          chunk)
        return lp, n

    return jax.jit(fn, out_shardings=setup.replicated_sharding(mesh))


def _place(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    return setup.global_batch(batch, {k: batch_sharding(mesh, np.ndim(v))
                                      for k, v in batch.items()})


def _split_rows(split: Split, n: int, width: int):
    """(tokens, mask) `[rows, width]` of the first `n` rows of a split, every side stacked:
    pairs chosen then rejected; KTO the examples then their KL rows (shift by one over the
    n rows)."""
    if split.rejected is not None:
        return (np.concatenate([split.chosen[0][:n], split.rejected[0][:n]]),
                np.concatenate([split.chosen[1][:n], split.rejected[1][:n]]))
    kl_t, kl_m = split.kl_rows(np.arange(n), width)
    return (np.concatenate([split.chosen[0][:n], kl_t]),
            np.concatenate([split.chosen[1][:n], kl_m]))


def _all_logps(logps, variables, tokens: np.ndarray, mask: np.ndarray, mesh, chunk_rows: int):
    """(summed log-probs, lengths) `[rows]` (numpy) of every row, `chunk_rows` at a time
    (the last chunk padded with empty rows); each process places its share."""
    n = len(tokens)
    pc, pi = jax.process_count(), jax.process_index()
    out_lp, out_len = [], []
    for s in range(0, n, chunk_rows):
        t, m = tokens[s:s + chunk_rows], mask[s:s + chunk_rows]
        pad = chunk_rows - len(t)
        if pad:
            t = np.concatenate([t, np.zeros((pad,) + t.shape[1:], t.dtype)])
            m = np.concatenate([m, np.zeros((pad,) + m.shape[1:], m.dtype)])
        per = chunk_rows // pc
        rows = rows_batch(t[pi * per:(pi + 1) * per], m[pi * per:(pi + 1) * per])
        lp, ln = jax.device_get(logps(variables["params"], variables["router_bias"],
                                      _place(rows, mesh)))
        out_lp.append(np.asarray(lp)[:chunk_rows - pad])
        out_len.append(np.asarray(ln)[:chunk_rows - pad])
    return np.concatenate(out_lp), np.concatenate(out_len)


def _ref_logps_template(data: PreferenceData, precompute: bool, n_eval: int,
                        needs_ref: bool, mesh) -> dict[str, jax.Array]:
    """Zeros of the shapes `_compute_ref_logps` fills (restore needs them)."""
    if not needs_ref:
        return {}
    rep = setup.replicated_sharding(mesh)
    shapes = {"data_key": ((), jnp.uint32)}
    if precompute:
        shapes.update(chosen=((len(data.train),), jnp.float32),
                      rejected=((len(data.train),), jnp.float32))
    if n_eval:
        shapes.update(eval=((_eval_rows(data, n_eval),), jnp.float32))
    return {k: jax.device_put(jnp.zeros(s, d), rep) for k, (s, d) in shapes.items()}


def _eval_rows(data: PreferenceData, n_eval: int) -> int:
    return 2 * n_eval  # pairs: chosen + rejected; KTO: examples + KL rows


def _compute_ref_logps(logps, ref, data: PreferenceData, precompute: bool, n_eval: int,
                       needs_ref: bool, mesh, bsz: int) -> dict[str, jax.Array]:
    """The reference's summed log-probs computed once (see `PreferenceState`)."""
    if not needs_ref:
        return {}
    rep = setup.replicated_sharding(mesh)
    out = {"data_key": np.uint32(data.data_key)}
    if precompute:
        n = len(data.train)
        lp, _ = _all_logps(logps, ref, *_split_rows(data.train, n, data.width), mesh, 2 * bsz)
        out.update(chosen=lp[:n], rejected=lp[n:])
    if n_eval:
        out["eval"], _ = _all_logps(logps, ref, *_split_rows(data.eval, n_eval, data.width),
                                    mesh, 2 * bsz)
    return {k: jax.device_put(jnp.asarray(v), rep) for k, v in out.items()}


def _check_data_key(state: PreferenceState, data: PreferenceData) -> None:
    if "data_key" in state.ref_logps and int(state.ref_logps["data_key"]) != data.data_key:
        raise UserError(
            "config.data.paths: the records differ from those this run started with, whose "
            "reference log-probs are in its checkpoints; use a new config.workdir")


def _evaluate(logps, state: PreferenceState, data: PreferenceData, loss: str, kw, n: int,
              mesh, bsz: int) -> dict[str, float]:
    """The loss's metrics over the first `n` held-out pairs (examples), as `eval_*`."""
    lp, lens = _all_logps(logps, {"params": state.params, "router_bias": state.router_bias},
                          *_split_rows(data.eval, n, data.width), mesh, 2 * bsz)
    ref = np.asarray(jax.device_get(state.ref_logps["eval"])) if "eval" in state.ref_logps \
        else None
    fn = preference.get(loss)
    if loss == "kto":
        value, m = fn(lp[:n], ref[:n], data.eval.desirable[:n],
                      float(np.mean(lp[n:] - ref[n:])), **kw)
    elif loss in preference.NEEDS_REF:
        value, m = fn(lp[:n], lp[n:], ref[:n], ref[n:], **kw,
                      **preference._lengths_kw(fn, lens[:n]))
    else:
        value, m = fn(lp[:n], lp[n:], lens[:n], lens[n:], **kw)
    return {"eval_loss": float(value), **{f"eval_{k}": float(v) for k, v in m.items()}}


def _job(pstep, state: PreferenceState, data: PreferenceData, logps, loss: str, kw,
         n_eval: int, mesh, bsz: int, seq: int) -> Job:
    """The runner's view: one jitted preference step per step on `data.batch(i)`."""
    precompute = "chosen" in state.ref_logps

    def step(s: PreferenceState, batch):
        batch = dict(batch)
        idx = batch.pop("index")
        if precompute:
            batch["ref_chosen_logps"] = s.ref_logps["chosen"][idx]
            batch["ref_rejected_logps"] = s.ref_logps["rejected"][idx]
        return pstep(s, batch, s.ref if s.ref else None)

    shardings = jax.tree.map(lambda x: x.sharding, state)
    example = data.batch(0)
    batch_shardings = {k: batch_sharding(mesh, np.ndim(v)) for k, v in example.items()}
    setup.check_process_rows(batch_sharding(mesh), bsz)
    step_fn = jax.jit(step, in_shardings=(shardings, batch_shardings),
                      out_shardings=(shardings, None), donate_argnums=0)
    rows_per_item = 2  # pairs: chosen + rejected; KTO: example + KL row

    def row(m: dict[str, Any], n: int, seconds: float) -> dict[str, Any]:
        m["pairs_per_s"] = n * bsz / max(seconds, 1e-9)
        m["tokens_per_s"] = m["pairs_per_s"] * rows_per_item * seq
        return m

    return Job(
        step=lambda s, i: step_fn(s, setup.global_batch(data.batch(i), batch_shardings)),
        row=row,
        evaluate=(lambda s: _evaluate(logps, s, data, loss, kw, n_eval, mesh, bsz))
        if n_eval else None,
        postfix={"loss": "loss", "margin": "reward_margin", "acc": "reward_accuracy",
                 "eval_acc": "eval_reward_accuracy"},
    )


def _summary(cfg, loss: str, kw, precompute: bool, needs_ref: bool, mesh, n_eval: int) -> str:
    counts = cfg.param_counts()
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    hp = ", ".join(f"{k}={v:g}" for k, v in kw.items()) or "the loss's defaults"
    ref = ("none (reference-free)" if not needs_ref else
           "the starting weights, log-probs precomputed" if precompute else
           "the starting weights, frozen copy in the step")
    return (f"preference {loss} ({hp}); reference: {ref}; eval on {n_eval} held-out "
            f"{'examples' if loss == 'kto' else 'pairs'}; model {counts['total'] / 1e6:.2f}M "
            f"params; mesh {sizes}")

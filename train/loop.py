"""The pretraining job, `run(config)`, top to bottom.

config -> mesh -> data -> state (init, `config.init_from`, or resume) -> the jitted train
step, run by `train.runner.run_steps` -> logs and checkpoints.

`train(config, make_data)` is that job over any data with the batches of
`train.data.DataPipeline`; supervised fine-tuning (`train.sft`) runs it on chat data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from ml_collections import ConfigDict

from model import LOGICAL_RULES, ModelConfig, Transformer, lora
from model.sharding import batch_sharding
from train import data as data_lib
from train import distributed, setup
from train.errors import UserError
from train.flops import flops_per_token, peak_flops
from train.metrics import MetricWriter
from train.runner import Cadence, Job, on_preemption, run_steps, write_final_metrics
from train.step import LOSSES, StepOptions, TrainState, make_eval_step, make_train_step
from train.validate import validate

BATCH_KEYS = ("inputs", "targets", "positions", "segment_ids", "mask")


def run(config: ConfigDict) -> dict[str, Any]:
    """Trains per `config`; returns the last logged metrics. Resumes from the latest
    checkpoint in `config.workdir/checkpoints` when there is one."""
    return train(config, _corpus)


def _corpus(config: ConfigDict, n_eval: int) -> data_lib.DataPipeline:
    return data_lib.DataPipeline(
        config.data, int(config.data.seq_len), int(config.data.batch_size), int(config.seed),
        jax.process_index(), jax.process_count(), eval_batches=n_eval)


def train(config: ConfigDict, make_data: Callable[[ConfigDict, int], Any]) -> dict[str, Any]:
    """`run` with the data of `make_data(config, n_eval)`: an object with the
    `vocab_size`, `batches(step)` and `eval_batches(n)` of `train.data.DataPipeline`
    (`n_eval`: how many eval batches will be asked for, 0 for none)."""
    validate(config)  # every numeric field, before anything is written
    cfg = setup.model_config(config)
    distributed.initialize(config.get("distributed"))
    lead = jax.process_index() == 0  # the process that writes logs and prints
    steps = setup.total_steps(config)
    mesh = setup.build_mesh(config)
    bsz, seq = int(config.data.batch_size), int(config.data.seq_len)
    options = step_options(config)
    attention = setup.attention_backend(cfg, seq)
    _check_batch(bsz, options.grad_accum, setup.data_parallel_size(mesh))
    n_eval = int(config.train.eval_batches)
    if int(config.train.eval_every) <= 0 or int(config.data.eval_permille) <= 0:
        n_eval = 0  # no evaluation: the data pipeline then needs no eval split
    tokens = make_data(config, n_eval)
    _check_compat(cfg, config, tokens)
    eval_sets = tokens.eval_batches(n_eval)
    model = Transformer(cfg, mesh=mesh)
    workdir = config.workdir
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):  # errors before any write
        tx, schedule = setup.build_optimizer(setup.optim_config(config, cfg, steps),
                                             setup.abstract_params(model, seq))
        hook = setup.qk_clip_hook(config, cfg)
    with (setup.workdir_lock(workdir, lead), jax.set_mesh(mesh),
          nn.logical_axis_rules(LOGICAL_RULES)):
        state = setup.init_state(model, tx, mesh, int(config.seed), seq)
        ckpt = setup.checkpointer(config, os.path.join(workdir, "checkpoints"))
        resumed = setup.resume(ckpt, state, workdir, lead,
                                 step=config.checkpoint.get("restore_step"))
        if resumed is None and config.get("init_from", ""):
            state = setup.load_init_from(str(config.init_from), state, mesh)
            if lead:
                print(f"initialized params from {config.init_from}")
        state = resumed if resumed is not None else state
        if lead:
            setup.write_config(workdir, config)
        model_flops = flops_per_token(cfg, seq)
        peak, peak_src = peak_flops(cfg.dtype)
        if lead:
            print(_state_summary(cfg, state, mesh) +
                  f"\nMFU basis: {model_flops / 1e6:.2f} MFLOPs/token; "
                  f"peak {peak / 1e12:.3f} TFLOP/s ({peak_src})\n{attention}")

        data_sharding = batch_sharding(mesh)
        setup.check_process_rows(data_sharding, bsz)
        batch_shardings = dict.fromkeys(BATCH_KEYS, data_sharding)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        step_fn = jax.jit(
            make_train_step(model, tx, schedule, options, hook),
            in_shardings=(shardings, batch_shardings), out_shardings=(shardings, None),
            donate_argnums=0)
        eval_fn = jax.jit(make_eval_step(model), in_shardings=(shardings, batch_shardings))
        batches = tokens.batches(int(state.step))

        def row(m: dict[str, Any], n: int, seconds: float) -> dict[str, Any]:
            m["tokens_per_s"] = n * bsz * seq / max(seconds, 1e-9)
            m["mfu"] = m["tokens_per_s"] * model_flops / peak
            return m

        job = Job(
            step=_noise_rows_only_every(
                lambda s, i: step_fn(s, setup.global_batch(next(batches), batch_shardings)),
                int(config.train.get("noise_scale_every", 0) or 0)),
            row=row,
            evaluate=(lambda s: {"eval_loss": _evaluate(eval_fn, s, eval_sets, batch_shardings)})
            if eval_sets else None,
            postfix={"loss": "loss", "tok_s": "tokens_per_s"},
        )
        profile = tuple(int(x) for x in config.train.profile_steps)
        with on_preemption() as preempted:
            out = run_steps(
                state, job, Cadence.from_config(config, steps, int(config.train.eval_every)),
                ckpt, MetricWriter(workdir, enabled=lead), preempted=preempted,
                progress=bool(config.train.progress), lead=lead, profile=profile,
                profile_dir=os.path.join(workdir, "profile"), desc="train")
        if lead and out.last:  # a rerun of a finished run logs nothing and keeps the file
            write_final_metrics(workdir, out.last)
    return out.last


def step_options(config: ConfigDict) -> StepOptions:
    """The train step's options of `config.train` (`loss`, when the config has it:
    "ce" | "dft", see `train.step.cross_entropy`; `noise_scale_every` > 0 turns on
    `StepOptions.noise_scale`, see `train.noise_scale`)."""
    loss = str(config.train.get("loss", "ce"))
    if loss not in LOSSES:
        raise UserError(f"config.train.loss={loss!r} must be one of {', '.join(LOSSES)}")
    every = int(config.train.get("noise_scale_every", 0) or 0)
    if every > 0 and int(config.train.grad_accum) < 2:
        raise UserError(f"config.train.noise_scale_every={every} compares the gradients of "
                        "the accumulation microbatches with the step's: it needs "
                        f"config.train.grad_accum >= 2, got {config.train.grad_accum}")
    return StepOptions(grad_accum=int(config.train.grad_accum),
                       z_loss=float(config.train.z_loss), skip_nonfinite=True, loss=loss,
                       noise_scale=every > 0)


def _noise_rows_only_every(step_fn, every: int):
    """`step_fn` whose metrics keep the `noise/*` entries (`train.noise_scale`) only at the
    steps that are multiples of `every` (the logged rows that carry them; computed every
    step, they are cheap)."""
    if every <= 0:
        return step_fn

    def step(state, i):
        state, metrics = step_fn(state, i)
        if (i + 1) % every:
            metrics = {k: v for k, v in metrics.items() if not k.startswith("noise/")}
        return state, metrics

    return step


def _check_batch(bsz: int, grad_accum: int, batch_div: int) -> None:
    if bsz % batch_div:
        raise UserError(
            f"config.data.batch_size={bsz} is not divisible by the data-parallel mesh size "
            f"{batch_div} (data x fsdp x expert)")
    if bsz % (grad_accum * batch_div):
        raise UserError(
            f"config.data.batch_size={bsz} is not divisible by config.train.grad_accum="
            f"{grad_accum} x the data-parallel mesh size {batch_div}")


def _state_summary(cfg: ModelConfig, state: TrainState, mesh) -> str:
    """Mesh, parameter counts (trainable vs frozen: with LoRA only the adapters train) and
    the per-device bytes of the parameters and of the optimizer state."""
    counts = cfg.param_counts()
    n_dev = mesh.devices.size

    def per_device(tree) -> int:
        total = 0
        for x in jax.tree.leaves(tree):
            if hasattr(x, "addressable_shards") and x.addressable_shards:
                shard = x.addressable_shards[0].data
                total += shard.size * shard.dtype.itemsize
        return total

    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    trainable = n_params
    adapters = ""
    if lora.has_adapters(state.params):
        trainable = sum(x.size for x, m in zip(jax.tree.leaves(state.params),
                                               jax.tree.leaves(lora.adapter_mask(state.params)),
                                               strict=True) if m)
        adapters = (f" (LoRA r={cfg.lora_rank} on {', '.join(lora.target_paths(cfg))}; "
                    "base weights frozen)")
    sizes = dict(zip(mesh.axis_names, mesh.devices.shape, strict=True))
    return (
        f"mesh {sizes} over {n_dev} {jax.devices()[0].platform} device(s); params "
        f"{counts['total'] / 1e6:.2f}M total, {counts['active'] / 1e6:.2f}M active/token; "
        f"trainable {trainable / 1e6:.3f}M, frozen {(n_params - trainable) / 1e6:.3f}M"
        f"{adapters}; per device: params {per_device(state.params) / 2**20:.1f} MiB, "
        f"optimizer state {per_device(state.opt_state) / 2**20:.1f} MiB"
    )


def _check_compat(cfg: ModelConfig, config: ConfigDict, tokens: Any) -> None:
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


def _evaluate(eval_fn, state, eval_sets, shardings) -> float:
    total, count = 0.0, 0.0
    for b in eval_sets:
        out = eval_fn(state, setup.global_batch(b, shardings))
        total += float(out["loss_sum"])
        count += float(out["tokens"])
    return total / max(count, 1.0)

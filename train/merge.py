"""`python -m train.merge --workdir runs/x --last K [--every N] [--weights uniform|decay]
--out runs/x-merged`: checkpoint merging (WSM) of a training run.

Averages the parameters of the last K saved checkpoints of a run (with `--every N`, only
of the steps that are multiples of N) and writes them, with the run's model config, in the
format of `python -m model.hf import` (`model_config.json` + Orbax `variables/`, written by
`model.hf.checkpoint.write_orbax`) plus `merge.json` (source, steps, weights, eval losses).
So the result is a `config.init_from` for a new run and `python -m model.hf export` turns it
into a Hugging Face directory.

What is averaged: every parameter, in float32, cast back to its stored dtype; the MoE
router biases of loss-free balancing too, with the same weights (they are a slowly
drifting per-expert offset, updated additively each step like the weights, so the average
is the bias that the averaged model's slowly-varying router would have had; it keeps the
expert loads of the merged model close to those of the checkpoints). LoRA adapters are
first merged into their kernels in each checkpoint (`model.lora.merge_lora`), because the
average of products `A_j @ B_j` is not the product of averages; the output is then the
base model (`lora_rank=0`). The optimizer state is not read.

Weights (`merge_weights`): `uniform` gives each of the K checkpoints 1/K; `decay` gives the
weights that emulate a learning-rate decay to zero over the window (see `decay_weights`
for the derivation, Tian et al. 2025, Eq. for c_j).

`checkpoint.keep`: a run keeps only its last `config.checkpoint.keep` checkpoints (3 by
default) and saves every `config.checkpoint.every` steps (and at the end). To merge K
checkpoints N steps apart, train with `--config.checkpoint.every=N` and
`--config.checkpoint.keep=K` or more (`None`: keep all); the window is then the last
(K - 1) * N steps. With fewer than K matching checkpoints the command says how many there
are and which config to change. The final checkpoint of a run whose length is not a
multiple of `every` is dropped by `--every N` (its step is no multiple of N).

The merged model's eval loss (and that of the newest checkpoint of the window, for
comparison) is printed when the run's config has an eval split (`train.eval_every > 0`,
`data.eval_permille > 0`, pretraining data): the first `train.eval_batches` eval batches of
`train.data.DataPipeline`, token-mean cross-entropy (`train.step.make_eval_step`), as the
trainer's `eval_loss`. Everything runs on one device.

Errors (`train.errors.UserError`: one `error:` line, exit 2): fewer than K checkpoints, a
corrupt or unreadable checkpoint in the window (naming its step), checkpoints whose shapes
do not match the run's model (naming the step and arrays), an `--out` that exists and is
not an empty directory. Every checkpoint is read before anything is written; nothing is
ever overwritten or deleted (a write that fails removes only what it wrote to `--out`).

References:
  Tian et al., `WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging for LLM
  Pre-training <https://arxiv.org/abs/2507.17634>`_, 2025.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from model import Transformer, lora
from train.checkpoint import Checkpointer
from train.errors import UserError

WEIGHTS = ("uniform", "decay")
DECAY_SHAPES = ("linear", "cosine", "sqrt")
MERGE_FILE = "merge.json"


# ---- weights -----------------------------------------------------------------------------


def _decay_integral(shape: str, tau: np.ndarray) -> np.ndarray:
    """F(tau) = integral_0^tau f, for the decay f(tau) from 1 at tau=0 to 0 at tau=1."""
    if shape == "linear":  # f = 1 - tau
        return tau - tau**2 / 2
    if shape == "cosine":  # f = (1 + cos(pi tau)) / 2
        return tau / 2 + np.sin(np.pi * tau) / (2 * np.pi)
    if shape == "sqrt":  # f = 1 - sqrt(tau)  ("1-sqrt", Haegele et al. 2024)
        return tau - (2.0 / 3.0) * tau**1.5
    raise ValueError(f"decay shape {shape!r} must be one of {', '.join(DECAY_SHAPES)}")


def decay_weights(steps: Sequence[int], shape: str = "linear") -> np.ndarray:
    """Merge weights `c_0..c_k` (oldest checkpoint first, summing to 1) that emulate a
    learning-rate decay of `shape` from the constant LR at `steps[0]` to 0 at `steps[-1]`.

    Derivation (WSM, Tian et al. 2025, Sec. 3): with a constant LR, checkpoint j is
    theta_{s_j} = theta_{s_0} + sum_{t < s_j} u_t (u_t: the optimizer's update of step t).
    The merge theta_hat = sum_j c_j theta_{s_j} (sum_j c_j = 1) is then
    theta_{s_0} + sum_{i=1}^k w_i sum_{t in interval i} u_t with w_i = sum_{j >= i} c_j:
    the updates of the interval (s_{i-1}, s_i] are scaled by w_i, as if the LR had decayed
    by that factor. Inverting (the paper's c_0 = 1 - w_1, c_j = w_j - w_{j+1},
    c_k = w_k): checkpoint j gets the LR decrement between the interval before it and the
    one after it. A merge can scale each interval by one factor only, so w_i is the mean of
    the decay f over the interval, w_i = (F(tau_i) - F(tau_{i-1})) / (tau_i - tau_{i-1})
    with tau_j = (s_j - s_0) / (s_k - s_0) and F the integral of f; a monotone f gives
    c_j >= 0. For `linear` (f = 1 - tau) and equally spaced steps this is the trapezoid
    rule: c = (1/2k, 1/k, ..., 1/k, 1/2k). (Uniform weights 1/(k+1) are the same
    construction for a linear decay to 1/(k+1) instead of 0.)

    Args:
      steps: the checkpoints' steps, increasing; unequal spacing is taken into account.
      shape: f: "linear" 1 - tau, "cosine" (1 + cos(pi tau)) / 2, "sqrt" 1 - sqrt(tau).
    Returns:
      float64 weights, one per step.
    """
    s = np.asarray(steps, np.float64)
    if s.ndim != 1 or s.size == 0 or np.any(np.diff(s) <= 0):
        raise ValueError(f"steps must be a non-empty increasing sequence, got {list(steps)}")
    if s.size == 1:
        return np.ones(1)
    tau = (s - s[0]) / (s[-1] - s[0])
    w = np.diff(_decay_integral(shape, tau)) / np.diff(tau)  # w_1..w_k
    c = np.empty(s.size)
    c[0] = 1.0 - w[0]
    c[1:-1] = w[:-1] - w[1:]
    c[-1] = w[-1]
    return c


def merge_weights(steps: Sequence[int], weights: str = "uniform",
                  shape: str = "linear") -> np.ndarray:
    """The weights of `steps` (oldest first, summing to 1): `uniform` 1/K each, or `decay`
    (`decay_weights` of `shape`)."""
    if weights == "uniform":
        return np.full(len(steps), 1.0 / len(steps))
    if weights == "decay":
        return decay_weights(steps, shape)
    raise ValueError(f"weights {weights!r} must be one of {', '.join(WEIGHTS)}")


def select_steps(steps: Sequence[int], last: int, every: int | None = None) -> list[int]:
    """The last `last` of `steps` (those that are multiples of `every`, when given);
    `UserError` when there are fewer."""
    pool = sorted(s for s in steps if not every or s % every == 0)
    if last < 1:
        raise UserError(f"--last={last} must be >= 1")
    if len(pool) < last:
        which = f"checkpoints at multiples of --every={every}" if every else "checkpoints"
        raise UserError(
            f"--last={last} needs {last} {which}, the run has {len(pool)} "
            f"(saved steps: {', '.join(map(str, sorted(steps))) or 'none'}); train with "
            f"--config.checkpoint.keep={last} or more (None keeps all) and "
            "--config.checkpoint.every at the merge interval")
    return pool[-last:]


# ---- reading and averaging ---------------------------------------------------------------


def _checkpoint_dir(workdir: str) -> str:
    """The run's checkpoint directory: `checkpoints/` (else `warmup/checkpoints/`), as
    `train.setup.restore_variables` looks them up."""
    for d in (os.path.join(workdir, "checkpoints"), os.path.join(workdir, "warmup", "checkpoints")):
        if os.path.isdir(d):
            return d
    raise UserError(f"--workdir {workdir!r} has no checkpoints/ directory (has the run saved "
                    "a checkpoint?)")


def _read_config(workdir: str) -> ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"--workdir {workdir!r} is not a training run (no config.json)")
    try:
        with open(path) as f:
            return ConfigDict(json.load(f))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from e


@dataclasses.dataclass(frozen=True)
class MergeResult:
    out: str
    steps: tuple[int, ...]
    weights: tuple[float, ...]
    eval_loss: float | None  # the merged model's (None: no eval split)
    eval_loss_newest: float | None  # the newest checkpoint's of the window

    def line(self, workdir: str, kind: str) -> str:
        ws = ", ".join(f"{s}:{w:.4g}" for s, w in zip(self.steps, self.weights, strict=True))
        text = f"merged {len(self.steps)} checkpoints of {workdir} ({kind}; step:weight {ws}) -> {self.out}"
        if self.eval_loss is None:
            return text + "; no eval split in the run's config"
        return (text + f"; eval_loss {self.eval_loss:.4f} (step {self.steps[-1]}: "
                       f"{self.eval_loss_newest:.4f})")


def average_checkpoints(ckpt_dir: str, cfg, steps: Sequence[int],
                        weights: Sequence[float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(merged variables, variables of steps[-1])`: `{'params', 'router_bias'}` of each
    step restored onto one device (`Checkpointer.restore_partial`, fingerprints verified),
    LoRA adapters merged into their kernels, and summed with `weights` in float32 (cast back
    to the stored dtypes). `UserError` naming the step when one cannot be read or does not
    match `cfg`."""
    from model.hf.convert import abstract_variables

    abstract, _ = abstract_variables(cfg)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                            abstract)
    abstract.setdefault("router_bias", {})
    acc = newest = None
    for step, w in zip(steps, weights, strict=True):
        ckpt = Checkpointer.open(ckpt_dir)
        try:
            v = ckpt.restore_partial(abstract, step)
        except UserError as e:
            raise UserError(f"checkpoint step {step} of the merge window cannot be used "
                            f"(nothing was written or deleted): {e}") from None
        finally:
            ckpt.close()
        v = {"params": lora.merge_lora(cfg, v["params"]), "router_bias": v.get("router_bias", {})}
        scaled = jax.tree.map(lambda x, w=w: jnp.float32(w) * x.astype(jnp.float32), v)
        acc = scaled if acc is None else jax.tree.map(jnp.add, acc, scaled)
        newest = v
    merged = jax.tree.map(lambda a, x: a.astype(x.dtype), acc, newest)
    return merged, newest


def _eval_fn(config: ConfigDict, cfg):
    """`variables -> eval loss` over the run's eval batches, or None when the run's
    config has no eval split (or its data cannot be read here: then the reason)."""
    from train.data import DataPipeline
    from train.step import TrainState, make_eval_step

    if str(config.get("job", "pretrain")) != "pretrain":
        return None, f"job {config.get('job')!r} (eval only for pretraining data)"
    n = int(config.train.get("eval_batches", 0))
    if int(config.train.get("eval_every", 0)) <= 0 or int(config.data.eval_permille) <= 0 or n <= 0:
        return None, "no eval split in the run's config"
    try:
        data = DataPipeline(config.data, int(config.data.seq_len), int(config.data.batch_size),
                            int(config.seed), eval_batches=n)
        batches = data.eval_batches(n)
    except UserError as e:
        return None, f"eval skipped: {e}"
    step = jax.jit(make_eval_step(Transformer(cfg)))
    zero = jnp.zeros((), jnp.int32)

    def evaluate(variables) -> float:
        state = TrainState(step=zero, params=variables["params"], opt_state={},
                           router_bias=variables.get("router_bias", {}), rng=zero,
                           bad_steps=zero)
        total = count = 0.0
        for b in batches:
            out = step(state, {k: jnp.asarray(x) for k, x in b.items()})
            total += float(out["loss_sum"])
            count += float(out["tokens"])
        return total / max(count, 1.0)

    return evaluate, ""


def merge(workdir: str, out: str, last: int, every: int | None = None,
          weights: str = "uniform", shape: str = "linear") -> MergeResult:
    """Merges the last `last` checkpoints of the run in `workdir` into `out` (see the
    module docstring); returns what was merged and the eval losses."""
    from model.hf.checkpoint import check_destination, new_destination, write_orbax
    from train.setup import source_model_config

    if weights not in WEIGHTS:
        raise UserError(f"--weights={weights!r} must be one of {', '.join(WEIGHTS)}")
    if shape not in DECAY_SHAPES:
        raise UserError(f"--decay-shape={shape!r} must be one of {', '.join(DECAY_SHAPES)}")
    if every is not None and every < 1:
        raise UserError(f"--every={every} must be >= 1")
    try:
        check_destination(out)
    except ValueError as e:
        raise UserError(f"--out: {e}") from None
    config = _read_config(workdir)
    cfg = source_model_config(workdir)
    ckpt_dir = _checkpoint_dir(workdir)
    ckpt = Checkpointer.open(ckpt_dir)
    try:
        available = ckpt.all_steps()
    finally:
        ckpt.close()
    steps = select_steps(available, last, every)
    w = merge_weights(steps, weights, shape)
    merged, newest = average_checkpoints(ckpt_dir, cfg, steps, w)
    out_cfg = lora.base_config(cfg)
    evaluate, _ = _eval_fn(config, out_cfg)
    loss = loss_newest = None
    if evaluate is not None:
        loss, loss_newest = evaluate(merged), evaluate(newest)
    if not merged["router_bias"]:
        merged = {"params": merged["params"]}
    result = MergeResult(os.path.abspath(out), tuple(int(s) for s in steps),
                         tuple(float(x) for x in w), loss, loss_newest)
    with new_destination(out):
        write_orbax(out, out_cfg, merged)
        with open(os.path.join(out, MERGE_FILE), "w") as f:
            json.dump({"source": os.path.abspath(workdir), "steps": list(result.steps),
                       "weights": list(result.weights), "kind": weights,
                       "decay_shape": shape if weights == "decay" else None,
                       "eval_loss": loss, "eval_loss_newest": loss_newest}, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> None:
    """`python -m train.merge --workdir DIR --last K [--every N] [--weights uniform|decay]
    [--decay-shape linear|cosine|sqrt] --out DIR`: prints one line."""
    from train.cli import user_errors

    ap = argparse.ArgumentParser(prog="python -m train.merge",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True, help="a training run's directory")
    ap.add_argument("--last", type=int, required=True, help="how many checkpoints to merge")
    ap.add_argument("--every", type=int, default=None,
                    help="only checkpoints whose step is a multiple of this")
    ap.add_argument("--weights", choices=WEIGHTS, default="uniform")
    ap.add_argument("--decay-shape", choices=DECAY_SHAPES, default="linear",
                    help="the decay that --weights=decay emulates")
    ap.add_argument("--out", required=True, help="a new or empty directory")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    with user_errors():
        result = merge(args.workdir, args.out, args.last, args.every, args.weights,
                       args.decay_shape)
    kind = args.weights + (f" {args.decay_shape}" if args.weights == "decay" else "")
    print(result.line(args.workdir, kind))


if __name__ == "__main__":
    main()

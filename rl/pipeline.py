"""One post-training pipeline on a CPU: SFT -> preference (DPO) -> RL (GRPO) on 2-digit
addition, each stage a normal job (`train.jobs.dispatch`, as `python -m train --config`)
in its own workdir, started from the previous stage's workdir with `config.init_from`.

    python -m rl.pipeline --workdir runs/pipeline [--quick] [--no-compare]

Stages (configs under `configs/pipeline/`; the task, model and held-out split of
`configs/rl_arith.py`):

1. Demonstrations: every 2-digit problem of the task's *training* split (the prompt hash
   of `rl.step.prompt_bucket` puts 1/`holdout_modulus` of them in the held-out split the
   RL evaluator uses; those are never written) as `{"prompt": "47+38=", "completion":
   "85"}` JSONL, rendered with `data.chat_template="raw"` (the bytes the RL task samples,
   then EOS).
2. SFT (`configs/pipeline/sft.py`) in chunks of `--sft-chunk` steps (each chunk reruns
   the same command with more steps; the run resumes), stopped at the first chunk where
   greedy accuracy on training prompts reaches `--sft-target` (the model is left partly
   right, as `configs/rl_arith.py`'s warm-up).
3. Preference pairs: the SFT model samples `--samples` completions (T = 1) of
   `--pair-prompts` training prompts; a prompt with a correct and an incorrect sample gives
   pairs (chosen: a correct one, rejected: a different incorrect one). DPO plus the
   chosen answers' NLL (RPO; `configs/pipeline/preference.py`) with `init_from` = the SFT
   workdir (also the reference).
4. GRPO (`configs/pipeline/rl.py`) with `init_from` = the preference workdir; with the
   comparison on (default), the same RL run from the SFT workdir too.

After each stage the greedy held-out accuracy is measured as the RL job's evaluator does
(`rl.step.make_eval_fn` on `rl.step.eval_prompts(task, rl.eval_seed, rl.eval_prompts,
rl.holdout_modulus)`). Writes `<workdir>/{demos,pairs}.jsonl`, `<workdir>/<stage>/` (the
runs), `<workdir>/summary.json` and the figure (`--figure`, default
`docs/pipeline/pipeline.png`; `<workdir>/pipeline.png` with `--quick`).

`--quick`: a tiny model and a few steps per stage (the plumbing only, for tests); prompts
whose samples hold no correct answer then take the task's answer as chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from rl.loop import make_options, make_task_from_config
from rl.sampling import EOS, sample
from rl.step import eval_prompts, make_eval_fn, prompt_bucket, train_prompts
from rl.tasks import Addition, decode
from train import jobs
from train.errors import UserError

__all__ = ["addition_demos", "main", "preference_pairs", "run_pipeline"]

STAGES = ("sft", "preference", "rl")


# ---------------------------------------------------------------------------- configs
def stage_configs(root: str, quick: bool) -> dict[str, ConfigDict]:
    """The configs of the stages (`configs/pipeline/*`), workdirs under `root`; `quick`
    shrinks the model and the runs to a plumbing test."""
    from configs.pipeline import preference, rl, sft

    out = {"sft": sft.get_config(), "preference": preference.get_config(),
           "rl": rl.get_config()}
    for name, c in out.items():
        c.workdir = os.path.join(root, name)
        c.train.progress = False
        c.checkpoint.async_save = False
    out["preference"].init_from = out["sft"].workdir
    out["rl"].init_from = out["preference"].workdir
    if quick:
        tiny = dict(d_model=32, n_layers=1, n_heads=2, ffn_dim=64)
        for c in out.values():
            c.model.update(tiny)
        out["sft"].data.batch_size = 16
        out["sft"].optim.warmup_steps = 0
        out["preference"].data.batch_size = 8
        out["preference"].train.update(dict(steps=3, eval_every=3, log_every=1))
        out["preference"].optim.warmup_steps = 0
        r = out["rl"]
        r.train.update(dict(steps=2, log_every=1))
        r.rl.update(dict(n_prompts=8, group_size=2, eval_every=2, eval_prompts=16))
        r.optim.warmup_steps = 0
    return out


# ------------------------------------------------------------------------------ data
def addition_demos(task: Addition, modulus: int) -> list[tuple[str, str]]:
    """Every problem `(prompt, answer)` of `task` (all operand pairs) outside the held-out
    bucket of `rl.step.prompt_bucket` (bucket 0 of `modulus`), in order: the prompts the
    RL evaluator uses are never among them. The prompt's tokens are laid out as
    `task.sample_prompts` lays them out (bytes, right-padded with EOS)."""
    if not isinstance(task, Addition):
        raise UserError(f"rl.pipeline writes addition demonstrations; the task is "
                        f"{type(task).__name__}")
    values = np.concatenate([np.arange(0 if d == 1 else 10 ** (d - 1), 10**d)
                             for d in range(task.min_digits, task.max_digits + 1)])
    if len(values) ** 2 > 2_000_000:
        raise UserError(f"{len(values) ** 2:,} problems are too many to enumerate")
    a, b = (x.ravel() for x in np.meshgrid(values, values, indexing="ij"))
    prompts = [f"{x}+{y}=" for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    rows = np.full((len(prompts), task.prompt_width), EOS, np.int32)
    for i, p in enumerate(prompts):
        rows[i, : len(p)] = np.frombuffer(p.encode(), np.uint8)
    keep = prompt_bucket(rows, modulus) != 0 if modulus > 0 else np.ones(len(prompts), bool)
    return [(p, str(x + y)) for p, x, y, k in zip(prompts, a.tolist(), b.tolist(), keep,
                                                  strict=True) if k]


def _write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def preference_pairs(prompts: list[str], answers: list[str], completions: list[list[str]],
                     correct: np.ndarray, per_prompt: int = 2,
                     demo_chosen: bool = False) -> tuple[list[dict[str, str]], int]:
    """Pairs `{"prompt", "chosen", "rejected"}` from sampled `completions[i][j]` of
    `prompts[i]` with `correct[i, j]`: up to `per_prompt` per prompt, each a distinct
    correct sample against a distinct incorrect one (non-empty, different text). With
    `demo_chosen`, a prompt without a correct sample takes its answer `answers[i]` as the
    chosen one. Returns (pairs, how many took the answer)."""
    pairs, from_demo, seen = [], 0, set()
    for i, p in enumerate(prompts):
        if p in seen:
            continue
        seen.add(p)
        good = list(dict.fromkeys(c for c, ok in zip(completions[i], correct[i], strict=True)
                                  if ok))
        bad = list(dict.fromkeys(c for c, ok in zip(completions[i], correct[i], strict=True)
                                 if not ok and c and c not in good))
        if not good and demo_chosen:
            good, from_demo = [answers[i]], from_demo + min(len(bad), per_prompt, 1)
            bad = [c for c in bad if c != answers[i]][:1]
        for g, r in zip(good[:per_prompt], bad[:per_prompt], strict=False):
            pairs.append({"prompt": p, "chosen": g, "rejected": r})
    return pairs, from_demo


def _answer_text(answer: dict[str, Any], i: int) -> str:
    return decode(answer["target"][i], int(answer["target_len"][i]))


def sample_pairs(workdir: str, task, opts, n_prompts: int, samples: int, seed: int,
                 demo_chosen: bool) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """`preference_pairs` of the model in `workdir` (latest checkpoint): `samples`
    completions at temperature 1 of `n_prompts` training-split prompts."""
    from rl.generate import load

    model, variables = load(workdir)
    prompts, lens, answer = jax.device_get(train_prompts(
        task, jax.random.PRNGKey(seed), n_prompts, opts.holdout_modulus))
    rep = lambda x: np.repeat(np.asarray(x), samples, axis=0)  # noqa: E731
    fn = jax.jit(lambda v, p, n, k: sample(model, v, p, n, k, max_new_tokens=opts.max_new_tokens,
                                           temperature=1.0, eos_id=EOS))
    out = fn(variables, jnp.asarray(rep(prompts)), jnp.asarray(rep(lens)),
             jax.random.PRNGKey(seed + 1))
    ans = jax.tree.map(lambda x: jnp.asarray(rep(x)), answer)
    reward = np.asarray(task.reward(out["completion"], out["completion_mask"], ans))
    comp, mask = np.asarray(out["completion"]), np.asarray(out["completion_mask"])
    texts = [decode(comp[k], mask=mask[k]) for k in range(len(comp))]
    correct = (reward >= 1.0).reshape(n_prompts, samples)
    ptexts = [decode(prompts[i], int(lens[i])) for i in range(n_prompts)]
    pairs, from_demo = preference_pairs(
        ptexts, [_answer_text(answer, i) for i in range(n_prompts)],
        [texts[i * samples:(i + 1) * samples] for i in range(n_prompts)], correct,
        demo_chosen=demo_chosen)
    stats = {"prompts": n_prompts, "samples_per_prompt": samples,
             "sample_accuracy": float(correct.mean()),
             "prompts_with_both": int(np.sum(correct.any(1) & ~correct.all(1))),
             "pairs": len(pairs), "pairs_with_answer_as_chosen": from_demo}
    return pairs, stats


# ------------------------------------------------------------------------ evaluation
class Evaluator:
    """Greedy accuracy of a run's latest checkpoint on the RL evaluator's held-out prompts
    (`eval_accuracy`) and on fixed training-split prompts (`train_accuracy`), exactly as
    `rl.loop` draws them (`rl.eval_seed`, `rl.eval_prompts`, `rl.holdout_modulus`)."""

    def __init__(self, rl_config: ConfigDict):
        r = rl_config.rl
        self.task = make_task_from_config(rl_config)
        self.opts = make_options(r, self.task)
        n, seed, m = int(r.eval_prompts), int(r.eval_seed), self.opts.holdout_modulus
        self.sets = {"eval": eval_prompts(self.task, seed, n, m),
                     "train": jax.device_get(train_prompts(
                         self.task, jax.random.PRNGKey(seed + 1), n, m))}
        self._fns: dict[str, Callable] = {}

    def __call__(self, workdir: str) -> dict[str, float]:
        from rl.generate import load

        model, variables = load(workdir)
        key = repr(model.cfg)
        if key not in self._fns:
            self._fns[key] = jax.jit(make_eval_fn(model, self.task, self.opts.max_new_tokens))
        out = {}
        for split, (p, n, a) in self.sets.items():
            m = self._fns[key](variables["params"], variables["router_bias"], jnp.asarray(p),
                               jnp.asarray(n), jax.tree.map(jnp.asarray, a))
            out[f"{split}_accuracy"] = float(m["eval_accuracy"])
        return out


# ------------------------------------------------------------------------------- run
def _run(config: ConfigDict) -> float:
    """Runs `config`'s job (as `python -m train --config ...`); returns the seconds."""
    t = time.perf_counter()
    jobs.dispatch(config)
    return time.perf_counter() - t


def _eval_curve(workdir: str) -> list[tuple[int, float]]:
    """(step, eval_accuracy) of an RL run's metrics.jsonl."""
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "eval_accuracy" in row:
                out.append((int(row["step"]), float(row["eval_accuracy"])))
    return out


def run_pipeline(root: str, *, quick: bool = False, compare: bool = True,
                 sft_target: float = 0.25, sft_chunk: int = 50, sft_max_steps: int = 600,
                 pair_prompts: int = 1024, samples: int = 8, rl_steps: int | None = None,
                 figure: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the pipeline (module docstring) under `root`; returns the summary (also written
    to `root/summary.json`)."""
    if os.path.exists(os.path.join(root, "summary.json")) or any(
            os.path.exists(os.path.join(root, s)) for s in STAGES):
        raise UserError(f"--workdir {root!r} already holds a pipeline; use a new directory")
    os.makedirs(root, exist_ok=True)
    t0 = time.perf_counter()
    cfgs = stage_configs(root, quick)
    if quick:
        sft_chunk, sft_max_steps, pair_prompts, samples = 4, 4, 16, 4
    if rl_steps is not None:
        cfgs["rl"].train.steps = int(rl_steps)
    evaluate = Evaluator(cfgs["rl"])
    task, opts = evaluate.task, evaluate.opts
    summary: dict[str, Any] = {"workdir": root, "quick": quick, "stages": []}

    def record(name: str, cfg: ConfigDict, steps: int, seconds: float, **extra) -> dict:
        acc = evaluate(cfg.workdir)
        row = {"stage": name, "workdir": cfg.workdir, "init_from": str(cfg.init_from),
               "steps": steps, "seconds": round(seconds, 1), **acc, **extra}
        summary["stages"].append(row)
        log(f"[pipeline] {name}: held-out accuracy {acc['eval_accuracy']:.3f} (train "
            f"{acc['train_accuracy']:.3f}) after {steps} steps, {seconds:.0f} s")
        return row

    # 1. demonstrations (training split only)
    demos = addition_demos(task, opts.holdout_modulus)
    held = {decode(p, int(n)) for p, n in zip(evaluate.sets["eval"][0], evaluate.sets["eval"][1],
                                             strict=True)}
    assert not held & {p for p, _ in demos}, "a held-out prompt among the demonstrations"
    demo_path = os.path.join(root, "demos.jsonl")
    _write_jsonl(demo_path, [{"prompt": p, "completion": c} for p, c in demos])
    summary["demonstrations"] = len(demos)
    log(f"[pipeline] {len(demos)} demonstrations (training split) -> {demo_path}")

    # 2. SFT, stopped early at the target training accuracy
    sft = cfgs["sft"]
    sft.data.paths = (demo_path,)
    steps, seconds, curve = 0, 0.0, []
    while True:
        steps = min(steps + sft_chunk, sft_max_steps)
        sft.train.steps = steps
        seconds += _run(sft)
        acc = evaluate(sft.workdir)
        curve.append((steps, acc["eval_accuracy"], acc["train_accuracy"]))
        log(f"[pipeline] sft step {steps}: train accuracy {acc['train_accuracy']:.3f}, "
            f"held-out {acc['eval_accuracy']:.3f}")
        if acc["train_accuracy"] >= sft_target or steps >= sft_max_steps:
            break
    record("sft", sft, steps, seconds, curve=curve, target_train_accuracy=sft_target)

    # 3. preference pairs from the SFT model's own samples, then DPO from its workdir
    t = time.perf_counter()
    pairs, stats = sample_pairs(sft.workdir, task, opts, pair_prompts, samples,
                                int(sft.seed) + 7, demo_chosen=quick)
    if not pairs:
        raise UserError(f"no preference pair: among {pair_prompts} prompts x {samples} "
                        "samples none has both a correct and an incorrect answer")
    pair_path = os.path.join(root, "pairs.jsonl")
    _write_jsonl(pair_path, pairs)
    stats["seconds"] = round(time.perf_counter() - t, 1)
    summary["pairs"] = stats
    log(f"[pipeline] {len(pairs)} preference pairs (sample accuracy "
        f"{stats['sample_accuracy']:.3f}) -> {pair_path}")
    pref = cfgs["preference"]
    pref.data.paths = (pair_path,)
    record("preference", pref, int(pref.train.steps), _run(pref))

    # 4. GRPO from the preference workdir (and, to compare, from the SFT workdir)
    rl = cfgs["rl"]
    record("rl", rl, int(rl.train.steps), _run(rl), curve=_eval_curve(rl.workdir))
    if compare:
        alt = ConfigDict(rl.to_dict())
        alt.workdir, alt.init_from = os.path.join(root, "rl_from_sft"), sft.workdir
        record("rl_from_sft", alt, int(alt.train.steps), _run(alt),
               curve=_eval_curve(alt.workdir))

    summary["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    figure = figure or (os.path.join(root, "pipeline.png") if quick
                        else os.path.join("docs", "pipeline", "pipeline.png"))
    plot(summary, figure)
    summary["figure"] = figure
    log(f"[pipeline] done in {summary['seconds']:.0f} s: {os.path.join(root, 'summary.json')}, "
        f"{figure}")
    return summary


# ------------------------------------------------------------------------------ plot
def plot(summary: dict[str, Any], path: str) -> None:
    """Held-out greedy accuracy against the optimizer steps of the stages laid end to end
    (SFT, then DPO, then RL steps), the stage boundaries dotted; RL from the SFT model
    dashed when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = {s["stage"]: s for s in summary["stages"]}
    sft, pref, rl = st["sft"], st["preference"], st["rl"]
    x_pref, x_rl = sft["steps"], sft["steps"] + pref["steps"]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    sx = [0] + [c[0] for c in sft["curve"]]
    ax.plot(sx, [0.0] + [c[1] for c in sft["curve"]], "o-", color="C0", ms=3, label="SFT")
    ax.plot([x_pref, x_rl], [sft["eval_accuracy"], pref["eval_accuracy"]], "o-", color="C1",
            ms=4, label="DPO + NLL (RPO; pairs of its own samples)")
    ax.plot([x_rl + s for s, _ in rl["curve"]], [a for _, a in rl["curve"]], "-", color="C2",
            label="GRPO from the DPO model")
    if "rl_from_sft" in st:
        alt = st["rl_from_sft"]
        ax.plot([x_pref + s for s, _ in alt["curve"]], [a for _, a in alt["curve"]], "--",
                color="C7", label="GRPO from the SFT model (comparison)")
    for x in (x_pref, x_rl):
        ax.axvline(x, color="k", ls=":", lw=0.8)
    ax.set_xlabel("optimizer / RL steps, stages end to end (SFT | DPO | GRPO)")
    ax.set_ylabel("greedy accuracy, held-out prompts")
    ax.set_ylim(0, 1)
    ax.set_title("SFT -> DPO -> GRPO on 2-digit addition (CPU)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """`python -m rl.pipeline --workdir runs/pipeline [--quick] [--no-compare]`."""
    from train.cli import user_errors

    ap = argparse.ArgumentParser(prog="python -m rl.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/pipeline")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the plumbing only")
    ap.add_argument("--no-compare", action="store_true", help="skip RL from the SFT model")
    ap.add_argument("--sft-target", type=float, default=0.25,
                    help="stop SFT once greedy accuracy on training prompts reaches this")
    ap.add_argument("--sft-chunk", type=int, default=50)
    ap.add_argument("--sft-max-steps", type=int, default=600)
    ap.add_argument("--pair-prompts", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--rl-steps", type=int, default=None, help="default: configs/pipeline/rl.py")
    ap.add_argument("--figure", default=None)
    args = ap.parse_args(argv)
    with user_errors():
        run_pipeline(args.workdir, quick=args.quick, compare=not args.no_compare,
                     sft_target=args.sft_target, sft_chunk=args.sft_chunk,
                     sft_max_steps=args.sft_max_steps, pair_prompts=args.pair_prompts,
                     samples=args.samples, rl_steps=args.rl_steps, figure=args.figure)


if __name__ == "__main__":
    main()

"""Does the prompt curriculum reach a target accuracy in fewer rollouts than uniform
sampling? Two RL runs of one config from the same starting policy, equal in everything but
`rl.curriculum.enabled`.

    python -m rl.curriculum_experiment --workdir runs/rl_curriculum --publish_dir docs
        [--config configs/rl_curriculum.py] [--config.KEY=VALUE ...] [--target 0.5]
        [--steps N] [--quick]

Arm `uniform` runs first, with the config's supervised warm-up; arm `curriculum` starts
from the policy that warm-up ended with (`rl.init_from=<workdir>/uniform/warmup`, no
warm-up of its own). Both sample `rl.n_prompts` x G rollouts per RL step from the same
pool of training prompts (`rl.prompt_pool`) and are evaluated greedily on the same
held-out prompts every `rl.eval_every` steps. The same command resumes an interrupted
experiment (each arm resumes from its checkpoints; a finished arm is not rerun).

Writes `workdir/curriculum.png` (held-out accuracy and the fraction of rollouts in groups
whose rewards are not all equal (a running mean), against rollouts sampled) and
`workdir/curriculum_summary.json` (per arm: rollouts to reach `--target` held-out
accuracy, the accuracy at the end and its best), copied to `--publish_dir` when given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Any

from ml_collections import ConfigDict

from train.cli import parse_config
from train.errors import UserError
from train.metrics import read_metrics

ARMS = ("uniform", "curriculum")
FIGURE = "curriculum.png"
SUMMARY = "curriculum_summary.json"
SMOOTH = 10  # logged rows averaged in the figure's right panel


def _running_mean(y: list[float], k: int) -> list[float]:
    """Mean of the last `k` values (fewer at the start) at every index."""
    out, total = [], 0.0
    for i, v in enumerate(y):
        total += v - (y[i - k] if i >= k else 0.0)
        out.append(total / min(i + 1, k))
    return out


def arm_configs(base: ConfigDict, workdir: str, steps: int | None = None,
                quick: bool = False) -> dict[str, ConfigDict]:
    """The two arms' configs, workdirs under `workdir`; `quick` shrinks the model and the
    runs to a plumbing test."""
    out = {}
    for arm in ARMS:
        c = ConfigDict(base.to_dict())
        c.workdir = os.path.join(workdir, arm)
        c.train.progress = False
        c.rl.curriculum.enabled = arm == "curriculum"
        if steps is not None:
            c.train.steps = int(steps)
        if quick:
            c.model.update(dict(d_model=32, n_layers=1, n_heads=2, ffn_dim=64))
            c.rl.update(dict(n_prompts=4, group_size=4, prompt_pool=32, eval_prompts=16,
                             eval_every=2, warmup_steps=4, warmup_batch_size=16,
                             throughput_every=0))
            c.train.update(dict(steps=2 if steps is None else int(steps), log_every=1))
            c.checkpoint.async_save = False
        out[arm] = c
    if not int(base.rl.warmup_steps) and not base.get("init_from") and not base.rl.init_from:
        return out
    out["curriculum"].rl.warmup_steps = 0
    out["curriculum"].init_from = ""
    out["curriculum"].rl.init_from = os.path.join(out["uniform"].workdir, "warmup") \
        if int(out["uniform"].rl.warmup_steps) else out["uniform"].workdir
    return out


def curve(workdir: str, rollouts_per_step: int) -> dict[str, list[float]]:
    """`{'rollouts', 'eval_accuracy'}` at the evaluated RL steps and `{'rollouts_all',
    'groups_informative'}` at the logged ones, from `workdir/metrics.jsonl`."""
    rows: dict[int, dict[str, Any]] = {}
    for r in read_metrics(os.path.join(workdir, "metrics.jsonl")):
        rows[int(r["step"])] = {**rows.get(int(r["step"]), {}), **r}
    steps = sorted(rows)
    ev = [s for s in steps if "eval_accuracy" in rows[s]]
    inf = [s for s in steps if "groups_informative" in rows[s]]
    return {"rollouts": [s * rollouts_per_step for s in ev],
            "eval_accuracy": [float(rows[s]["eval_accuracy"]) for s in ev],
            "rollouts_all": [s * rollouts_per_step for s in inf],
            "groups_informative": [float(rows[s]["groups_informative"]) for s in inf]}


def rollouts_to(c: dict[str, list[float]], target: float) -> int | None:
    """The first evaluated rollout count whose held-out accuracy reaches `target`."""
    for x, y in zip(c["rollouts"], c["eval_accuracy"], strict=True):
        if y >= target:
            return int(x)
    return None


def summarize(curves: dict[str, dict[str, list[float]]], target: float) -> dict[str, Any]:
    out: dict[str, Any] = {"target": target}
    for arm, c in curves.items():
        acc = c["eval_accuracy"]
        out[arm] = {"rollouts_to_target": rollouts_to(c, target),
                    "start_accuracy": acc[0] if acc else None,
                    "final_accuracy": acc[-1] if acc else None,
                    "best_accuracy": max(acc) if acc else None,
                    "mean_groups_informative": (sum(c["groups_informative"]) /
                                                max(len(c["groups_informative"]), 1))}
    a, b = out["uniform"]["rollouts_to_target"], out["curriculum"]["rollouts_to_target"]
    out["rollout_ratio"] = a / b if a and b else None
    return out


def figure(curves: dict[str, dict[str, list[float]]], summary: dict[str, Any], path: str,
           title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for arm, color in zip(ARMS, ("tab:blue", "tab:orange"), strict=True):
        c = curves[arm]
        hit = summary[arm]["rollouts_to_target"]
        label = f"{arm} ({f'target at {hit} rollouts' if hit else 'target not reached'})"
        ax1.plot(c["rollouts"], c["eval_accuracy"], color=color, marker=".", label=label)
        ax2.plot(c["rollouts_all"], _running_mean(c["groups_informative"], SMOOTH), color=color,
                 lw=1.2, label=arm)
    ax1.axhline(summary["target"], color="gray", ls="--", lw=1, label="target")
    ax1.set_ylabel("greedy held-out accuracy")
    ax2.set_ylabel(f"rollouts in groups with a signal\n(running mean of {SMOOTH} rows)")
    for ax in (ax1, ax2):
        ax.set_xlabel("rollouts sampled")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_experiment(base: ConfigDict, workdir: str, target: float, steps: int | None = None,
                   quick: bool = False, publish_dir: str = "") -> dict[str, Any]:
    """Runs (or resumes) both arms, then writes the figure and the summary."""
    from rl import loop

    if not 0 < target <= 1:
        raise UserError(f"--target={target} must be in (0, 1]")
    configs = arm_configs(base, workdir, steps, quick)
    for arm in ARMS:
        print(f"== arm {arm}: {configs[arm].workdir}", flush=True)
        loop.run(configs[arm])
    per_step = int(configs["uniform"].rl.n_prompts) * int(configs["uniform"].rl.group_size)
    curves = {arm: curve(configs[arm].workdir, per_step) for arm in ARMS}
    summary = summarize(curves, target)
    with open(os.path.join(workdir, SUMMARY), "w") as f:
        json.dump(summary, f, indent=1)
    fig = os.path.join(workdir, FIGURE)
    task = configs["uniform"].rl.task
    figure(curves, summary, fig, f"prompt curriculum vs uniform: {task}, pool of "
           f"{configs['uniform'].rl.prompt_pool}, {per_step} rollouts per RL step")
    if publish_dir:
        os.makedirs(publish_dir, exist_ok=True)
        shutil.copy(fig, os.path.join(publish_dir, FIGURE))
        shutil.copy(os.path.join(workdir, SUMMARY), os.path.join(publish_dir, SUMMARY))
    print(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    from train.cli import user_errors

    ap = argparse.ArgumentParser(prog="python -m rl.curriculum_experiment",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/rl_curriculum.py")
    ap.add_argument("--workdir", default="runs/rl_curriculum")
    ap.add_argument("--target", type=float, default=0.5,
                    help="held-out accuracy whose rollout count is compared")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per arm (default: config)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: the plumbing only")
    ap.add_argument("--publish_dir", default="")
    args, overrides = ap.parse_known_args(argv)
    with user_errors():
        bad = [a for a in overrides if not a.startswith("--config.")]
        if bad:
            raise UserError(f"unrecognized arguments: {' '.join(bad)}")
        base = parse_config(["python -m rl.curriculum_experiment", "--config", args.config,
                             *overrides])
        run_experiment(base, args.workdir, args.target, args.steps, args.quick,
                       args.publish_dir)


if __name__ == "__main__":
    main()

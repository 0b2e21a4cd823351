"""Plot an RL run's curves from its `metrics.jsonl` (and `warmup/metrics.jsonl`): greedy
held-out accuracy (`eval_accuracy`; the warm-up's drawn at steps <= 0, ending at RL step 0)
and the rollouts' reward mean vs step.

    python -m rl.plot runs/rl_arith [--out docs/rl_arith.png]
"""

from __future__ import annotations

import argparse
import json
import os

from train.cli import user_errors
from train.errors import UserError
from train.metrics import read_metrics


def _by_step(workdir: str) -> list[dict]:
    """The rows of `workdir/metrics.jsonl` (`train.metrics.read_metrics`) merged per step,
    sorted by step, the last row of a step winning."""
    rows: dict[int, dict] = {}
    for r in read_metrics(os.path.join(workdir, "metrics.jsonl")):
        rows[int(r["step"])] = {**rows.get(int(r["step"]), {}), **r}
    return [rows[k] for k in sorted(rows)]


def plot(workdir: str, out: str, title: str | None = None) -> dict[str, float]:
    """Writes the PNG; returns the headline numbers (accuracy at the start of RL, at the
    end, the best, and the final reward mean). Raises `UserError` without a
    `metrics.jsonl` in `workdir` or an `eval_accuracy` in it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        raise UserError(f"{workdir}/metrics.jsonl does not exist")
    rows = _by_step(workdir)
    wrows = _by_step(os.path.join(workdir, "warmup"))  # [] without a warm-up
    shift = wrows[-1]["step"] if wrows else 0  # warm-up steps drawn at <= 0
    wl = [(r["step"] - shift, r["eval_accuracy"]) for r in wrows if "eval_accuracy" in r]
    ev = wl + [(r["step"], r["eval_accuracy"]) for r in rows
               if "eval_accuracy" in r and not (wl and r["step"] == 0)]
    rw = [(r["step"], r["reward_mean"]) for r in rows if "reward_mean" in r]
    if not ev:
        raise UserError(f"no eval_accuracy rows in {workdir}/metrics.jsonl")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    if rw:
        ax.plot(*zip(*rw, strict=True), color="tab:orange", alpha=0.45, lw=1,
                label="RL rollout reward mean (T=1 samples)")
    ax.plot(*zip(*ev, strict=True), "o-", color="tab:blue", ms=3, lw=1.6,
            label="greedy accuracy, held-out prompts")
    ax.axvline(0, color="gray", ls="--", lw=1)
    ax.text(0, 0.97, " RL ->", color="gray", va="top", transform=ax.get_xaxis_transform())
    if wl:
        ax.text(0, 0.97, "warm-up ", color="gray", va="top", ha="right",
                transform=ax.get_xaxis_transform())
    ax.set_xlabel("step (warm-up steps <= 0, RL steps > 0)")
    ax.set_ylabel("accuracy / reward")
    ax.set_ylim(0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    start = [a for s, a in ev if s <= 0]
    rl = [a for s, a in ev if s > 0]
    return {
        "eval_accuracy_rl_start": start[-1] if start else ev[0][1],
        "eval_accuracy_final": ev[-1][1],
        "eval_accuracy_best": max(rl) if rl else ev[-1][1],
        "reward_mean_final": rw[-1][1] if rw else float("nan"),
        "rl_steps": max((s for s, _ in ev), default=0),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m rl.plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("workdir")
    ap.add_argument("--out", default=None, help="PNG path (default: WORKDIR/rl_curve.png)")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    out = args.out or os.path.join(args.workdir, "rl_curve.png")
    with user_errors():
        print(json.dumps({"png": out, **plot(args.workdir, out, args.title)}))


if __name__ == "__main__":
    main()

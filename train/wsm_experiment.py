"""The WSM experiment (Tian et al. 2025): LR decay vs checkpoint merging of a constant-LR
run, at equal steps and data.

    python -m train.wsm_experiment --config configs/scaling/wsm.py --sweep.publish_dir=docs/scaling
        trains the sweep of `configs/scaling/wsm.py` (`train.sweep.run_sweep`: finished
        points are skipped, an interrupted one resumes), then does the merges below.
    python -m train.wsm_experiment --workdir runs/scaling/wsm [--last 2,4,8,16] [--every 20]
        [--decay-shapes linear,sqrt] [--publish_dir docs/scaling]
        the merges only, on the finished points of a sweep.

Every finished point of the sweep in `workdir` (a subdirectory with `done.json`) is a run;
its schedule label comes from its `config.json` (`optim.schedule`, `optim.wsd.decay`).
Every constant-LR run's last K checkpoints (K in `--last`, those at multiples of
`--every`) are merged with `train.merge.merge` (written to a temporary directory and
evaluated there) with uniform weights and with the weights that emulate each decay shape
in `--decay-shapes` (`train.merge.decay_weights`). The eval loss of a run is its last
logged `eval_loss` (the trainer's, at the final step); that of a merge is
`train.merge`'s on the same eval batches (the first `train.eval_batches` of the held-out
split), so K=1 is the constant run's final eval loss. Seeds (points that differ only in
`seed`) are averaged.

Writes `workdir/wsm_summary.json` (every number, per seed and averaged),
`workdir/wsm.md` (the table, also printed) and `workdir/wsm.png` (left: eval loss against
step per schedule, the best merge of each weighting marked at the final step; right: the
merged eval loss against K, with the schedules' final eval losses as horizontal lines),
copied to `--publish_dir` when given. With `--config`, the sweep's own figure and summary
(`sweep.name`, here `wsm_schedules`) are written as by `python -m train.sweep`; the merge
settings are `config.sweep.wsm` (`merge_last`, `decay_shapes`, `merge_every`).

References:
  Tian et al., `WSM: Decay-Free Learning Rate Schedule via Checkpoint Merging for LLM
  Pre-training <https://arxiv.org/abs/2507.17634>`_, 2025.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from train import merge as merge_lib
from train import plots, sweep
from train.errors import UserError
from train.metrics import read_metrics

FIGURE_NAME = "wsm"  # the files `train.sweep.write_experiment` writes:
SUMMARY_FILE = f"{FIGURE_NAME}_summary.json"
TABLE_FILE = f"{FIGURE_NAME}.md"
SHAPE_LABELS = {"linear": "linear", "sqrt": "1-sqrt", "cosine": "cosine"}


@dataclasses.dataclass
class Run:
    """A finished point of the sweep: its schedule label, seed and eval-loss curve."""

    name: str
    workdir: str
    schedule: str  # "constant", "cosine", "WSD linear", ...
    seed: int
    steps: np.ndarray  # the steps with an eval_loss
    eval_loss: np.ndarray

    @property
    def final(self) -> float:
        return float(self.eval_loss[-1]) if self.eval_loss.size else math.nan


def schedule_label(optim: Any) -> str:
    """`constant`, `cosine` or `WSD <decay shape>` of an `optim` config section."""
    name = str(optim["schedule"])
    if name == "constant":
        return "constant"
    if name == "warmup_cosine":
        return "cosine"
    if name in ("wsd", "warmup_stable_decay"):
        return "WSD " + SHAPE_LABELS.get(str(optim["wsd"]["decay"]), str(optim["wsd"]["decay"]))
    return name


def find_runs(workdir: str) -> list[Run]:
    """The finished points under `workdir` (subdirectories with `done.json` and
    `config.json`), sorted by name; `UserError` when there are none."""
    runs = []
    for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
        d = os.path.join(workdir, name)
        if not (os.path.isfile(os.path.join(d, "done.json"))
                and os.path.isfile(os.path.join(d, "config.json"))):
            continue
        with open(os.path.join(d, "config.json")) as f:
            config = json.load(f)
        # A resumed run logs again the steps after its last checkpoint: the last row wins.
        evals = {int(r["step"]): float(r["eval_loss"]) for r in read_metrics(d)
                 if "eval_loss" in r}
        steps = sorted(evals)
        runs.append(Run(name, d, schedule_label(config["optim"]), int(config.get("seed", 0)),
                        np.array(steps, np.float64),
                        np.array([evals[s] for s in steps], np.float64)))
    if not runs:
        raise UserError(f"{workdir!r} has no finished sweep points (run the sweep first: "
                        "python -m train.wsm_experiment --config configs/scaling/wsm.py)")
    return runs


def merge_kinds(shapes: Sequence[str]) -> list[tuple[str, str, str]]:
    """(label, `--weights`, `--decay-shape`) of uniform and of each decay shape."""
    return [("uniform", "uniform", "linear")] + [
        (f"decay {SHAPE_LABELS.get(s, s)}", "decay", s) for s in shapes]


def merge_run(run: Run, last: Sequence[int], shapes: Sequence[str],
              every: int | None) -> list[dict[str, Any]]:
    """The merges of one constant-LR run: a row per (K, weighting) with the merged steps,
    weights and eval losses (`train.merge.merge`, into a temporary directory)."""
    out = []
    for k in last:
        for label, weights, shape in merge_kinds(shapes):
            with tempfile.TemporaryDirectory(prefix="wsm-merge-") as tmp:
                r = merge_lib.merge(run.workdir, os.path.join(tmp, "merged"), int(k), every,
                                    weights, shape)
            if r.eval_loss is None:
                raise UserError(f"{run.workdir}: no eval split in the run's config "
                                "(set train.eval_every > 0 and data.eval_permille > 0)")
            out.append({"run": run.name, "seed": run.seed, "K": int(k), "weights": label,
                        "steps": list(r.steps), "window": r.steps[-1] - r.steps[0],
                        "merge_weights": list(r.weights), "eval_loss": r.eval_loss,
                        "eval_loss_newest": r.eval_loss_newest})
            print(f"{run.name}: K={k} {label}: steps {r.steps[0]}..{r.steps[-1]}, eval_loss "
                  f"{r.eval_loss:.4f} (step {r.steps[-1]}: {r.eval_loss_newest:.4f})")
    return out


def _mean(xs: Sequence[float]) -> float:
    return float(np.mean(xs)) if len(xs) else math.nan


def summarize(runs: Sequence[Run], merges: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per schedule and per (weighting, K): the final eval loss per seed and its mean."""
    schedules: dict[str, Any] = {}
    for r in runs:
        s = schedules.setdefault(r.schedule, {"per_seed": {}})
        s["per_seed"][str(r.seed)] = r.final
    for s in schedules.values():
        s["eval_loss"] = _mean(list(s["per_seed"].values()))
    table: dict[tuple[str, int], dict[str, Any]] = {}
    for m in merges:
        t = table.setdefault((m["weights"], m["K"]), {"weights": m["weights"], "K": m["K"],
                                                      "window": m["window"], "per_seed": {}})
        t["per_seed"][str(m["seed"])] = m["eval_loss"]
    rows = list(table.values())
    for t in rows:
        t["eval_loss"] = _mean(list(t["per_seed"].values()))
    best = {}
    for t in rows:
        if t["weights"] not in best or t["eval_loss"] < best[t["weights"]]["eval_loss"]:
            best[t["weights"]] = {"K": t["K"], "window": t["window"], "eval_loss": t["eval_loss"]}
    return {"schedules": schedules, "merged": rows, "best_merge": best, "merge_runs": merges}


def table(summary: dict[str, Any]) -> str:
    """A markdown table: every schedule's and merge's mean final eval loss (per seed in
    brackets) and its difference to the constant run and to WSD linear."""
    sched = summary["schedules"]
    seeds = sorted({s for v in sched.values() for s in v["per_seed"]}, key=int)
    ref = {k: sched[k]["eval_loss"] for k in ("constant", "WSD linear") if k in sched}
    head = "| run | eval loss" + (f" (mean of seeds {', '.join(seeds)})" if len(seeds) > 1 else "")
    cols = [c for c in ("constant", "WSD linear") if c in ref]
    lines = [head + " | per seed | " + " | ".join(f"vs {c}" for c in cols) + " |",
             "| --- | --- | --- |" + " --- |" * len(cols)]

    def row(name: str, entry: dict[str, Any]) -> None:
        per = " / ".join(f"{entry['per_seed'][s]:.4f}" for s in seeds if s in entry["per_seed"])
        diffs = " | ".join(f"{entry['eval_loss'] - ref[c]:+.4f}" for c in cols)
        lines.append(f"| {name} | {entry['eval_loss']:.4f} | {per} | {diffs} |")

    for name in sorted(sched, key=lambda n: (n != "constant", n)):
        row(name + (" (final checkpoint)" if name == "constant" else ""), sched[name])
    for t in summary["merged"]:
        row(f"constant + merge, {t['weights']}, K={t['K']} ({t['window']} steps)", t)
    return "\n".join(lines)


# ---- the figure --------------------------------------------------------------------------

_MARKERS = {"uniform": "o", "decay linear": "s", "decay 1-sqrt": "^", "decay cosine": "D"}


def _mean_curve(runs: Sequence[Run]) -> tuple[np.ndarray, np.ndarray]:
    """The mean eval-loss curve over seeds, on the steps that all of them have."""
    common = sorted(set.intersection(*[set(r.steps.tolist()) for r in runs]))
    ys = [np.array([r.eval_loss[list(r.steps).index(s)] for s in common]) for r in runs]
    return np.array(common), np.mean(ys, axis=0)


def draw(runs: Sequence[Run], summary: dict[str, Any], path: str, title: str) -> None:
    """Left: eval loss against step per schedule (mean over seeds) from 30% of training,
    the best merge of each weighting marked at the final step; right: merged eval loss
    against K, the schedules' final eval losses as horizontal lines."""
    plt = plots._plt()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11.5, 4.3))
    colors = plt.get_cmap("tab10")
    names = sorted({r.schedule for r in runs}, key=lambda n: (n != "constant", n))
    end = max(float(r.steps[-1]) for r in runs if r.steps.size)
    lo, hi = math.inf, -math.inf
    for i, name in enumerate(names):
        x, y = _mean_curve([r for r in runs if r.schedule == name])
        keep = x >= 0.3 * end
        ax0.plot(x[keep], y[keep], color=colors(i), lw=1.4, label=name)
        lo, hi = min(lo, y[keep].min()), max(hi, y[keep].max())
        final = summary["schedules"][name]["eval_loss"]
        ax1.axhline(final, color=colors(i), ls="--", lw=1.2, label=f"{name} {final:.3f}")
    merged = summary["merged"]
    for weights, b in summary["best_merge"].items():
        ax0.plot(end, b["eval_loss"], _MARKERS.get(weights, "*"), color="k", mfc="none", ms=8,
                 label=f"merge {weights}, K={b['K']} ({b['eval_loss']:.3f})")
        lo = min(lo, b["eval_loss"])
        sel = sorted([t for t in merged if t["weights"] == weights], key=lambda t: t["K"])
        ax1.plot([t["K"] for t in sel], [t["eval_loss"] for t in sel],
                 _MARKERS.get(weights, "*") + "-", color="k", mfc="none", lw=1,
                 label=f"constant + merge, {weights}")
    ax0.set_ylim(lo - 0.02, hi + 0.02)
    ax0.set_xlabel("step")
    ax0.set_ylabel("eval loss (mean over seeds)")
    ax0.set_title("eval loss; merges of the constant run at the end")
    ax0.grid(alpha=0.3)
    ax0.legend(fontsize=7.5)
    ks = sorted({t["K"] for t in merged})
    if ks:
        ax1.set_xscale("log", base=2)
        ax1.set_xticks(ks)
        windows = {t["K"]: t["window"] for t in merged}
        ax1.set_xticklabels([f"{k}\n({windows[k]})" for k in ks])
    ax1.set_xlabel("checkpoints merged K (window in steps)")
    ax1.set_ylabel("final eval loss (mean over seeds)")
    ax1.set_title("constant LR + merging vs decay")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7.5)
    plots._save(plt, fig, path, title)


# ---- the experiment ----------------------------------------------------------------------


def analyze(workdir: str, last: Sequence[int] = (2, 4, 8, 16),
            shapes: Sequence[str] = ("linear", "sqrt"), every: int | None = None,
            publish_dir: str = "", title: str = "") -> dict[str, Any]:
    """Merges every constant-LR run of the sweep in `workdir`, writes `wsm_summary.json`,
    `wsm.md` and `wsm.png` there (the figure also to `publish_dir`), prints the table and
    returns the summary."""
    for s in shapes:
        if s not in merge_lib.DECAY_SHAPES:
            raise UserError(f"--decay-shapes: {s!r} is not one of "
                            f"{', '.join(merge_lib.DECAY_SHAPES)}")
    runs = find_runs(workdir)
    constant = [r for r in runs if r.schedule == "constant"]
    if not constant:
        raise UserError(f"{workdir!r} has no finished constant-LR point to merge")
    merges = [m for r in constant for m in merge_run(r, last, shapes, every)]
    summary = summarize(runs, merges)
    summary["settings"] = {"last": [int(k) for k in last], "decay_shapes": list(shapes),
                           "every": every}
    text = table(summary)
    default_title = "WSM: LR decay vs merging a constant-LR run"
    sweep.write_experiment(workdir, FIGURE_NAME, summary, text,
                           lambda path: draw(runs, summary, path, title or default_title),
                           publish_dir)
    return summary


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--last={text!r}: expected comma-separated integers") from None


def _from_config(argv: list[str]) -> None:
    config, publish = sweep.run_experiment_sweep(argv, "wsm", "configs/scaling/wsm.py")
    w = config.sweep.wsm
    every = int(w.get("merge_every", 0) or 0) or None
    analyze(str(config.workdir), tuple(w.merge_last), tuple(w.decay_shapes), every, publish,
            str(w.get("title", "") or ""))


def main(argv: list[str] | None = None) -> None:
    """`--config FILE [--config.k=v ...] [--sweep.publish_dir=D]` (sweep, then merges) or
    `--workdir DIR [--last ...] [--every N] [--decay-shapes ...] [--publish_dir D]`."""
    from train.cli import user_errors

    argv = list(sys.argv if argv is None else argv)
    with user_errors():
        if sweep.names_config(argv):
            _from_config(argv)
            return
        ap = argparse.ArgumentParser(prog="python -m train.wsm_experiment",
                                     description=__doc__.splitlines()[0])
        ap.add_argument("--workdir", required=True, help="the sweep's directory")
        ap.add_argument("--last", default="2,4,8,16", help="merge windows K, comma-separated")
        ap.add_argument("--every", type=int, default=None,
                        help="merge only checkpoints at multiples of this step")
        ap.add_argument("--decay-shapes", default="linear,sqrt",
                        help="decays emulated by --weights=decay merges, comma-separated")
        ap.add_argument("--publish_dir", "--publish-dir", default="",
                        help="also copy wsm.png here")
        args = ap.parse_args(argv[1:])
        shapes = tuple(s.strip() for s in args.decay_shapes.split(",") if s.strip())
        analyze(args.workdir, _ints(args.last), shapes, args.every, args.publish_dir)


if __name__ == "__main__":
    main()

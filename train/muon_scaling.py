"""Muon vs AdamW by scaling laws (Moonlight's method, Liu et al. 2025, Sec. 3): Muon's
compute multiplier over AdamW at matched loss, from a loss-vs-FLOPs power law per
optimizer fitted through the LR-tuned runs of several model sizes.

    python -m train.muon_scaling --config configs/scaling/muon_scaling.py --sweep.publish_dir=docs/scaling
        trains the sweep of `configs/scaling/muon_scaling.py` (`train.sweep.run_sweep`:
        finished points are skipped, an interrupted one resumes), then fits.
    python -m train.muon_scaling --workdir runs/scaling/muon_scaling [--baseline adamw]
        [--candidate muon] [--metric eval_loss] [--n-boot 1000] [--irreducible]
        [--publish_dir docs/scaling]
        the fit only, on the finished points of a sweep (its `results.csv`).

Every finished point (`status` ok, finite metric) of `results.csv` is a run of one
optimizer (`optim.name`) at one size (`model.d_model`) and LR (`optim.lr`). Per optimizer
and size the LR with the lowest final `--metric` is kept: its (training FLOPs, loss) is a
point of that optimizer's frontier. `train.scaling.compute_multiplier` fits L = a C^-b
(+ E with `--irreducible`) to each frontier and returns C_baseline(L*) / C_candidate(L*)
(> 1: the candidate needs that many times less compute) at L* = the lowest loss both
frontiers reach, with a bootstrap std and 95% interval over the points. A best LR at the
edge of its grid is flagged (the optimum may lie outside it).

Writes `workdir/muon_scaling_summary.json` (every number), `workdir/muon_scaling.md`
(the table, also printed) and `workdir/muon_scaling.png` (loss against FLOPs, log-log:
every LR faint, the tuned points bold, the fitted laws, the multiplier in the title),
copied to `--publish_dir` when given. With `--config`, the sweep's own figure and summary
(`sweep.name`, here `muon_scaling_sweep`) are written as by `python -m train.sweep`; the
fit settings are `config.sweep.muon_scaling`.

References:
  Liu et al., `Muon is Scalable for LLM Training <https://arxiv.org/abs/2502.16982>`_, 2025.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from train import plots, sweep
from train.errors import UserError
from train.scaling import compute_multiplier

FIGURE_NAME = "muon_scaling"  # the files `train.sweep.write_experiment` writes:
SUMMARY_FILE = f"{FIGURE_NAME}_summary.json"
TABLE_FILE = f"{FIGURE_NAME}.md"
LABELS = {"adamw": "AdamW", "muon": "Muon"}


@dataclasses.dataclass
class Point:
    """A finished run: optimizer, width, LR, training FLOPs, parameters and final loss."""

    optimizer: str
    d_model: int
    lr: float
    flops: float
    params: int
    loss: float


def read_points(workdir: str, metric: str = "eval_loss") -> list[Point]:
    """The finished points of `workdir/results.csv` with a finite `metric`; `UserError`
    when there is no such file or no such point."""
    path = os.path.join(workdir, "results.csv")
    if not os.path.isfile(path):
        raise UserError(f"{path!r} does not exist (run the sweep first: python -m "
                        "train.muon_scaling --config configs/scaling/muon_scaling.py)")
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("status", "ok") != "ok":
                continue
            try:
                loss = float(row[metric])
            except (KeyError, ValueError):
                raise UserError(f"{path}: no numeric column {metric!r}") from None
            if not math.isfinite(loss):
                continue
            out.append(Point(str(row["optim.name"]), int(float(row["model.d_model"])),
                             float(row["optim.lr"]), float(row["flops"]),
                             int(float(row.get("params") or 0)), loss))
    if not out:
        raise UserError(f"{path}: no finished point with a finite {metric!r}")
    return out


def tuned(points: Sequence[Point]) -> dict[str, list[dict[str, Any]]]:
    """Per optimizer, per width (ascending): the best LR's point, the LR grid and whether
    the best LR is at the grid's edge."""
    out: dict[str, list[dict[str, Any]]] = {}
    for opt in sorted({p.optimizer for p in points}):
        rows = []
        for d in sorted({p.d_model for p in points if p.optimizer == opt}):
            group = [p for p in points if p.optimizer == opt and p.d_model == d]
            best = min(group, key=lambda p: p.loss)
            lrs = sorted(p.lr for p in group)
            rows.append({"d_model": d, "lr": best.lr, "flops": best.flops, "params": best.params,
                         "loss": best.loss, "lr_grid": lrs,
                         "losses": {f"{p.lr:g}": p.loss for p in sorted(group, key=lambda p: p.lr)},
                         "lr_at_edge": len(lrs) > 1 and best.lr in (lrs[0], lrs[-1])})
        out[opt] = rows
    return out


def summarize(points: Sequence[Point], baseline: str = "adamw", candidate: str = "muon",
              n_boot: int = 1000, irreducible: bool = False) -> dict[str, Any]:
    """The tuned frontiers and `compute_multiplier(candidate, baseline)`; also, per width,
    the loss ratio and the compute multiplier at the baseline's loss of that width."""
    front = tuned(points)
    for name in (baseline, candidate):
        if name not in front:
            raise UserError(f"no finished point of optimizer {name!r} "
                            f"(have: {', '.join(sorted(front)) or 'none'})")
        if len({r["flops"] for r in front[name]}) < (3 if irreducible else 2):
            raise UserError(f"optimizer {name!r}: too few sizes with distinct FLOPs for a fit")
    cand, base = front[candidate], front[baseline]
    m = compute_multiplier([r["flops"] for r in cand], [r["loss"] for r in cand],
                           [r["flops"] for r in base], [r["loss"] for r in base],
                           irreducible=irreducible, n_boot=n_boot)
    law = {candidate: m.law_a, baseline: m.law_b}
    per_size = []
    for rb in base:
        rc = next((r for r in cand if r["d_model"] == rb["d_model"]), None)
        if rc is None:
            continue
        # The candidate's compute (on its law) for the baseline's loss at this width.
        gap = rb["loss"] - law[candidate].offset
        c_needed = ((gap / law[candidate].coef) ** (1.0 / law[candidate].exponent)
                    if gap > 0 else math.nan)
        per_size.append({"d_model": rb["d_model"], "flops": rb["flops"],
                         f"loss_{baseline}": rb["loss"], f"loss_{candidate}": rc["loss"],
                         "loss_diff": rc["loss"] - rb["loss"],
                         "multiplier_at_baseline_loss": rb["flops"] / c_needed})
    return {
        "baseline": baseline, "candidate": candidate, "tuned": front,
        "multiplier": m.multiplier, "std": m.std, "ci": list(m.ci), "level": m.level,
        "at_loss": m.at_loss, "n_boot": m.n_boot, "irreducible": irreducible,
        "laws": {k: {"coef": v.coef, "exponent": v.exponent, "offset": v.offset}
                 for k, v in law.items()},
        "per_size": per_size,
    }


def table(summary: dict[str, Any]) -> str:
    """Markdown: per width, each optimizer's tuned LR and loss; then the multiplier."""
    b, c = summary["baseline"], summary["candidate"]
    lb, lc = LABELS.get(b, b), LABELS.get(c, c)
    front = summary["tuned"]
    lines = [f"| d_model | FLOPs | {lb} LR | {lb} loss | {lc} LR | {lc} loss | "
             f"{lc} - {lb} | {lb} loss reached by {lc} with |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary["per_size"]:
        rb = next(r for r in front[b] if r["d_model"] == s["d_model"])
        rc = next(r for r in front[c] if r["d_model"] == s["d_model"])

        def lr(r: dict[str, Any]) -> str:
            return f"{r['lr']:g}" + (" (edge)" if r["lr_at_edge"] else "")

        lines.append(f"| {s['d_model']} | {s['flops']:.3g} | {lr(rb)} | {rb['loss']:.4f} | "
                     f"{lr(rc)} | {rc['loss']:.4f} | {s['loss_diff']:+.4f} | "
                     f"{1 / s['multiplier_at_baseline_loss']:.2f}x the FLOPs |")
    lo, hi = summary["ci"]
    lines.append("")
    lines.append(f"{lc} compute multiplier over {lb} at loss {summary['at_loss']:.4f}: "
                 f"**{summary['multiplier']:.2f}x** (bootstrap std {summary['std']:.2f}, "
                 f"{100 * summary['level']:.0f}% interval {lo:.2f}-{hi:.2f}, "
                 f"{summary['n_boot']} resamples); laws L = a C^-b: " + ", ".join(
                     f"{LABELS.get(k, k)} a={v['coef']:.3g} b={-v['exponent']:.4f}"
                     + (f" E={v['offset']:.3f}" if summary["irreducible"] else "")
                     for k, v in summary["laws"].items()))
    return "\n".join(lines)


def draw(points: Sequence[Point], summary: dict[str, Any], path: str, title: str) -> None:
    """Loss against training FLOPs (log-log): every LR faint, the tuned point per width
    bold, each optimizer's fitted law, the matched loss as a dotted line."""
    plt = plots._plt()
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    colors = {summary["baseline"]: "tab:blue", summary["candidate"]: "tab:red"}
    allc = [p.flops for p in points]
    xs = np.geomspace(min(allc) / 1.3, max(allc) * 1.3, 100)
    for name in (summary["baseline"], summary["candidate"]):
        col, lab = colors[name], LABELS.get(name, name)
        mine = [p for p in points if p.optimizer == name]
        ax.scatter([p.flops for p in mine], [p.loss for p in mine], s=14, color=col,
                   alpha=0.3, lw=0)
        rows = summary["tuned"][name]
        ax.plot([r["flops"] for r in rows], [r["loss"] for r in rows], "o", color=col, ms=7,
                label=f"{lab}, best of its LR grid per width")
        for r in rows:
            ax.annotate(f"d={r['d_model']}\nlr {r['lr']:g}", (r["flops"], r["loss"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=6.5, color=col)
        law = summary["laws"][name]
        ys = law["coef"] * xs ** law["exponent"] + law["offset"]
        ax.plot(xs, ys, "-", color=col, lw=1.3,
                label=f"{lab} fit: L = {law['coef']:.3g} C^-{-law['exponent']:.4f}"
                + (f" + {law['offset']:.3f}" if summary["irreducible"] else ""))
    ax.axhline(summary["at_loss"], color="k", ls=":", lw=0.9,
               label=f"matched loss {summary['at_loss']:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("final eval loss")
    lo, hi = summary["ci"]
    lc, lb = (LABELS.get(summary[k], summary[k]) for k in ("candidate", "baseline"))
    ax.set_title(f"{lc} needs {summary['multiplier']:.2f}x less compute than {lb} "
                 f"(bootstrap {100 * summary['level']:.0f}%: {lo:.2f}-{hi:.2f})", fontsize=9.5)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7.5)
    plots._save(plt, fig, path, title)


def analyze(workdir: str, baseline: str = "adamw", candidate: str = "muon",
            metric: str = "eval_loss", n_boot: int = 1000, irreducible: bool = False,
            publish_dir: str = "", title: str = "") -> dict[str, Any]:
    """Fits the finished sweep in `workdir`, writes `muon_scaling_summary.json`,
    `muon_scaling.md` and `muon_scaling.png` there (the figure also to `publish_dir`),
    prints the table and returns the summary."""
    points = read_points(workdir, metric)
    summary = summarize(points, baseline, candidate, n_boot, irreducible)
    summary["metric"] = metric
    text = table(summary)
    default_title = "Muon vs AdamW: loss against training FLOPs"
    sweep.write_experiment(workdir, FIGURE_NAME, summary, text,
                           lambda path: draw(points, summary, path, title or default_title),
                           publish_dir)
    return summary


def _from_config(argv: list[str]) -> None:
    config, publish = sweep.run_experiment_sweep(argv, "muon_scaling", "configs/scaling/muon_scaling.py")
    s = config.sweep.muon_scaling
    analyze(str(config.workdir), str(s.get("baseline", "adamw")),
            str(s.get("candidate", "muon")), str(s.get("metric", "eval_loss")),
            int(s.get("n_boot", 1000)), bool(s.get("irreducible", False)), publish,
            str(s.get("title", "") or ""))


def main(argv: list[str] | None = None) -> None:
    """`--config FILE [--config.k=v ...] [--sweep.publish_dir=D]` (sweep, then fit) or
    `--workdir DIR [--baseline ...] [--candidate ...] [--publish_dir D]` (fit only)."""
    from train.cli import user_errors

    argv = list(sys.argv if argv is None else argv)
    with user_errors():
        if sweep.names_config(argv):
            _from_config(argv)
            return
        ap = argparse.ArgumentParser(prog="python -m train.muon_scaling",
                                     description=__doc__.splitlines()[0])
        ap.add_argument("--workdir", required=True, help="the sweep's directory")
        ap.add_argument("--baseline", default="adamw", help="optim.name of the reference")
        ap.add_argument("--candidate", default="muon", help="optim.name compared with it")
        ap.add_argument("--metric", default="eval_loss", help="results.csv loss column")
        ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
        ap.add_argument("--irreducible", action="store_true",
                        help="fit L = a C^-b + E (needs >= 3 sizes)")
        ap.add_argument("--publish_dir", "--publish-dir", default="",
                        help="also copy muon_scaling.png here")
        args = ap.parse_args(argv[1:])
        analyze(args.workdir, args.baseline, args.candidate, args.metric, args.n_boot,
                args.irreducible, args.publish_dir)


if __name__ == "__main__":
    main()

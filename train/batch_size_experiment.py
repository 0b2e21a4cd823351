"""Batch-size science: loss at equal tokens for batch sizes 1..64 sequences, Adam's beta2
fixed vs scaled to a constant half-life in tokens (Marek et al. 2025), against the
measured gradient noise scale B_simple (McCandlish et al. 2018).

    python -m train.batch_size_experiment --config configs/scaling/batch_size.py
        [--sweep.publish_dir=docs/scaling]
        trains the sweep of `configs/scaling/batch_size.py` (`train.sweep.run_sweep`:
        finished points are skipped, an interrupted one resumes), then the analysis below.
    python -m train.batch_size_experiment --workdir runs/scaling/batch_size [--ref-batch 16]
        [--b2 0.95] [--noise-tail 0.5] [--publish_dir docs/scaling]
        the analysis only, on the finished points of a sweep.

Every finished point of the sweep in `workdir` (a subdirectory with `done.json`) is a run;
its batch size B (sequences), beta2 and sequence length come from its `config.json`. A run
whose beta2 is `--b2` belongs to the "fixed" arm; any other to the "scaled" arm (beta2 =
b2^(B / ref_batch): the same half-life in tokens as b2 at the reference batch); the
reference batch's run (beta2 = b2) belongs to both. A run's loss is its last logged
`eval_loss` (the same held-out sequences at every B when the config keeps
`train.eval_batches x B` fixed); its curves are eval loss against tokens (step x B x seq)
and against steps.

The noise scale: every run that logged `noise/*` (`train.noise_scale_every`, which needs
`train.grad_accum >= 2`) gives B_simple = tr(Sigma) / |G|^2 with the numerator and
denominator averaged over the rows of its last `--noise-tail` fraction of steps
(`train.noise_scale.from_metrics`), in tokens, and in sequences (/ tokens per sequence).

The batch size where returns diminish, measured: for a target eval loss that every run of
an arm reaches (the worst final loss of the arm), the tokens E(B) each run needs to reach
it (linear interpolation between evaluations; runs already there at their first
evaluation are left out) and the steps S = E / (B x seq). McCandlish
et al.'s model S = S_min (1 + B_crit / B), i.e. E = E_min + S_min B, fitted by least squares
gives B_crit = E_min / S_min in sequences (E_min: tokens at B -> 0; S_min: steps at
B -> inf). It is a rough estimate here: one seed, a fixed LR and a schedule that ends at
the budget (every run reaches the target late).

Writes `workdir/batch_size_summary.json` (every number), `workdir/batch_size.md` (the
table, also printed) and `workdir/batch_size.png` (left: final eval loss against B per arm,
B_simple and B_crit as vertical lines; middle: eval loss against tokens; right: eval loss
against steps), copied to `--publish_dir` when given. With `--config`, the sweep's own
figure and summary (`sweep.name`) are written as by `python -m train.sweep`; the analysis
settings are `config.sweep.batch_size` (`ref_batch`, `b2`, `noise_tail`).

References:
  McCandlish, Kaplan, Amodei et al., `An Empirical Model of Large-Batch Training
  <https://arxiv.org/abs/1812.06162>`_, 2018.
  Marek et al., `Small Batch Size Training for Language Models: When Vanilla SGD Works,
  and Why Gradient Accumulation Is Wasteful <https://arxiv.org/abs/2507.07101>`_, 2025.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from train import noise_scale, plots, sweep
from train.errors import UserError
from train.metrics import read_metrics

FIGURE_NAME = "batch_size"  # the files `train.sweep.write_experiment` writes:
SUMMARY_FILE = f"{FIGURE_NAME}_summary.json"
TABLE_FILE = f"{FIGURE_NAME}.md"
ARMS = ("fixed", "scaled")


@dataclasses.dataclass
class Run:
    """A finished point: batch size (sequences), beta2, and its eval-loss curve."""

    name: str
    batch: int
    b2: float
    seq_len: int
    steps: np.ndarray  # the steps with an eval_loss
    eval_loss: np.ndarray
    rows: list[dict[str, Any]]

    @property
    def tokens(self) -> np.ndarray:
        return self.steps * self.batch * self.seq_len

    @property
    def final(self) -> float:
        return float(self.eval_loss[-1]) if self.eval_loss.size else math.nan

    def arms(self, b2: float) -> tuple[str, ...]:
        """The arms this run belongs to: "fixed" (beta2 = b2), "scaled", or both (the
        reference batch, where the scaled beta2 is b2)."""
        if not math.isclose(self.b2, b2, rel_tol=0, abs_tol=1e-9):
            return ("scaled",)
        return ("fixed",) if self.batch != self._ref else ("fixed", "scaled")

    _ref: int = 0


def find_runs(workdir: str, ref_batch: int) -> list[Run]:
    """The finished points under `workdir` (subdirectories with `done.json` and
    `config.json`), sorted by batch size; `UserError` when there are none."""
    runs = []
    for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []:
        d = os.path.join(workdir, name)
        if not (os.path.isfile(os.path.join(d, "done.json"))
                and os.path.isfile(os.path.join(d, "config.json"))):
            continue
        with open(os.path.join(d, "config.json")) as f:
            config = json.load(f)
        rows = read_metrics(d)
        # A resumed run logs again the steps after its last checkpoint: the last row wins.
        evals = {int(r["step"]): float(r["eval_loss"]) for r in rows if "eval_loss" in r}
        steps = sorted(evals)
        run = Run(name, int(config["data"]["batch_size"]), float(config["optim"]["b2"]),
                  int(config["data"]["seq_len"]), np.array(steps, np.float64),
                  np.array([evals[s] for s in steps], np.float64), rows)
        run._ref = int(ref_batch)
        runs.append(run)
    if not runs:
        raise UserError(f"{workdir!r} has no finished sweep points (run the sweep first: python "
                        "-m train.batch_size_experiment --config configs/scaling/batch_size.py)")
    return sorted(runs, key=lambda r: (r.batch, r.b2))


def measure_noise(run: Run, tail: float = 0.5) -> dict[str, Any] | None:
    """B_simple of a run that logged `noise/*`, averaged over its last `tail` fraction of
    steps, in tokens and sequences; None when it logged none."""
    rows = [r for r in run.rows if all(k in r for k in noise_scale.METRIC_KEYS)]
    if not rows:
        return None
    last = max(int(r["step"]) for r in run.rows)
    keep = [r for r in rows if int(r["step"]) >= (1.0 - tail) * last] or rows
    b_simple, g_sq, trace = noise_scale.from_metrics(keep)
    seq_tokens = float(np.mean([float(r["noise/b_big"]) for r in keep])) / run.batch
    quarters = []  # B_simple grows as the loss falls (McCandlish et al., Fig. 7)
    for q in range(4):
        sel = [r for r in rows if q * last / 4 < int(r["step"]) <= (q + 1) * last / 4]
        if sel:
            bq = noise_scale.from_metrics(sel)[0]
            quarters.append({"steps": [int(sel[0]["step"]), int(sel[-1]["step"])],
                             "train_loss": float(np.mean([float(r["loss"]) for r in sel
                                                          if "loss" in r] or [math.nan])),
                             "b_simple_sequences": bq / seq_tokens})
    return {"run": run.name, "batch": run.batch, "rows": len(keep), "from_step": min(
        int(r["step"]) for r in keep), "b_simple_tokens": b_simple, "g_sq": g_sq,
        "trace": trace, "tokens_per_sequence": seq_tokens,
        "b_simple_sequences": b_simple / seq_tokens, "by_quarter": quarters}


def tokens_to_reach(run: Run, target: float) -> float:
    """The first tokens at which the eval-loss curve reaches `target` (linear between
    evaluations); NaN when it never does."""
    x, y = run.tokens, run.eval_loss
    for i in range(len(y)):
        if y[i] <= target:
            if i == 0:
                return float(x[0])
            f = (y[i - 1] - target) / (y[i - 1] - y[i])
            return float(x[i - 1] + f * (x[i] - x[i - 1]))
    return math.nan


def critical_batch(runs: Sequence[Run]) -> dict[str, Any]:
    """The fit E = E_min + S_min B (McCandlish et al.) over `runs` at the worst final loss:
    `target`, per-run tokens and steps, `e_min` (tokens), `s_min` (steps) and `b_crit`
    (sequences; NaN when the fit has no positive slope and intercept). Runs already below
    the target at their first evaluation (`censored`) are left out of the fit."""
    target = max(r.final for r in runs)
    per = []
    for r in runs:
        e = tokens_to_reach(r, target)
        # Reached at the first evaluation: E is only an upper bound, left out of the fit.
        censored = bool(r.eval_loss.size and r.eval_loss[0] <= target)
        per.append({"batch": r.batch, "tokens": e, "steps": e / (r.batch * r.seq_len),
                    "censored": censored})
    ok = [p for p in per if math.isfinite(p["tokens"]) and not p["censored"]]
    out: dict[str, Any] = {"target": target, "runs": per, "e_min": math.nan,
                           "s_min": math.nan, "b_crit": math.nan}
    if len(ok) >= 2:
        b = np.array([p["batch"] for p in ok], np.float64)
        e = np.array([p["tokens"] for p in ok], np.float64)
        seq = runs[0].seq_len
        slope, intercept = np.polyfit(b, e, 1)  # E(tokens) = E_min + S_min * B * seq
        s_min = slope / seq
        out.update(e_min=float(intercept), s_min=float(s_min))
        if slope > 0 and intercept > 0:
            out["b_crit"] = float(intercept / seq / s_min)
    return out


def summarize(runs: Sequence[Run], b2: float, ref_batch: int,
              tail: float = 0.5) -> dict[str, Any]:
    """Per arm: the runs' final eval losses by batch size, the best batch size, and the
    critical-batch fit; the noise scale of every run that logged it."""
    arms: dict[str, Any] = {}
    for arm in ARMS:
        mine = [r for r in runs if arm in r.arms(b2)]
        if not mine:
            continue
        finals = {str(r.batch): r.final for r in mine}
        best = min(mine, key=lambda r: r.final)
        arms[arm] = {"final_eval_loss": finals,
                     "beta2": {str(r.batch): r.b2 for r in mine},
                     "best_batch": best.batch, "best_eval_loss": best.final,
                     "critical_batch": critical_batch(mine)}
    noise = [n for n in (measure_noise(r, tail) for r in runs) if n is not None]
    return {"ref_batch": int(ref_batch), "b2": float(b2), "noise_tail": float(tail),
            "tokens": {r.name: float(r.tokens[-1]) if r.steps.size else 0.0 for r in runs},
            "arms": arms, "noise_scale": noise,
            "b_simple_sequences": float(np.mean([n["b_simple_sequences"] for n in noise]))
            if noise else math.nan}


def table(summary: dict[str, Any]) -> str:
    """A markdown table: final eval loss per batch size in each arm (beta2 in brackets),
    then the noise scale and the critical-batch fits."""
    arms = summary["arms"]
    batches = sorted({int(b) for a in arms.values() for b in a["final_eval_loss"]})
    names = [a for a in ARMS if a in arms]
    lines = ["| batch (sequences) | " + " | ".join(f"eval loss, beta2 {a}" for a in names)
             + " |", "| --- |" + " --- |" * len(names)]
    for b in batches:
        cells = []
        for a in names:
            v = arms[a]["final_eval_loss"].get(str(b))
            cells.append("" if v is None else f"{v:.4f} (beta2 {arms[a]['beta2'][str(b)]:g})")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines.append("")
    for n in summary["noise_scale"]:
        lines.append(f"B_simple (B={n['batch']} run, {n['rows']} rows from step "
                     f"{n['from_step']}): {n['b_simple_tokens']:.0f} tokens = "
                     f"{n['b_simple_sequences']:.1f} sequences; by quarter of the run: "
                     + ", ".join(f"steps {q['steps'][0]}-{q['steps'][1]} (train loss "
                                 f"{q['train_loss']:.2f}): {q['b_simple_sequences']:.1f}"
                                 for q in n["by_quarter"]))
    for a in names:
        c = arms[a]["critical_batch"]
        lines.append(f"beta2 {a}: best B={arms[a]['best_batch']} "
                     f"({arms[a]['best_eval_loss']:.4f}); to eval loss {c['target']:.4f}: "
                     f"E_min={c['e_min']:.0f} tokens, S_min={c['s_min']:.1f} steps, "
                     f"B_crit=E_min/S_min={c['b_crit']:.1f} sequences (fit over B="
                     + ",".join(str(p["batch"]) for p in c["runs"] if not p["censored"])
                     + ")")
    return "\n".join(lines)


# ---- the figure --------------------------------------------------------------------------


def draw(runs: Sequence[Run], summary: dict[str, Any], path: str, title: str) -> None:
    """Left: final eval loss against batch size per arm, B_simple (and B_crit per arm)
    as vertical lines; middle: eval loss against tokens; right: against steps (colour:
    batch size; solid: scaled beta2, dashed: fixed)."""
    plt = plots._plt()
    fig, (ax0, ax1, ax2) = plt.subplots(1, 3, figsize=(15, 4.4))
    b2 = summary["b2"]
    batches = sorted({r.batch for r in runs})
    cmap = plt.get_cmap("viridis")

    def color(b: int):
        return cmap(batches.index(b) / max(1, len(batches) - 1))

    styles = {"fixed": ("s--", "tab:red"), "scaled": ("o-", "tab:blue")}
    for arm, a in summary["arms"].items():
        xs = sorted(int(b) for b in a["final_eval_loss"])
        fmt, c = styles[arm]
        ax0.plot(xs, [a["final_eval_loss"][str(b)] for b in xs], fmt, color=c,
                 label=f"beta2 {arm}" + (f" ({b2:g})" if arm == "fixed" else
                                         f" ({b2:g}^(B/{summary['ref_batch']}))"))
        bc = a["critical_batch"]["b_crit"]
        if math.isfinite(bc) and bc > 0:
            ax0.axvline(bc, color=c, ls=":", lw=1.2, label=f"B_crit fit, {arm}: {bc:.1f}")
    bs = summary["b_simple_sequences"]
    if math.isfinite(bs) and bs > 0:
        quarters = [q["b_simple_sequences"] for n in summary["noise_scale"]
                    for q in n["by_quarter"]]
        ax0.axvline(bs, color="k", ls="-.", lw=1.4,
                    label=f"B_simple measured: {bs:.0f} (last {summary['noise_tail']:.0%})"
                    + ("\n by quarter: " + ", ".join(f"{q:.0f}" for q in quarters)
                       if quarters else ""))
    ax0.set_xscale("log", base=2)
    ax0.set_xticks(batches)
    ax0.set_xticklabels([str(b) for b in batches])
    ax0.set_xlabel("batch size (sequences)")
    ax0.set_ylabel("final eval loss")
    ax0.set_title("same tokens: final eval loss")
    ax0.grid(alpha=0.3)
    ax0.legend(fontsize=7.5)
    lo, hi, labelled = math.inf, -math.inf, set()
    for r in runs:
        if not r.steps.size:
            continue
        ls = "--" if "fixed" in r.arms(b2) and "scaled" not in r.arms(b2) else "-"
        lab = None if r.batch in labelled else f"B={r.batch}"
        labelled.add(r.batch)
        ax1.plot(r.tokens, r.eval_loss, ls, color=color(r.batch), lw=1.3, label=lab)
        ax2.plot(r.steps, r.eval_loss, ls, color=color(r.batch), lw=1.3, label=lab)
        lo, hi = min(lo, r.eval_loss.min()), max(hi, r.eval_loss[len(r.eval_loss) // 4:].max())
    for ax, xl in ((ax1, "tokens"), (ax2, "steps")):
        if math.isfinite(lo):
            ax.set_ylim(lo - 0.05, hi + 0.1)
        ax.set_xlabel(xl)
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3)
    ax1.set_title("eval loss vs tokens (solid: scaled beta2, dashed: fixed)")
    ax2.set_xscale("log")
    ax2.set_title("eval loss vs steps")
    ax1.legend(fontsize=7.5, ncol=2)
    plots._save(plt, fig, path, title)


# ---- the experiment ----------------------------------------------------------------------


def analyze(workdir: str, ref_batch: int = 16, b2: float = 0.95, tail: float = 0.5,
            publish_dir: str = "", title: str = "") -> dict[str, Any]:
    """Writes `batch_size_summary.json`, `batch_size.md` and `batch_size.png` for the sweep
    in `workdir` (the figure also to `publish_dir`), prints the table, returns the summary."""
    if not 0 < tail <= 1:
        raise UserError(f"--noise-tail={tail}: expected a fraction in (0, 1]")
    runs = find_runs(workdir, ref_batch)
    summary = summarize(runs, b2, ref_batch, tail)
    text = table(summary)
    default_title = "Batch size at equal tokens: Adam beta2 fixed vs scaled"
    sweep.write_experiment(workdir, FIGURE_NAME, summary, text,
                           lambda path: draw(runs, summary, path, title or default_title),
                           publish_dir)
    return summary


def _from_config(argv: list[str]) -> None:
    config, publish = sweep.run_experiment_sweep(argv, "batch_size", "configs/scaling/batch_size.py")
    s = config.sweep.batch_size
    analyze(str(config.workdir), int(s.ref_batch), float(s.b2),
            float(s.get("noise_tail", 0.5)), publish, str(s.get("title", "") or ""))


def main(argv: list[str] | None = None) -> None:
    """`--config FILE [--config.k=v ...] [--sweep.publish_dir=D]` (sweep, then analysis) or
    `--workdir DIR [--ref-batch N] [--b2 X] [--noise-tail F] [--publish_dir D]`."""
    from train.cli import user_errors

    argv = list(sys.argv if argv is None else argv)
    with user_errors():
        if sweep.names_config(argv):
            _from_config(argv)
            return
        ap = argparse.ArgumentParser(prog="python -m train.batch_size_experiment",
                                     description=__doc__.splitlines()[0])
        ap.add_argument("--workdir", required=True, help="the sweep's directory")
        ap.add_argument("--ref-batch", type=int, default=16,
                        help="the batch size (sequences) whose beta2 is --b2 in both arms")
        ap.add_argument("--b2", type=float, default=0.95, help="the fixed arm's beta2")
        ap.add_argument("--noise-tail", type=float, default=0.5,
                        help="average the noise scale over this last fraction of steps")
        ap.add_argument("--publish_dir", "--publish-dir", default="",
                        help="also copy batch_size.png here")
        args = ap.parse_args(argv[1:])
        analyze(args.workdir, args.ref_batch, args.b2, args.noise_tail, args.publish_dir)


if __name__ == "__main__":
    main()

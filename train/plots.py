"""The figures of `python -m train.sweep`: drawing only (matplotlib, Agg).

Each figure is a dataclass of numbers that `train.report` has already computed (the same
numbers it writes to `summary.json`); :func:`draw` renders one to a PNG. Colours follow a
line's `index`, its position among the values of the series' grid key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

Numbers = Sequence[float]


@dataclasses.dataclass
class Line:
    """One series: its points, legend label, index among the series, starred best point."""

    x: Numbers
    y: Numbers
    label: str | None
    index: int
    best: tuple[float, float] | None = None


@dataclasses.dataclass
class LrSweep:
    """Final metric against x (an LR), a line per series, one panel per (title, lines)."""

    title: str
    x_label: str
    y_label: str
    n_series: int
    panels: list[tuple[str, list[Line]]]
    ylim: tuple[float, float] | None


@dataclasses.dataclass
class BestRun:
    """One optimizer's best-LR curve; `need`: the step it reaches the baseline's final
    value (marked when not None), `ratio`: baseline steps / need."""

    line: Line
    lr: float
    need: float | None
    ratio: float


@dataclasses.dataclass
class Reach:
    """Right panel of `OptimizerCompare`: the best-LR curves and the baseline's final value."""

    target: float
    target_label: str
    y_label: str
    runs: list[BestRun]
    ylim: tuple[float, float]


@dataclasses.dataclass
class OptimizerCompare:
    """Left: final metric against the LR per optimizer; right: `reach` (None: no baseline)."""

    title: str
    x_label: str
    metric: str
    finals: list[Line]
    ylim: tuple[float, float] | None
    reach: Reach | None


@dataclasses.dataclass
class CurvePanel:
    """One metric of one panel column; `title` is set on the top row only (with a legend)."""

    lines: list[Line]
    spikes: list[tuple[Numbers, Numbers] | None]  # per line: the spike onsets (x, y)
    hline: tuple[float, str] | None
    logy: bool
    y_label: str
    title: str | None
    ylim: Sequence[float] | None


@dataclasses.dataclass
class Curves:
    """Training curves: rows of metrics x columns of panels."""

    suptitle: str | None
    panels: list[list[CurvePanel]]


@dataclasses.dataclass
class Profile:
    """One IsoFLOP budget: its runs, the fitted parabola and its vertex (None: no fit)."""

    budget: float
    n: Numbers
    loss: Numbers
    fit: tuple[Numbers, Numbers] | None
    vertex: tuple[float, float, bool] | None  # (n_opt, loss_opt, interior)


@dataclasses.dataclass
class IsoFlop:
    """Left: the profiles; right: the optima (C, N_opt, interior) and the power law
    (C, N_opt(C), coef, exponent) through them."""

    title: str
    metric: str
    profiles: list[Profile]
    optima: list[tuple[float, float, bool]]
    law: tuple[Numbers, Numbers, float, float] | None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str, suptitle: str | None) -> None:
    if suptitle is not None:
        fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def lr_sweep(f: LrSweep, path: str) -> None:
    plt = _plt()
    n = len(f.panels)
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4), squeeze=False, sharey=True)
    cmap = plt.get_cmap("viridis")
    for ax, (title, lines) in zip(axes[0], f.panels, strict=True):
        for line in lines:
            color = cmap(line.index / max(f.n_series - 1, 1))
            ax.plot(line.x, line.y, "o-", color=color, label=line.label)
            if line.best is not None:
                ax.plot(*line.best, "*", color=color, ms=16, mec="k")
        ax.set_xscale("log")
        ax.set_xlabel(f.x_label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f.y_label)
    if f.ylim is not None:
        axes[0][0].set_ylim(*f.ylim)
    _save(plt, fig, path, f.title)


def optimizer_compare(f: OptimizerCompare, path: str) -> None:
    plt = _plt()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.get_cmap("tab10")
    for line in f.finals:
        ax0.plot(line.x, line.y, "o-", color=colors(line.index), label=line.label)
        if line.best is not None:
            ax0.plot(*line.best, "*", color=colors(line.index), ms=16, mec="k")
    ax0.set_xscale("log")
    ax0.set_xlabel(f.x_label)
    ax0.set_ylabel(f"final {f.metric}")
    ax0.grid(alpha=0.3)
    ax0.legend()
    if f.ylim is not None:
        ax0.set_ylim(*f.ylim)
    r = f.reach
    if r is not None:
        ax1.axhline(r.target, color="gray", ls="--", lw=1,
                    label=f"{r.target_label} final {r.target:.3f}")
        for run in r.runs:
            color = colors(run.line.index)
            ax1.plot(run.line.x, run.line.y, color=color, label=f"{run.line.label} (lr {run.lr:g})")
            if run.need is not None:
                ax1.axvline(run.need, color=color, ls=":", lw=1)
                ax1.annotate(f"{run.ratio:.2f}x fewer steps", (run.need, r.target),
                             textcoords="offset points", xytext=(5, 12), color=color)
        ax1.set_ylabel(r.y_label)
        ax1.set_ylim(*r.ylim)
    ax1.set_xlabel("step")
    ax1.grid(alpha=0.3)
    ax1.legend()
    _save(plt, fig, path, f.title)


def curves(f: Curves, path: str) -> None:
    plt = _plt()
    rows, cols = len(f.panels), len(f.panels[0])
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.2 * rows), squeeze=False,
                             sharex=True)
    colors = plt.get_cmap("tab10")
    for c in range(cols):
        for r in range(rows):
            _curve_panel(axes[r][c], f.panels[r][c], colors)
        axes[-1][c].set_xlabel("step")
    _save(plt, fig, path, f.suptitle)


def _curve_panel(ax: Any, p: CurvePanel, colors: Any) -> None:
    for line, spikes in zip(p.lines, p.spikes, strict=True):
        ax.plot(line.x, line.y, color=colors(line.index), lw=1.1, alpha=0.85, label=line.label)
        if spikes is not None:
            ax.plot(*spikes, "v", color=colors(line.index), ms=7, mec="k")
    if p.hline is not None:
        ax.axhline(p.hline[0], color="gray", ls="--", lw=1, label=p.hline[1])
    if p.logy:
        ax.set_yscale("log")
    ax.set_ylabel(p.y_label)
    ax.grid(alpha=0.3)
    if p.title is not None:
        ax.set_title(p.title)
        ax.legend(fontsize=8)
    if p.ylim:
        ax.set_ylim(*p.ylim)


def isoflop(f: IsoFlop, path: str) -> None:
    plt = _plt()
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("plasma")
    for i, p in enumerate(f.profiles):
        color = cmap(i / max(len(f.profiles), 1))
        ax0.plot(p.n, p.loss, "o", color=color, label=f"C={p.budget:.2g}")
        if p.fit is not None:
            ax0.plot(*p.fit, "-", color=color)
        if p.vertex is not None:
            n_opt, loss_opt, interior = p.vertex
            ax0.plot(n_opt, loss_opt, "*", ms=14, mec="k", color=color if interior else "none")
    ax0.set_xscale("log")
    ax0.set_xlabel("N (matmul parameters)")
    ax0.set_ylabel(f.metric)
    ax0.grid(alpha=0.3)
    ax0.legend(fontsize=8)
    for c, n, interior in f.optima:  # extrapolated vertices hollow
        ax1.loglog(c, n, "*", ms=12, mec="k", color="C0" if interior else "none")
    if f.law is not None:
        cs, ns, coef, exponent = f.law
        ax1.loglog(cs, ns, "--", label=f"N_opt = {coef:.3g} C^{exponent:.3f}")
        ax1.legend()
    ax1.set_xlabel("C (training FLOPs)")
    ax1.set_ylabel("N_opt")
    ax1.grid(alpha=0.3)
    _save(plt, fig, path, f.title)


_DRAW = {LrSweep: lr_sweep, OptimizerCompare: optimizer_compare, Curves: curves,
         IsoFlop: isoflop}


def draw(figure: LrSweep | OptimizerCompare | Curves | IsoFlop, path: str) -> None:
    """Renders a figure of `train.report` to a PNG at `path`."""
    _DRAW[type(figure)](figure, path)

"""The numbers of a sweep (`python -m train.sweep`): per-run summaries, `results.csv`,
`summary.json`, and every number its figure shows.

A finished point's result row (`RESULT_COLUMNS`) comes from its `metrics.jsonl`
(:func:`summarize_run`). From all finished points, :func:`write_outputs` writes
`results.csv`, computes the experiment's numbers with the function `PLOT_KINDS[kind]`
(`sweep.plot.kind`), which returns them for `summary.json` together with the figure that
`train.plots` draws from them. Fits and curve statistics are those of `train.scaling`:
the IsoFLOP analysis is :func:`train.scaling.compute_optimal` (see :func:`isoflop_fit`).

A point is a `train.sweep.Point`; this module uses only its `name`, `values`,
`config.workdir` and its `value(key)` / `label(key)` methods.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from train import plots
from train import scaling as fit
from train.errors import UserError
from train.metrics import read_metrics

if TYPE_CHECKING:
    from train.sweep import Point

Row = Mapping[str, Any]

# The result columns of results.csv (after the point's parameters), see `summarize_run`.
RESULT_COLUMNS = (
    "status", "steps", "tokens", "flops", "params", "params_active", "n_matmul",
    "loss", "eval_loss", "min_loss", "maxvio_max", "maxvio_mean", "maxvio_final",
    "max_logit", "qk_clip_frac", "loss_spikes", "grad_spikes", "max_grad_norm", "wall_s",
)


# ---- one run -----------------------------------------------------------------------------


def as_float(x: Any) -> float:
    """A logged or stored value as a float (`"nan"` strings included); NaN if not a number."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _layer_mean(x: Any) -> float:
    if isinstance(x, list):
        return float(np.mean([as_float(v) for v in x])) if x else math.nan
    return as_float(x)


def _layer_max(x: Any) -> float:
    if isinstance(x, list):
        return float(np.max([as_float(v) for v in x])) if x else math.nan
    return as_float(x)


def curve(rows: Sequence[Row], key: str, reduce: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a metric over the logged rows that have it (per-layer lists
    reduced by `reduce`: mean | max)."""
    f = _layer_mean if reduce == "mean" else _layer_max
    sel = [r for r in rows if key in r]
    return (np.array([r["step"] for r in sel], np.float64),
            np.array([f(r[key]) for r in sel], np.float64))


def _nanmax(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size else math.nan


def _nanmean(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else math.nan


def _nanmin(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.min()) if v.size else math.nan


def _last(v: np.ndarray) -> float:
    return float(v[-1]) if v.size else math.nan


def summarize_run(rows: Sequence[Row], spikes: Mapping[str, Any]) -> dict[str, Any]:
    """Result columns of one run from its metrics.jsonl rows (see `RESULT_COLUMNS`):
    final and minimum losses, MaxVio, max logit, QK-clip fraction, spike counts
    (`train.scaling.count_spikes` with `spikes` = {window, loss_ratio, grad_ratio})."""
    _, loss = curve(rows, "loss")
    _, ev = curve(rows, "eval_loss")
    _, mv = curve(rows, "moe/maxvio")
    _, mv_max = curve(rows, "moe/maxvio", "max")
    _, logit = curve(rows, "max_logit")
    _, clip = curve(rows, "qk_clip/frac_clipped")
    _, gn = curve(rows, "grad_norm")
    window = int(spikes["window"])
    return {
        "loss": _last(loss),
        "eval_loss": _last(ev),
        "min_loss": _nanmin(loss),
        "maxvio_max": _nanmax(mv_max),
        "maxvio_mean": _nanmean(mv),
        "maxvio_final": _last(mv),
        "max_logit": _nanmax(logit),
        "qk_clip_frac": _nanmean(clip),
        "loss_spikes": fit.count_spikes(loss, window, float(spikes["loss_ratio"])),
        "grad_spikes": fit.count_spikes(gn, window, float(spikes["grad_ratio"])),
        "max_grad_norm": _nanmax(gn),
    }


# ---- files -------------------------------------------------------------------------------


def jsonable(x: Any) -> Any:
    """Non-finite floats as strings, tuples as lists (for `json.dump`)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    return x


def write_csv(path: str, rows: Sequence[Row]) -> None:
    """results.csv: `name`, the point parameters, then the `RESULT_COLUMNS` present."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lead = ["name"] + [k for k in keys if k not in RESULT_COLUMNS and k != "name"]
    cols = lead + [k for k in RESULT_COLUMNS if k in keys]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _csv_value(r.get(k, "")) for k in cols})
    os.replace(tmp, path)


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, tuple):
        return " ".join(str(x) for x in v)
    return v


def write_outputs(workdir: str, name: str, points: Sequence[Point], rows: list[dict[str, Any]],
                  plot_cfg: Mapping[str, Any], publish_dir: str = "") -> dict[str, Any]:
    """Writes `workdir/results.csv`, `workdir/summary.json` and the figure
    `workdir/<name>.png` (also copied to `publish_dir` when set) from the finished points'
    `rows`; prints and returns the summary.

    Args:
      workdir: the sweep's directory.
      name: the experiment's name.
      points: every point of the sweep (finished or not).
      rows: the result rows of the finished points (`name`, parameters, result columns).
      plot_cfg: `sweep.plot` as a dict, with `spikes` (the spike settings) added.
      publish_dir: also copy the figure there ("" = no).
    """
    os.makedirs(workdir, exist_ok=True)
    write_csv(os.path.join(workdir, "results.csv"), rows)
    logs = {p.name: read_metrics(p.config.workdir)
            for p in points if any(r["name"] == p.name for r in rows)}
    kind = plot_cfg.get("kind", "curves")
    if kind not in PLOT_KINDS:
        raise UserError(f"config.sweep.plot.kind={kind!r} is not one of {sorted(PLOT_KINDS)}")
    summary: dict[str, Any] = {"experiment": name, "points": len(points), "finished": len(rows)}
    fig_path = os.path.join(workdir, f"{name}.png")
    if rows:
        title = str(plot_cfg.get("title") or name)
        figure, numbers = PLOT_KINDS[kind](rows, logs, plot_cfg, points, title)
        plots.draw(figure, fig_path)
        summary.update(numbers)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(jsonable(summary), f, indent=1)
    if publish_dir and rows:
        os.makedirs(publish_dir, exist_ok=True)
        shutil.copy(fig_path, os.path.join(publish_dir, f"{name}.png"))
    print(json.dumps(jsonable(summary)))
    return summary


# ---- grid keys of the figures ------------------------------------------------------------


def _value(point: Point, key: str) -> Any:
    try:
        return point.value(key)
    except KeyError:
        raise UserError(f"config.sweep.plot: {key!r} is not a grid key "
                        f"(have {list(point.values)})") from None


@dataclasses.dataclass
class _Axis:
    """The distinct values of a grid key over the points (grid order) and their labels:
    `labels` from the plot config when it has one per value, else `name=value`."""

    key: str
    values: list[Any]
    labels: list[str]

    def label(self, value: Any) -> str:
        return self.labels[self.values.index(value)]


def _axis(points: Sequence[Point], key: str, labels: Sequence[str] | None = None) -> _Axis:
    values: list[Any] = []
    names: list[str] = []
    for p in points:
        v = _value(p, key)
        if v not in values:
            values.append(v)
            names.append(p.label(key))
    if labels and len(labels) == len(values):
        names = [str(x) for x in labels]
    return _Axis(key, values, names)


def _by_point(rows: Sequence[Row], points: Sequence[Point]) -> list[tuple[Point, Row]]:
    by_name = {r["name"]: r for r in rows}
    return [(p, by_name[p.name]) for p in points if p.name in by_name]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


Logs = Mapping[str, Sequence[Row]]  # point name -> its metrics.jsonl rows
Report = tuple[Any, dict[str, Any]]  # (the figure for train.plots, the summary's numbers)


# ---- lr_sweep ----------------------------------------------------------------------------


def lr_sweep(rows: Sequence[Row], logs: Logs, plot_cfg: Mapping[str, Any],
             points: Sequence[Point], title: str) -> Report:
    """Final `metric` against `x` (an LR) per `series` value, one panel per `panel`
    value; the best x per series (a star). Summary: best x per series and panel, and the
    spread of the best x across series in grid steps (0 = perfect transfer)."""
    x_key, series_key = plot_cfg["x"], plot_cfg["series"]
    metric = plot_cfg.get("metric", "eval_loss")
    panel_key = plot_cfg.get("panel") or None
    panels = _axis(points, panel_key, plot_cfg.get("panel_labels")) if panel_key else None
    series = _axis(points, series_key, plot_cfg.get("labels"))
    xs_all = sorted(_axis(points, x_key).values)
    pairs = _by_point(rows, points)
    summary: dict[str, Any] = {"metric": metric, "best": {}, "shift_grid_steps": {}}
    figure_panels = []
    for pv in panels.values if panels else [None]:
        plabel = panels.label(pv) if panels else ""
        lines, best_idx = [], {}
        for i, sv in enumerate(series.values):
            sel = sorted((_value(p, x_key), r[metric]) for p, r in pairs
                         if _value(p, series_key) == sv
                         and (panels is None or _value(p, panel_key) == pv))
            if not sel:
                continue
            xs = np.array([a for a, _ in sel], np.float64)
            ys = np.array([b for _, b in sel], np.float64)
            slabel, best = series.labels[i], None
            if np.isfinite(ys).any():
                j = int(np.nanargmin(ys))
                best = (xs[j], ys[j])
                best_idx[slabel] = xs_all.index(xs[j])
                summary["best"].setdefault(plabel or "all", {})[slabel] = {
                    "x": float(xs[j]), metric: float(ys[j])}
            lines.append(plots.Line(xs, ys, slabel, i, best))
        if best_idx:
            summary["shift_grid_steps"][plabel or "all"] = max(best_idx.values()) - min(
                best_idx.values())
        figure_panels.append((plabel, lines))
    finite_all = [r[metric] for _, r in pairs if _finite(r[metric])]
    ylim = None
    if finite_all:
        lo = min(finite_all)
        hi = min(max(finite_all), lo + float(plot_cfg.get("y_span", 1.5)))
        ylim = (lo - 0.03 * (hi - lo + 1e-9), hi)
    figure = plots.LrSweep(title, plot_cfg.get("x_label", x_key), metric, len(series.values),
                           figure_panels, ylim)
    return figure, summary


# ---- optimizer_compare -------------------------------------------------------------------


def _best_curve(rows: Sequence[Row], smooth: int) -> tuple[np.ndarray, np.ndarray, str]:
    """`eval_loss` if logged at >= 3 steps, else the train loss smoothed over `smooth`."""
    s, v = curve(rows, "eval_loss")
    if s.size >= 3:
        return s, v, "eval_loss"
    s, v = curve(rows, "loss")
    return s, fit.smooth(v, smooth), "train loss (smoothed)"


def optimizer_compare(rows: Sequence[Row], logs: Logs, plot_cfg: Mapping[str, Any],
                      points: Sequence[Point], title: str) -> Report:
    """Left: final `metric` against the LR per optimizer. Right: the curves of each
    optimizer's best-LR run (`eval_loss` if logged at several steps, else the train loss
    smoothed over `smooth` logged steps), the baseline's final value as a line. Summary:
    per optimizer the best LR and the steps it needs to reach the baseline's final value,
    and baseline steps / those steps (the step-efficiency ratio)."""
    x_key, series_key = plot_cfg.get("x", "optim.lr"), plot_cfg.get("series", "optim.name")
    metric = plot_cfg.get("metric", "eval_loss")
    baseline = plot_cfg.get("baseline", "adamw")
    pairs = _by_point(rows, points)
    series = _axis(points, series_key, plot_cfg.get("labels"))
    finals, best = [], {}
    for i, sv in enumerate(series.values):
        sel = sorted([(_value(p, x_key), r[metric], p) for p, r in pairs
                      if _value(p, series_key) == sv], key=lambda t: t[0])
        ok = [t for t in sel if _finite(t[1])]
        star = None
        if ok:
            j = min(ok, key=lambda t: t[1])
            best[sv], star = j[2], (j[0], j[1])
        finals.append(plots.Line([t[0] for t in sel], [t[1] for t in sel], series.labels[i],
                                 i, star))
    finite = [r[metric] for _, r in pairs if _finite(r[metric])]
    ylim = (min(finite) - 0.02, min(max(finite), min(finite) + 1.0)) if finite else None
    summary: dict[str, Any] = {"metric": metric, "baseline": baseline, "optimizers": {}}
    reach = None
    if baseline not in best:
        summary["error"] = f"no finished run of the baseline {baseline!r}"
    else:
        reach = _reach(best, baseline, series, logs, x_key, int(plot_cfg.get("smooth", 10)),
                       summary["optimizers"])
    figure = plots.OptimizerCompare(title, plot_cfg.get("x_label", x_key), metric, finals,
                                    ylim, reach)
    return figure, summary


def _reach(best: Mapping[Any, Point], baseline: Any, series: _Axis, logs: Logs, x_key: str,
           smooth: int, out: dict[str, Any]) -> plots.Reach:
    """Each best-LR curve against the baseline's final value; fills `out` per optimizer."""
    bs, bv, what = _best_curve(logs.get(best[baseline].name, []), smooth)
    target, total = float(bv[-1]), float(bs[-1])
    runs = []
    for i, sv in enumerate(series.values):
        if sv not in best:
            continue
        p = best[sv]
        s, v, _ = _best_curve(logs.get(p.name, []), smooth)
        lab = series.labels[i]
        need = fit.steps_to_reach(s, v, target)
        info = {"lr": float(_value(p, x_key)), "final": float(v[-1]),
                "steps_to_baseline_final": need,
                "ratio": total / need if _finite(need) and need > 0 else math.nan}
        out[lab] = info
        mark = need if sv != baseline and _finite(need) else None
        runs.append(plots.BestRun(plots.Line(s, v, lab, i), info["lr"], mark, info["ratio"]))
    lo = min(float(np.nanmin(r.line.y)) for r in runs)
    return plots.Reach(target, series.label(baseline), what, runs, (lo - 0.05, target + 0.8))


# ---- curves ------------------------------------------------------------------------------


def training_curves(rows: Sequence[Row], logs: Logs, plot_cfg: Mapping[str, Any],
                    points: Sequence[Point], title: str) -> Report:
    """One panel per metric in `metrics` (per-layer values reduced by `reduce`), a line per
    point coloured by its `series` value (one column of panels per `panel` value).
    `hlines` draws reference lines ({metric: value}), `logy` lists log-scale metrics,
    `mark_spikes` marks the spikes `count_spikes` counts on loss and grad_norm, `smooth`
    ({metric: n}) plots a trailing mean over n logged values. Summary:
    the mean over each series' points of the result columns in `report`."""
    metrics = list(plot_cfg.get("metrics", ("loss",)))
    series_key = plot_cfg.get("series") or list(points[0].values)[0]
    panel_key = plot_cfg.get("panel") or None
    series = _axis(points, series_key, plot_cfg.get("labels"))
    panels = _axis(points, panel_key, plot_cfg.get("panel_labels")) if panel_key else None
    pairs = _by_point(rows, points)
    grid = []
    for r_i, m in enumerate(metrics):
        row = []
        for pv in panels.values if panels else [None]:
            mine = [p for p, _ in pairs if panels is None or _value(p, panel_key) == pv]
            top = (panels.label(pv) if panels else title) if r_i == 0 else None
            row.append(_curve_panel(m, mine, series, logs, plot_cfg, top))
        grid.append(row)
    figure = plots.Curves(title if panels else None, grid)
    return figure, {"series": _series_means(pairs, series, panels, plot_cfg)}


def _curve_panel(m: str, points: Sequence[Point], series: _Axis, logs: Logs,
                 plot_cfg: Mapping[str, Any], title: str | None) -> plots.CurvePanel:
    """Metric `m` of `points`, a line each (the first of a series labelled)."""
    reduce = plot_cfg.get("reduce", "mean")
    hlines = dict(plot_cfg.get("hlines") or {})
    smooth = dict(plot_cfg.get("smooth") or {})
    spikes = plot_cfg["spikes"]
    ratio = {"loss": spikes.get("loss_ratio"), "grad_norm": spikes.get("grad_ratio")}
    lines, onsets, labelled = [], [], set()
    for p in points:
        i = series.values.index(_value(p, series.key))
        s, v = curve(logs.get(p.name, []), m, reduce)
        if m in smooth:
            v = fit.smooth(v, int(smooth[m]))
        lab = series.labels[i]
        lines.append(plots.Line(s, v, None if lab in labelled else lab, i))
        labelled.add(lab)
        onset = None
        if plot_cfg.get("mark_spikes") and m in ratio:
            mask = fit.spike_mask(v, int(spikes["window"]), float(ratio[m]))
            first = mask & ~np.concatenate([[False], mask[:-1]])
            top = np.where(np.isfinite(v), v, np.nanmax(v) if np.isfinite(v).any() else 0)
            onset = (s[first], top[first])
        onsets.append(onset)
    hline = (float(hlines[m]), f"{m} = {float(hlines[m]):g}") if m in hlines else None
    y_label = (m + (f" ({reduce} over layers)" if m.startswith("moe/") else "")
               + (f" (mean of {int(smooth[m])} logs)" if m in smooth else ""))
    return plots.CurvePanel(lines, onsets, hline, m in set(plot_cfg.get("logy", ())), y_label,
                            title, (plot_cfg.get("ylim") or {}).get(m))


def _series_means(pairs: Sequence[tuple[Point, Row]], series: _Axis, panels: _Axis | None,
                  plot_cfg: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """{[panel / ]series label: the mean of each `report` column over its runs, runs}."""
    report = list(plot_cfg.get("report", ("loss", "eval_loss")))
    out: dict[str, Any] = {}
    for pv in panels.values if panels else [None]:
        for sv in series.values:
            sel = [r for p, r in pairs if _value(p, series.key) == sv
                   and (panels is None or _value(p, panels.key) == pv)]
            if not sel:
                continue
            key = series.label(sv)
            if panels:
                key = panels.label(pv) + " / " + key
            out[key] = {c: _mean_col(sel, c) for c in report}
            out[key]["runs"] = len(sel)
    return out


def _mean_col(rows: Sequence[Row], col: str) -> float:
    vals = [r.get(col, math.nan) for r in rows]
    if col in ("loss_spikes", "grad_spikes"):
        return float(np.sum(vals))  # counts add up over seeds
    return _nanmean(np.array(vals, np.float64))


# ---- isoflop -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IsoFlopBudget:
    """The runs of one FLOP budget of an IsoFLOP sweep and their parabola's vertex."""

    budget: float  # the grid value
    flops: float  # C: the mean training FLOPs of its runs (steps are rounded per run)
    params: np.ndarray  # N (`n_matmul`, the parameters in 6N), ascending
    losses: np.ndarray
    optimum: fit.IsoFlopOptimum | None  # None: no fit, see `error`
    error: str = ""


def isoflop_fit(rows: Sequence[Row], metric: str = "eval_loss",
                budget_key: str = "sweep.flop_budget",
                ) -> tuple[list[IsoFlopBudget], fit.ComputeOptimal | None]:
    """IsoFLOP analysis of a sweep's result rows (Hoffmann et al. 2022, approach 2).

    Rows with `status` ok and a finite `metric` are grouped by their `budget_key` value.
    Each budget's vertex is `train.scaling.isoflop_optimum` (a budget it cannot fit is
    kept with the error). The power laws N_opt = k C^a and L_opt = a C^b are
    `train.scaling.compute_optimal` over the runs of the budgets whose vertex lies inside
    the sampled N range (of all fitted budgets when fewer than two do); None with fewer
    than two budgets to fit.
    """
    ok = [r for r in rows if _finite(r[metric]) and r["status"] == "ok"]
    out = []
    for b in sorted({float(r[budget_key]) for r in ok}):
        sel = sorted([r for r in ok if float(r[budget_key]) == b], key=lambda r: r["n_matmul"])
        n = np.array([r["n_matmul"] for r in sel], np.float64)
        loss = np.array([r[metric] for r in sel], np.float64)
        flops = float(np.mean([r["flops"] for r in sel]))
        try:
            out.append(IsoFlopBudget(b, flops, n, loss, fit.isoflop_optimum(n, loss)))
        except ValueError as e:
            out.append(IsoFlopBudget(b, flops, n, loss, None, str(e)))
    fitted = [g for g in out if g.optimum is not None]
    use = [g for g in fitted if g.optimum.interior]
    use = use if len(use) >= 2 else fitted
    if len(use) < 2:
        return out, None
    laws = fit.compute_optimal(np.concatenate([np.full(g.params.size, g.flops) for g in use]),
                               np.concatenate([g.params for g in use]),
                               np.concatenate([g.losses for g in use]))
    return out, laws


def isoflop(rows: Sequence[Row], logs: Logs, plot_cfg: Mapping[str, Any],
            points: Sequence[Point], title: str) -> Report:
    """IsoFLOP profiles (:func:`isoflop_fit`): final `metric` against N per FLOP budget
    (`budget`) with its parabola; right: the optima N_opt(C) with the power law
    N_opt = k C^a. Summary: the optima and the laws."""
    metric = plot_cfg.get("metric", "eval_loss")
    budgets, laws = isoflop_fit(rows, metric, plot_cfg.get("budget", "sweep.flop_budget"))
    summary: dict[str, Any] = {"metric": metric, "optima": []}
    profiles, optima = [], []
    for g in budgets:
        o = g.optimum
        if o is None:
            summary["optima"].append({"budget": g.budget, "error": g.error})
            profiles.append(plots.Profile(g.budget, g.params, g.losses, None, None))
            continue
        grid = np.exp(np.linspace(np.log(g.params.min()), np.log(g.params.max()), 50))
        c2, c1, c0 = o.coeffs
        parabola = c2 * np.log(grid) ** 2 + c1 * np.log(grid) + c0
        profiles.append(plots.Profile(g.budget, g.params, g.losses, (grid, parabola),
                                      (o.n_opt, o.loss_opt, o.interior)))
        summary["optima"].append({"budget": g.budget, "flops": g.flops, "n_opt": o.n_opt,
                                  "loss_opt": o.loss_opt, "interior": o.interior})
        optima.append((g.flops, o.n_opt, o.interior))
    law = None
    if laws is not None:
        cs = np.geomspace(min(laws.budgets), max(laws.budgets), 20)
        law = (cs, laws.n_opt(cs), laws.n_opt.coef, laws.n_opt.exponent)
        summary["n_opt_law"] = dataclasses.asdict(laws.n_opt)
        summary["loss_law"] = dataclasses.asdict(laws.loss)
        summary["fitted_budgets"] = len(laws.budgets)
    return plots.IsoFlop(title, metric, profiles, optima, law), summary


PLOT_KINDS: dict[str, Callable[..., Report]] = {
    "lr_sweep": lr_sweep,
    "optimizer_compare": optimizer_compare,
    "curves": training_curves,
    "isoflop": isoflop,
}

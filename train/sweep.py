"""`python -m train.sweep --config configs/scaling/<name>.py`: a grid of training runs.

A sweep config is a training config (`configs/base.py`) plus a `sweep` section:

    c.sweep.grid = ConfigDict({'model.d_model': [64, 128], 'optim.lr': [1e-3, 3e-3]},
                              allow_dotted_keys=True)

`grid` maps config-key paths to lists of values (a sequence of `(key, values)` pairs works
too); the points are the Cartesian product. A key naming several paths joined by commas
sets them together from tuples (`'model.d_model,model.ffn_dim': [(64, 256), (128, 512)]`).
`sweep.steps` (> 0) or `sweep.flop_budget` (> 0 FLOPs: steps = budget / (FLOPs per token
x tokens per step), `train.flops.flops_per_token`) set each point's length; both may be
grid keys themselves (`'sweep.flop_budget': [1e13, 3e13]` for IsoFLOP sweeps).

Each point trains with `train.loop.run` in `workdir/<point name>/` and, when it finishes,
writes `done.json` there (its parameters and result row). Finished points are skipped, so
the same command resumes a sweep (an unfinished point resumes from its checkpoint).
`--sweep.shard=i --sweep.num_shards=n` (aliases of `--config.sweep.*`) runs every n-th
point from the i-th, for one process or host each. Every invocation then writes, from all
finished points, `workdir/results.csv`, `workdir/summary.json` (the experiment's numbers)
and `workdir/<sweep.name>.png` (the plot `sweep.plot.kind` describes, see `PLOTS`); with
`sweep.publish_dir` the figure is copied there too.

A grid key that is not in the config, a value of the wrong type or an invalid model shape
is a `UserError` naming the key, raised before any point runs. A point whose loss or
gradient stays non-finite (the trainer aborts it) is recorded with `status=diverged`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from train import distributed, loop
from train import scaling as fit
from train.errors import UserError
from train.flops import flops_per_token, matmul_params_per_token

# Grid keys under `sweep.` that vary per point (all other grid keys are config paths).
SWEEP_KEYS = ("sweep.steps", "sweep.flop_budget")

# The result columns of results.csv (after the point's parameters), see `summarize_run`.
RESULT_COLUMNS = (
    "status", "steps", "tokens", "flops", "params", "params_active", "n_matmul",
    "loss", "eval_loss", "min_loss", "maxvio_max", "maxvio_mean", "maxvio_final",
    "max_logit", "qk_clip_frac", "loss_spikes", "grad_spikes", "max_grad_norm", "wall_s",
)


def default_sweep() -> ConfigDict:
    """The `sweep` section with its defaults (an experiment config updates it)."""
    return ConfigDict(
        dict(
            name="",  # figure/experiment name; "" -> the workdir's base name
            steps=0,  # > 0: train.steps of every point
            flop_budget=0.0,  # > 0: steps from the FLOP budget
            shard=0,
            num_shards=1,
            publish_dir="",  # also copy the figure here
            # XLA persistent compilation cache: "auto" -> workdir/xla_cache, "" -> off.
            compile_cache="auto",
            # Spikes (train.scaling.count_spikes): value > ratio x median of the previous
            # `window` logged values; log every step (train.log_every=1) to see them all.
            spikes=dict(window=20, loss_ratio=1.2, grad_ratio=3.0),
            plot=dict(kind="curves"),
        )
    )


# ---- the grid ----------------------------------------------------------------------------


def _grid_items(grid: Any) -> list[tuple[str, list[Any]]]:
    if grid is None:
        raise UserError("config.sweep.grid is not set (a mapping of config keys to lists)")
    items = list(grid.items()) if hasattr(grid, "items") else list(grid)
    out = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise UserError(f"config.sweep.grid: expected (key, values) pairs, got {item!r}")
        key, values = item
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise UserError(f"config.sweep.grid[{key!r}]: values must be a list, got {values!r}")
        if not values:
            raise UserError(f"config.sweep.grid[{key!r}] is empty")
        paths = split_key(key)
        for v in values:
            if len(paths) > 1 and (not isinstance(v, (tuple, list)) or len(v) != len(paths)):
                raise UserError(
                    f"config.sweep.grid[{key!r}]: each value must be a tuple of {len(paths)} "
                    f"(one per key), got {v!r}"
                )
        out.append((str(key), [_freeze(v) for v in values]))
    return out


def split_key(key: str) -> tuple[str, ...]:
    """`'a.b,c.d'` -> `('a.b', 'c.d')`."""
    return tuple(k.strip() for k in str(key).split(",") if k.strip())


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def expand(grid: Any) -> list[dict[str, Any]]:
    """The points of a grid: dicts {grid key: value} in row-major order of the keys."""
    items = _grid_items(grid)
    keys = [k for k, _ in items]
    return [dict(zip(keys, combo, strict=True)) for combo in
            itertools.product(*[vals for _, vals in items])]


def settings(point: Mapping[str, Any]) -> dict[str, Any]:
    """A point as {config path: value} (tied keys split)."""
    out = {}
    for key, value in point.items():
        paths = split_key(key)
        if len(paths) == 1:
            out[paths[0]] = value
        else:
            out.update(zip(paths, value, strict=True))
    return out


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "-".join(_short(x) for x in v)
    return str(v)


def point_name(point: Mapping[str, Any]) -> str:
    """A readable, filesystem-safe directory name for a point (hashed when long)."""
    parts = []
    for key, value in point.items():
        short = ",".join(p.rsplit(".", 1)[-1] for p in split_key(key))
        parts.append(f"{short}={_short(value)}")
    name = re.sub(r"[^A-Za-z0-9=.,+-]+", "_", "_".join(parts)) or "point"
    if len(name) > 120:
        digest = hashlib.sha1(json.dumps(sorted(settings(point).items()), default=str).encode())
        name = name[:100] + "_" + digest.hexdigest()[:10]
    return name


def _set(config: ConfigDict, path: str, value: Any) -> None:
    node = config
    parts = path.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            raise UserError(
                f"config.sweep.grid: unknown config key {path!r} "
                f"({'.'.join(parts[: i + 1])!r} does not exist)"
            )
        if i < len(parts) - 1:
            node = node[part]
    try:
        old = node[parts[-1]]
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
        raise UserError(f"config.sweep.grid: bad value {value!r} for {path!r}: {e}") from e


@dataclasses.dataclass
class Point:
    """One grid point, resolved: its grid values, directory name and training config."""

    values: dict[str, Any]
    name: str
    config: ConfigDict
    flops_per_token: float


def resolve(config: ConfigDict) -> list[Point]:
    """Every point of the sweep, each with its training config; raises `UserError` naming
    the key for an unknown grid key, a wrong value type, an invalid model or optimizer
    setting, or a step count that cannot be derived, before anything runs."""
    sweep = config.get("sweep")
    if sweep is None:
        raise UserError("the config has no `sweep` section (see train/sweep.py)")
    base = {k: v for k, v in config.to_dict().items() if k != "sweep"}
    points = []
    seen: dict[str, dict] = {}
    for values in expand(sweep.get("grid")):
        cfg = ConfigDict(base)
        cfg.sweep = ConfigDict(dict(steps=int(sweep.get("steps", 0)),
                                    flop_budget=float(sweep.get("flop_budget", 0.0))))
        for path, value in settings(values).items():
            if path.startswith("sweep.") and path not in SWEEP_KEYS:
                raise UserError(f"config.sweep.grid: {path!r} cannot vary per point "
                                f"(grid keys under sweep: {', '.join(SWEEP_KEYS)})")
            _set(cfg, path, value)
        name = point_name(values)
        if name in seen:
            raise UserError(f"config.sweep.grid: two points share the name {name!r}")
        seen[name] = values
        cfg.workdir = os.path.join(str(config.workdir), name)
        mcfg = loop.model_config(cfg)
        seq, bsz = int(cfg.data.seq_len), int(cfg.data.batch_size)
        fpt = flops_per_token(mcfg, seq)
        steps = int(cfg.train.steps)
        if int(cfg.sweep.steps) > 0:
            steps = int(cfg.sweep.steps)
        elif float(cfg.sweep.flop_budget) > 0:
            steps = int(round(float(cfg.sweep.flop_budget) / (fpt * bsz * seq)))
        if steps <= 0:
            raise UserError(f"point {name}: {steps} steps (raise config.sweep.flop_budget or "
                            "config.sweep.steps)")
        cfg.train.steps = steps
        if int(cfg.train.eval_every) <= 0:
            cfg.train.eval_every = steps  # one evaluation at the end
        cfg.train.progress = False
        _check_optim(cfg, name)
        del cfg.sweep
        points.append(Point(values, name, cfg, fpt))
    return points


def _check_optim(cfg: ConfigDict, name: str) -> None:
    from optim.build import OPTIMIZERS, build_schedule

    o = ConfigDict(cfg.optim.to_dict())
    if int(o.total_steps) <= 0:
        o.total_steps = int(cfg.train.steps)
    if o.name not in OPTIMIZERS:
        raise UserError(f"point {name}: config.optim.name={o.name!r} is not one of "
                        f"{OPTIMIZERS}")
    try:
        build_schedule(o)
    except ValueError as e:
        raise UserError(f"point {name}: config.optim: {e}") from e


# ---- running -----------------------------------------------------------------------------


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill
    return rows


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _layer_mean(x: Any) -> float:
    if isinstance(x, list):
        return float(np.mean([_num(v) for v in x])) if x else math.nan
    return _num(x)


def _layer_max(x: Any) -> float:
    if isinstance(x, list):
        return float(np.max([_num(v) for v in x])) if x else math.nan
    return _num(x)


def curve(rows: Sequence[Mapping[str, Any]], key: str, reduce: str = "mean"):
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


def summarize_run(rows: Sequence[Mapping[str, Any]], spikes: Mapping[str, Any]) -> dict[str, Any]:
    """Result columns of one run from its metrics.jsonl rows (see `RESULT_COLUMNS`)."""
    _, loss = curve(rows, "loss")
    _, ev = curve(rows, "eval_loss")
    _, mv = curve(rows, "moe/maxvio")
    _, mv_max = curve(rows, "moe/maxvio", "max")
    _, logit = curve(rows, "max_logit")
    _, clip = curve(rows, "qk_clip/frac_clipped")
    _, gn = curve(rows, "grad_norm")
    window = int(spikes["window"])
    return {
        "loss": float(loss[-1]) if loss.size else math.nan,
        "eval_loss": float(ev[-1]) if ev.size else math.nan,
        "min_loss": _nanmin(loss),
        "maxvio_max": _nanmax(mv_max),
        "maxvio_mean": _nanmean(mv),
        "maxvio_final": float(mv[-1]) if mv.size else math.nan,
        "max_logit": _nanmax(logit),
        "qk_clip_frac": _nanmean(clip),
        "loss_spikes": fit.count_spikes(loss, window, float(spikes["loss_ratio"])),
        "grad_spikes": fit.count_spikes(gn, window, float(spikes["grad_ratio"])),
        "max_grad_norm": _nanmax(gn),
    }


def _nanmin(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.min()) if v.size else math.nan


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    return x


def run_point(point: Point, spikes: Mapping[str, Any], run_fn: Callable) -> dict[str, Any]:
    """Trains one point (resuming its checkpoint if any) and writes its `done.json`."""
    cfg = point.config
    mcfg = loop.model_config(cfg)
    counts = mcfg.param_counts()
    t0 = time.perf_counter()
    status, error = "ok", ""
    try:
        run_fn(cfg)
    except UserError as e:
        if "non-finite" not in str(e):
            raise
        status, error = "diverged", str(e)
    rows = _read_jsonl(os.path.join(cfg.workdir, "metrics.jsonl"))
    steps = int(rows[-1]["step"]) if rows else 0
    tokens = steps * int(cfg.data.batch_size) * int(cfg.data.seq_len)
    result = {
        "status": status, "steps": steps, "tokens": tokens,
        "flops": point.flops_per_token * tokens, "params": int(counts["total"]),
        "params_active": int(counts["active"]), "n_matmul": matmul_params_per_token(mcfg),
        **summarize_run(rows, spikes),
        "wall_s": time.perf_counter() - t0,
    }
    done = {"name": point.name, "values": list(point.values.items()), "result": result,
            "error": error}
    if _lead():
        tmp = os.path.join(cfg.workdir, "done.json.tmp")
        os.makedirs(cfg.workdir, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(_jsonable(done), f, indent=1)
        os.replace(tmp, os.path.join(cfg.workdir, "done.json"))
    return result


def _lead() -> bool:
    import jax

    return jax.process_index() == 0


def load_done(point: Point) -> dict[str, Any] | None:
    """The `done.json` of a finished point (None if unfinished or from another grid)."""
    path = os.path.join(point.config.workdir, "done.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            done = json.load(f)
    except ValueError:
        return None
    if {k: _freeze(v) for k, v in done.get("values", [])} != point.values:
        return None
    done["result"] = {k: _num(v) if k != "status" else v for k, v in done["result"].items()}
    return done


def run_sweep(config: ConfigDict, run_fn: Callable | None = None) -> list[dict[str, Any]]:
    """Runs this shard's unfinished points in turn, then writes results.csv, summary.json
    and the figure from every finished point. Returns the CSV rows."""
    from tqdm.auto import tqdm

    sweep = config.sweep
    points = resolve(config)
    shard, n = int(sweep.get("shard", 0)), int(sweep.get("num_shards", 1))
    if n < 1 or not 0 <= shard < n:
        raise UserError(f"config.sweep.shard={shard} must be in [0, num_shards={n})")
    spikes = spike_settings(config)
    run_fn = loop.run if run_fn is None else run_fn
    mine = points[shard::n]
    todo = [p for p in mine if load_done(p) is None]
    name = experiment_name(config)
    print(f"sweep {name}: {len(points)} points, {len(mine)} in shard {shard}/{n}, "
          f"{len(mine) - len(todo)} already finished")
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"sweep {name}",
               unit="point", dynamic_ncols=True, disable=not _lead())
    for p in todo:
        bar.set_postfix_str(p.name)
        res = run_point(p, spikes, run_fn)
        bar.update(1)
        bar.write(f"{p.name}: {res['status']} loss {res['loss']:.4f} eval {res['eval_loss']:.4f} "
                  f"({res['wall_s']:.0f}s)")
    bar.close()
    rows = []
    for p in points:
        done = load_done(p)
        if done is not None:
            rows.append({"name": p.name, **settings(p.values), **done["result"]})
    if _lead():
        write_outputs(config, points, rows)
    return rows


def spike_settings(config: ConfigDict) -> dict[str, Any]:
    """`sweep.spikes` over the defaults of `default_sweep`."""
    given = config.sweep.get("spikes")
    given = given.to_dict() if isinstance(given, ConfigDict) else dict(given or {})
    return {**default_sweep().spikes.to_dict(), **given}


def experiment_name(config: ConfigDict) -> str:
    return str(config.sweep.get("name", "") or os.path.basename(os.path.normpath(config.workdir)))


def write_csv(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
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


def write_outputs(config: ConfigDict, points: Sequence[Point], rows: list[dict[str, Any]]) -> None:
    """results.csv, summary.json and the figure in the sweep workdir (the figure also in
    publish_dir)."""
    workdir = str(config.workdir)
    os.makedirs(workdir, exist_ok=True)
    write_csv(os.path.join(workdir, "results.csv"), rows)
    name = experiment_name(config)
    curves = {p.name: _read_jsonl(os.path.join(p.config.workdir, "metrics.jsonl"))
              for p in points if any(r["name"] == p.name for r in rows)}
    plot = config.sweep.get("plot")
    plot_cfg = plot.to_dict() if isinstance(plot, ConfigDict) else dict(plot or {})
    plot_cfg["spikes"] = spike_settings(config)
    kind = plot_cfg.get("kind", "curves")
    if kind not in PLOTS:
        raise UserError(f"config.sweep.plot.kind={kind!r} is not one of {sorted(PLOTS)}")
    summary: dict[str, Any] = {"experiment": name, "points": len(points), "finished": len(rows)}
    fig_path = os.path.join(workdir, f"{name}.png")
    if rows:
        title = str(plot_cfg.get("title") or name)
        summary.update(PLOTS[kind](rows, curves, plot_cfg, points, fig_path, title))
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(_jsonable(summary), f, indent=1)
    publish = str(config.sweep.get("publish_dir", "") or "")
    if publish and rows:
        os.makedirs(publish, exist_ok=True)
        shutil.copy(fig_path, os.path.join(publish, f"{name}.png"))
    print(json.dumps(_jsonable(summary)))


# ---- plots (one per experiment kind) ---------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid_values(points: Sequence[Point], key: str) -> list[Any]:
    out: list[Any] = []
    for p in points:
        v = _point_value(p.values, key)
        if v not in out:
            out.append(v)
    return out


def _point_value(values: Mapping[str, Any], key: str) -> Any:
    if key in values:
        return values[key]
    s = settings(values)
    if key in s:
        return s[key]
    raise UserError(f"config.sweep.plot: {key!r} is not a grid key (have {list(values)})")


def _label(labels: Sequence[str] | None, key: str, value: Any, values: Sequence[Any]) -> str:
    """`labels[i]` for the i-th grid value of `key` when given, else `name=value`."""
    if labels and value in values and len(labels) == len(values):
        return str(labels[values.index(value)])
    short = ",".join(p.rsplit(".", 1)[-1] for p in split_key(key))
    return f"{short}={_short(value)}"


def _by_point(rows, points):
    by_name = {r["name"]: r for r in rows}
    return [(p, by_name[p.name]) for p in points if p.name in by_name]


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def plot_lr_sweep(rows, curves, plot_cfg, points, path, title):
    """Final `metric` against `x` (an LR) per `series` value, one panel per `panel`
    value; the best x per series (a star). Summary: best x per series and panel, and the
    spread of the best x across series in grid steps (0 = perfect transfer)."""
    plt = _plt()
    x_key, series_key = plot_cfg["x"], plot_cfg["series"]
    metric = plot_cfg.get("metric", "eval_loss")
    panel_key = plot_cfg.get("panel") or None
    panels = _grid_values(points, panel_key) if panel_key else [None]
    series = _grid_values(points, series_key)
    xs_all = sorted(_grid_values(points, x_key))
    pairs = _by_point(rows, points)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False,
                             sharey=True)
    summary: dict[str, Any] = {"metric": metric, "best": {}, "shift_grid_steps": {}}
    cmap = plt.get_cmap("viridis")
    finite_all = [r[metric] for _, r in pairs if _finite(r[metric])]
    for ax, pv in zip(axes[0], panels, strict=True):
        plabel = _label(plot_cfg.get("panel_labels"), panel_key, pv, panels) if panel_key else ""
        best_idx = {}
        for i, sv in enumerate(series):
            sel = [(_point_value(p.values, x_key), r[metric]) for p, r in pairs
                   if _point_value(p.values, series_key) == sv
                   and (panel_key is None or _point_value(p.values, panel_key) == pv)]
            sel.sort()
            if not sel:
                continue
            xs = np.array([a for a, _ in sel], np.float64)
            ys = np.array([b for _, b in sel], np.float64)
            color = cmap(i / max(len(series) - 1, 1))
            slabel = _label(plot_cfg.get("labels"), series_key, sv, series)
            ax.plot(xs, ys, "o-", color=color, label=slabel)
            if np.isfinite(ys).any():
                j = int(np.nanargmin(ys))
                ax.plot(xs[j], ys[j], "*", color=color, ms=16, mec="k")
                best_idx[slabel] = xs_all.index(xs[j])
                summary["best"].setdefault(plabel or "all", {})[slabel] = {
                    "x": float(xs[j]), metric: float(ys[j])}
        if best_idx:
            summary["shift_grid_steps"][plabel or "all"] = max(best_idx.values()) - min(
                best_idx.values())
        ax.set_xscale("log")
        ax.set_xlabel(plot_cfg.get("x_label", x_key))
        ax.set_title(plabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(metric)
    if finite_all:
        lo = min(finite_all)
        hi = min(max(finite_all), lo + float(plot_cfg.get("y_span", 1.5)))
        axes[0][0].set_ylim(lo - 0.03 * (hi - lo + 1e-9), hi)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return summary


def plot_optimizer_compare(rows, curves, plot_cfg, points, path, title):
    """Left: final `metric` against the LR per optimizer. Right: the curves of each
    optimizer's best-LR run (`eval_loss` if logged at several steps, else the train loss
    smoothed over `smooth` logged steps), AdamW's final value as a line. Summary: per
    optimizer the best LR and the steps it needs to reach the baseline's final value, and
    baseline steps / those steps (the step-efficiency ratio)."""
    plt = _plt()
    x_key, series_key = plot_cfg.get("x", "optim.lr"), plot_cfg.get("series", "optim.name")
    metric = plot_cfg.get("metric", "eval_loss")
    baseline = plot_cfg.get("baseline", "adamw")
    pairs = _by_point(rows, points)
    series = _grid_values(points, series_key)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    best: dict[Any, tuple[Point, dict]] = {}
    colors = plt.get_cmap("tab10")
    for i, sv in enumerate(series):
        sel = sorted([(_point_value(p.values, x_key), r[metric], p, r) for p, r in pairs
                      if _point_value(p.values, series_key) == sv], key=lambda t: t[0])
        xs = [a for a, *_ in sel]
        ys = [b for _, b, *_ in sel]
        ax0.plot(xs, ys, "o-", color=colors(i), label=_label(plot_cfg.get("labels"), series_key, sv, series))
        ok = [t for t in sel if _finite(t[1])]
        if ok:
            j = min(ok, key=lambda t: t[1])
            best[sv] = (j[2], j[3])
            ax0.plot(j[0], j[1], "*", color=colors(i), ms=16, mec="k")
    ax0.set_xscale("log")
    ax0.set_xlabel(plot_cfg.get("x_label", x_key))
    ax0.set_ylabel(f"final {metric}")
    ax0.grid(alpha=0.3)
    ax0.legend()
    finite = [r[metric] for _, r in pairs if _finite(r[metric])]
    if finite:
        ax0.set_ylim(min(finite) - 0.02, min(max(finite), min(finite) + 1.0))

    def best_curve(p: Point):
        rs = curves.get(p.name, [])
        s, v = curve(rs, "eval_loss")
        if s.size >= 3:
            return s, v, "eval_loss"
        s, v = curve(rs, "loss")
        return s, fit.smooth(v, int(plot_cfg.get("smooth", 10))), "train loss (smoothed)"

    summary: dict[str, Any] = {"metric": metric, "baseline": baseline, "optimizers": {}}
    if baseline not in best:
        summary["error"] = f"no finished run of the baseline {baseline!r}"
    else:
        bs, bv, what = best_curve(best[baseline][0])
        target, total = float(bv[-1]), float(bs[-1])
        blabel = _label(plot_cfg.get("labels"), series_key, baseline, series)
        ax1.axhline(target, color="gray", ls="--", lw=1, label=f"{blabel} final {target:.3f}")
        for i, sv in enumerate(series):
            if sv not in best:
                continue
            p, r = best[sv]
            s, v, _ = best_curve(p)
            lab = _label(plot_cfg.get("labels"), series_key, sv, series)
            need = fit.steps_to_reach(s, v, target)
            info = {"lr": float(_point_value(p.values, x_key)), "final": float(v[-1]),
                    "steps_to_baseline_final": need,
                    "ratio": total / need if _finite(need) and need > 0 else math.nan}
            summary["optimizers"][lab] = info
            ax1.plot(s, v, color=colors(i), label=f"{lab} (lr {info['lr']:g})")
            if sv != baseline and _finite(need):
                ax1.axvline(need, color=colors(i), ls=":", lw=1)
                ax1.annotate(f"{info['ratio']:.2f}x fewer steps", (need, target),
                             textcoords="offset points", xytext=(5, 12), color=colors(i))
        ax1.set_ylabel(what)
        lo = min(float(np.nanmin(best_curve(p)[1])) for p, _ in best.values())
        ax1.set_ylim(lo - 0.05, target + 0.8)
    ax1.set_xlabel("step")
    ax1.grid(alpha=0.3)
    ax1.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return summary


def plot_curves(rows, curves, plot_cfg, points, path, title):
    """One panel per metric in `metrics` (per-layer values reduced by `reduce`), a line per
    point coloured by its `series` value (one column of panels per `panel` value).
    `hlines` draws reference lines ({metric: value}), `logy` lists log-scale metrics,
    `mark_spikes` marks the spikes `count_spikes` counts on loss and grad_norm, `smooth`
    ({metric: n}) plots a trailing mean over n logged values. Summary:
    the mean over each series' points of the result columns in `report`."""
    plt = _plt()
    metrics = list(plot_cfg.get("metrics", ("loss",)))
    series_key = plot_cfg.get("series") or list(points[0].values)[0]
    panel_key = plot_cfg.get("panel") or None
    reduce = plot_cfg.get("reduce", "mean")
    hlines = dict(plot_cfg.get("hlines") or {})
    smooth = dict(plot_cfg.get("smooth") or {})
    logy = set(plot_cfg.get("logy", ()))
    spikes = plot_cfg["spikes"]
    series = _grid_values(points, series_key)
    panels = _grid_values(points, panel_key) if panel_key else [None]
    pairs = _by_point(rows, points)
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(5.5 * len(panels),
                             3.2 * len(metrics)), squeeze=False, sharex=True)
    colors = plt.get_cmap("tab10")
    for c, pv in enumerate(panels):
        plabel = _label(plot_cfg.get("panel_labels"), panel_key, pv, panels) if panel_key else ""
        for r_i, m in enumerate(metrics):
            ax = axes[r_i][c]
            labelled = set()
            for p, _ in pairs:
                if panel_key and _point_value(p.values, panel_key) != pv:
                    continue
                sv = _point_value(p.values, series_key)
                i = series.index(sv)
                s, v = curve(curves.get(p.name, []), m, reduce)
                if m in smooth:
                    v = fit.smooth(v, int(smooth[m]))
                lab = _label(plot_cfg.get("labels"), series_key, sv, series)
                ax.plot(s, v, color=colors(i), lw=1.1, alpha=0.85,
                        label=None if lab in labelled else lab)
                labelled.add(lab)
                ratio = {"loss": spikes.get("loss_ratio"), "grad_norm": spikes.get("grad_ratio")}
                if plot_cfg.get("mark_spikes") and m in ratio:
                    mask = fit.spike_mask(v, int(spikes["window"]), float(ratio[m]))
                    onset = mask & ~np.concatenate([[False], mask[:-1]])
                    top = np.where(np.isfinite(v), v, np.nanmax(v) if np.isfinite(v).any() else 0)
                    ax.plot(s[onset], top[onset], "v", color=colors(i), ms=7, mec="k")
            if m in hlines:
                ax.axhline(float(hlines[m]), color="gray", ls="--", lw=1,
                           label=f"{m} = {float(hlines[m]):g}")
            if m in logy:
                ax.set_yscale("log")
            ax.set_ylabel(m + (f" ({reduce} over layers)" if m.startswith("moe/") else "")
                          + (f" (mean of {int(smooth[m])} logs)" if m in smooth else ""))
            ax.grid(alpha=0.3)
            if r_i == 0:
                ax.set_title(plabel if panel_key else title)
                ax.legend(fontsize=8)
            ylim = (plot_cfg.get("ylim") or {}).get(m)
            if ylim:
                ax.set_ylim(*ylim)
        axes[-1][c].set_xlabel("step")
    if panel_key:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    report = list(plot_cfg.get("report", ("loss", "eval_loss")))
    out: dict[str, Any] = {}
    for pv in panels:
        for sv in series:
            sel = [r for p, r in pairs if _point_value(p.values, series_key) == sv
                   and (panel_key is None or _point_value(p.values, panel_key) == pv)]
            if not sel:
                continue
            key = _label(plot_cfg.get("labels"), series_key, sv, series)
            if panel_key:
                key = _label(plot_cfg.get("panel_labels"), panel_key, pv, panels) + " / " + key
            out[key] = {c: _mean_col(sel, c) for c in report}
            out[key]["runs"] = len(sel)
    return {"series": out}


def _mean_col(rows, col):
    vals = [r.get(col, math.nan) for r in rows]
    if col in ("loss_spikes", "grad_spikes"):
        return float(np.sum(vals))  # counts add up over seeds
    return _nanmean(np.array(vals, np.float64))


def plot_isoflop(rows, curves, plot_cfg, points, path, title):
    """IsoFLOP profiles: final `metric` against N (`n_matmul`, the parameters in 6N) per
    FLOP budget with its parabola fit (`train.scaling.isoflop_optimum`); right: the optima
    N_opt(C) with the power law N_opt = k C^a (through the optima inside the sampled range
    when at least two are). Summary: the optima and exponents."""
    plt = _plt()
    metric = plot_cfg.get("metric", "eval_loss")
    ok = [r for r in rows if _finite(r[metric]) and r["status"] == "ok"]
    budget_key = plot_cfg.get("budget", "sweep.flop_budget")
    budgets = sorted({float(r[budget_key]) for r in ok})
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("plasma")
    summary: dict[str, Any] = {"metric": metric, "optima": []}
    opt = []  # (flops, n_opt, loss_opt, interior)
    for i, b in enumerate(budgets):
        sel = sorted([r for r in ok if float(r[budget_key]) == b], key=lambda r: r["n_matmul"])
        n = np.array([r["n_matmul"] for r in sel], np.float64)
        loss = np.array([r[metric] for r in sel], np.float64)
        color = cmap(i / max(len(budgets), 1))
        ax0.plot(n, loss, "o", color=color, label=f"C={b:.2g}")
        try:
            o = fit.isoflop_optimum(n, loss)
        except ValueError as e:
            summary["optima"].append({"budget": b, "error": str(e)})
            continue
        grid = np.exp(np.linspace(np.log(n.min()), np.log(n.max()), 50))
        c2, c1, c0 = o.coeffs
        ax0.plot(grid, c2 * np.log(grid) ** 2 + c1 * np.log(grid) + c0, "-", color=color)
        ax0.plot(o.n_opt, o.loss_opt, "*", ms=14, mec="k",
                 color=color if o.interior else "none")
        flops = float(np.mean([r["flops"] for r in sel]))
        summary["optima"].append({"budget": b, "flops": flops, "n_opt": o.n_opt,
                                  "loss_opt": o.loss_opt, "interior": o.interior})
        opt.append((flops, o.n_opt, o.loss_opt, o.interior))
    ax0.set_xscale("log")
    ax0.set_xlabel("N (matmul parameters)")
    ax0.set_ylabel(metric)
    ax0.grid(alpha=0.3)
    ax0.legend(fontsize=8)
    # The power laws go through the optima inside the sampled N range (all of them when
    # fewer than two are); extrapolated vertices are drawn hollow.
    use = [t for t in opt if t[3]]
    use = use if len(use) >= 2 else opt
    for c_, n_, _, interior in opt:
        ax1.loglog(c_, n_, "*", ms=12, mec="k", color="C0" if interior else "none")
    if len(use) >= 2:
        cs_, ns_, ls_ = ([t[k] for t in use] for k in range(3))
        law = fit.fit_power_law(cs_, ns_)
        cs = np.geomspace(min(cs_), max(cs_), 20)
        ax1.loglog(cs, law(cs), "--", label=f"N_opt = {law.coef:.3g} C^{law.exponent:.3f}")
        summary["n_opt_law"] = dataclasses.asdict(law)
        summary["loss_law"] = dataclasses.asdict(fit.fit_power_law(cs_, ls_))
        summary["fitted_budgets"] = len(use)
        ax1.legend()
    ax1.set_xlabel("C (training FLOPs)")
    ax1.set_ylabel("N_opt")
    ax1.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return summary


PLOTS: dict[str, Callable] = {
    "lr_sweep": plot_lr_sweep,
    "optimizer_compare": plot_optimizer_compare,
    "curves": plot_curves,
    "isoflop": plot_isoflop,
}


# ---- CLI ---------------------------------------------------------------------------------


def _compile_cache(config: ConfigDict) -> None:
    """Points that differ only in hyper-parameters reuse compiled programs (init, eval)."""
    import jax

    path = str(config.sweep.get("compile_cache", "auto") or "")
    if not path or jax.config.jax_compilation_cache_dir:
        return
    if path == "auto":
        path = os.path.join(str(config.workdir), "xla_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv: list[str] | None = None) -> None:
    """`python -m train.sweep --config FILE [--config.key=v ...] [--sweep.shard=i ...]`."""
    argv = list(sys.argv if argv is None else argv)
    argv = [("--config.sweep." + a[len("--sweep."):]) if a.startswith("--sweep.") else a
            for a in argv]
    sys.argv = argv  # ml_collections finds the override flags in sys.argv
    from train.__main__ import parse

    config = parse(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    try:
        if config.get("sweep") is None:
            raise UserError("the config has no `sweep` section; use `python -m train` for "
                            "a single run")
        _compile_cache(config)
        if config.get("distributed") is not None:
            # Multi-host points: initialized once here, not again by every point's run.
            distributed.initialize(config.distributed)
            config.distributed.update(dict(auto=False, coordinator_address="",
                                           num_processes=0, process_id=-1))
        run_sweep(config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

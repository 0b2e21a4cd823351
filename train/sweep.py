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
and `workdir/<sweep.name>.png` (the plot `sweep.plot.kind` describes, see
`train.report.PLOT_KINDS`); with `sweep.publish_dir` the figure is copied there too.
The numbers are computed by `train.report` (with the fits of `train.scaling`), the
figures drawn by `train.plots`; this module is the grid, the runner and the command.

A grid key that is not in the config, a value of the wrong type or an invalid model shape
is a `UserError` naming the key, raised before any point runs. A point whose loss or
gradient stays non-finite (the trainer aborts it) is recorded with `status=diverged`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ml_collections import ConfigDict

from train import distributed, loop, report, setup
from train.cli import parse_config, user_errors
from train.errors import UserError
from train.flops import flops_per_token, matmul_params_per_token
from train.metrics import read_metrics

# Grid keys under `sweep.` that vary per point (all other grid keys are config paths).
SWEEP_KEYS = ("sweep.steps", "sweep.flop_budget")


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


def key_label(key: str, value: Any) -> str:
    """`'model.d_model,model.ffn_dim', (64, 256)` -> `'d_model,ffn_dim=64-256'`."""
    short = ",".join(p.rsplit(".", 1)[-1] for p in split_key(key))
    return f"{short}={_short(value)}"


def point_name(point: Mapping[str, Any]) -> str:
    """A readable, filesystem-safe directory name for a point (hashed when long)."""
    parts = [key_label(key, value) for key, value in point.items()]
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

    def value(self, key: str) -> Any:
        """The value of a grid key, or of one config path of a tied key (KeyError if the
        point sets neither)."""
        if key in self.values:
            return self.values[key]
        return settings(self.values)[key]

    def label(self, key: str) -> str:
        """`name=value` for a grid key (see `key_label`)."""
        return key_label(key, self.value(key))


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
        mcfg = setup.model_config(cfg)
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
    if o.get("total_steps") is None or int(o.total_steps) <= 0:  # derived: train.steps
        o.total_steps = int(cfg.train.steps)
    if o.name not in OPTIMIZERS:
        raise UserError(f"point {name}: config.optim.name={o.name!r} is not one of "
                        f"{OPTIMIZERS}")
    try:
        build_schedule(o)
    except ValueError as e:
        raise UserError(f"point {name}: config.optim: {e}") from e


# ---- running -----------------------------------------------------------------------------


def run_point(point: Point, spikes: Mapping[str, Any], run_fn: Callable) -> dict[str, Any]:
    """Trains one point (resuming its checkpoint if any) and writes its `done.json`."""
    cfg = point.config
    mcfg = setup.model_config(cfg)
    counts = mcfg.param_counts()
    t0 = time.perf_counter()
    status, error = "ok", ""
    try:
        run_fn(cfg)
    except UserError as e:
        if "non-finite" not in str(e):
            raise
        status, error = "diverged", str(e)
    rows = read_metrics(cfg.workdir)
    steps = int(rows[-1]["step"]) if rows else 0
    tokens = steps * int(cfg.data.batch_size) * int(cfg.data.seq_len)
    result = {
        "status": status, "steps": steps, "tokens": tokens,
        "flops": point.flops_per_token * tokens, "params": int(counts["total"]),
        "params_active": int(counts["active"]), "n_matmul": matmul_params_per_token(mcfg),
        **report.summarize_run(rows, spikes),
        "wall_s": time.perf_counter() - t0,
    }
    done = {"name": point.name, "values": list(point.values.items()), "result": result,
            "error": error}
    if _lead():
        tmp = os.path.join(cfg.workdir, "done.json.tmp")
        os.makedirs(cfg.workdir, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(report.jsonable(done), f, indent=1)
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
    done["result"] = {k: report.as_float(v) if k != "status" else v
                      for k, v in done["result"].items()}
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
        report.write_outputs(str(config.workdir), name, points, rows, plot_settings(config),
                             str(sweep.get("publish_dir", "") or ""))
    return rows


def spike_settings(config: ConfigDict) -> dict[str, Any]:
    """`sweep.spikes` over the defaults of `default_sweep`."""
    given = config.sweep.get("spikes")
    given = given.to_dict() if isinstance(given, ConfigDict) else dict(given or {})
    return {**default_sweep().spikes.to_dict(), **given}


def plot_settings(config: ConfigDict) -> dict[str, Any]:
    """`sweep.plot` as a dict, with the spike settings added as `spikes`."""
    plot = config.sweep.get("plot")
    plot_cfg = plot.to_dict() if isinstance(plot, ConfigDict) else dict(plot or {})
    plot_cfg["spikes"] = spike_settings(config)
    return plot_cfg


def experiment_name(config: ConfigDict) -> str:
    """`sweep.name`, else the base name of the workdir."""
    return str(config.sweep.get("name", "") or os.path.basename(os.path.normpath(config.workdir)))


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


def _alias_argv(argv: list[str]) -> list[str]:
    """`--sweep.k=v` -> `--config.sweep.k=v`, also set as `sys.argv` (where ml_collections
    finds the override flags)."""
    argv = [("--config.sweep." + a[len("--sweep."):]) if a.startswith("--sweep.") else a
            for a in argv]
    sys.argv = argv
    return argv


def names_config(argv: list[str]) -> bool:
    """Whether an experiment command's `argv` (program name first) names a config
    (`--config FILE` or `--config.k=v` overrides): run the sweep, then the analysis
    (`run_experiment_sweep`); otherwise the analysis only, of an existing `--workdir`."""
    return any(a == "--config" or a.startswith(("--config=", "--config.")) for a in argv[1:])


def run_experiment_sweep(argv: list[str], section: str, example: str) -> tuple[ConfigDict, str]:
    """The sweep half of an experiment command (`train.wsm_experiment`, ...): parses `argv`
    (`--config FILE`, overrides, `--sweep.*` aliases), requires `config.sweep.<section>`
    (`UserError` naming `example` otherwise), runs the sweep (finished points skipped)
    without publishing the sweep's own figure, and returns `(config, publish_dir)` for the
    experiment's analysis."""
    config = parse_config(_alias_argv(argv))
    if config.get("sweep") is None or config.sweep.get(section) is None:
        raise UserError(f"the --config has no `sweep.{section}` section (see {example})")
    publish = str(config.sweep.get("publish_dir", "") or "")
    config.sweep.publish_dir = ""  # only the experiment's figure is published
    _compile_cache(config)
    run_sweep(config)
    return config, publish


def write_experiment(
    workdir: str, name: str, summary: dict[str, Any], text: str,
    draw: Callable[[str], None], publish_dir: str = "",
) -> None:
    """Writes an experiment's `<name>_summary.json`, `<name>.md` (the table `text`) and
    `<name>.png` (`draw(path)`) into `workdir`, copies the figure to `publish_dir` when
    given, and prints the table."""
    with open(os.path.join(workdir, f"{name}_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(workdir, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    fig_path = os.path.join(workdir, f"{name}.png")
    draw(fig_path)
    if publish_dir:
        os.makedirs(publish_dir, exist_ok=True)
        shutil.copy(fig_path, os.path.join(publish_dir, f"{name}.png"))
    print(text)


def main(argv: list[str] | None = None) -> None:
    """`python -m train.sweep --config FILE [--config.key=v ...] [--sweep.shard=i ...]`."""
    argv = _alias_argv(list(sys.argv if argv is None else argv))
    with user_errors():
        config = parse_config(argv)
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


if __name__ == "__main__":
    main()

"""The sweep runner (grid, resume, shards, CSV and plots, key errors), its report (the
scaling fits it shows) and the metrics reader."""

from __future__ import annotations

import csv
import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import ConfigDict

from configs.scaling import common
from train import report, scaling, sweep
from train.errors import UserError
from train.flops import flops_per_token
from train.metrics import read_metrics
from train.setup import model_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENTS = ("mup_transfer", "muon_vs_adamw", "moe_balancing", "qk_clip", "scaled_embeddings",
               "isoflop")


def tiny_sweep(workdir, grid, steps=4, plot=None):
    c = common.get_config("t")
    c.workdir = str(workdir)
    c.model.update(dict(d_model=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16))
    c.data.update(dict(max_files=20, seq_len=16, batch_size=8))
    c.train.update(dict(steps=steps, log_every=1, eval_batches=1))
    c.optim.update(dict(warmup_steps=1))
    c.sweep.compile_cache = ""
    c.sweep.grid = common.grid(grid)
    c.sweep.plot = plot or dict(kind="curves", series="optim.lr", metrics=("loss", "grad_norm"))
    return c


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def fake_run(calls):
    """A stand-in for train.loop.run: records the call and writes a short loss curve."""

    def run(cfg):
        calls.append(cfg.workdir)
        os.makedirs(cfg.workdir, exist_ok=True)
        lr = float(cfg.optim.lr)
        width = 0.3 * math.log(cfg.model.d_model / 32) ** 2  # best width 32
        with open(os.path.join(cfg.workdir, "metrics.jsonl"), "w") as f:
            for s in range(1, cfg.train.steps + 1):
                loss = 3.0 - lr * s + width
                row = {"step": s, "loss": loss, "grad_norm": 1.0, "max_logit": 5.0}
                if s == cfg.train.steps:
                    row["eval_loss"] = loss
                f.write(json.dumps(row) + "\n")
        return {}

    return run


def test_runner_writes_csv_and_plot_and_rerun_skips(tmp_path):
    c = tiny_sweep(tmp_path, {"optim.lr": [1e-3, 1e-2]})
    rows = sweep.run_sweep(c)
    assert [r["name"] for r in rows] == ["lr=0.001", "lr=0.01"]
    table = read_csv(tmp_path / "results.csv")
    assert [t["optim.lr"] for t in table] == ["0.001", "0.01"]
    for t in table:
        assert t["status"] == "ok" and t["steps"] == "4"
        assert math.isfinite(float(t["loss"])) and math.isfinite(float(t["eval_loss"]))
        assert math.isfinite(float(t["max_logit"]))
    assert os.path.getsize(tmp_path / "t.png") > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["finished"] == 2
    # FLOPs come from the trainer's accounting.
    point = sweep.resolve(c)[0]
    expect = flops_per_token(model_config(point.config), 16) * 4 * 8 * 16
    assert rows[0]["tokens"] == 4 * 8 * 16
    assert rows[0]["flops"] == pytest.approx(expect)
    assert rows[1]["loss"] < rows[0]["loss"]  # 10x the LR learns faster in 4 steps

    def must_not_run(cfg):
        raise AssertionError(f"finished point {cfg.workdir} ran again")

    again = sweep.run_sweep(c, run_fn=must_not_run)
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]


def test_shards_split_points_and_resume(tmp_path):
    grid = {"optim.lr": [1e-3, 2e-3, 4e-3], "seed": [0, 1]}
    calls = []
    for shard in (0, 1):
        c = tiny_sweep(tmp_path, grid, steps=5)
        c.sweep.update(dict(shard=shard, num_shards=2))
        sweep.run_sweep(c, run_fn=fake_run(calls))
    names = [p.name for p in sweep.resolve(c)]
    assert sorted(os.path.basename(w) for w in calls) == sorted(names)
    assert [os.path.basename(w) for w in calls[:3]] == names[0::2]
    assert len(read_csv(tmp_path / "results.csv")) == 6
    # A grown grid runs only the new points.
    calls.clear()
    c = tiny_sweep(tmp_path, {"optim.lr": [1e-3, 2e-3, 4e-3, 8e-3], "seed": [0, 1]}, steps=5)
    rows = sweep.run_sweep(c, run_fn=fake_run(calls))
    assert sorted(os.path.basename(w) for w in calls) == ["lr=0.008_seed=0", "lr=0.008_seed=1"]
    assert len(rows) == 8


@pytest.mark.parametrize(
    "grid, needle",
    [
        ({"optim.lrr": [1e-3]}, "optim.lrr"),
        ({"modle.d_model": [64]}, "modle.d_model"),
        ({"model.d_model": ["wide"]}, "model.d_model"),
        ({"model.d_model,model.ffn_dim": [(64,)]}, "model.d_model,model.ffn_dim"),
        ({"sweep.shard": [0, 1]}, "sweep.shard"),
        ({"model.n_heads": [3]}, "n_heads"),  # 32 is not divisible by 3
        ({"optim.name": ["sgd"]}, "optim.name"),
        ({"optim.lr": []}, "optim.lr"),
    ],
)
def test_bad_grid_is_a_user_error_before_any_run(tmp_path, grid, needle):
    calls = []
    c = tiny_sweep(tmp_path, {"optim.lr": [1e-3], **grid})
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        sweep.run_sweep(c, run_fn=fake_run(calls))
    assert calls == []
    assert not (tmp_path / "results.csv").exists()


def test_cli_bad_shard_is_one_line_error(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "train.sweep", "--config", "configs/scaling/qk_clip.py",
         f"--config.workdir={tmp_path / 'w'}", "--sweep.num_shards=2", "--sweep.shard=5"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: config.sweep.shard=5")
    assert "Traceback" not in r.stderr


def test_flop_budget_sets_steps(tmp_path):
    c = tiny_sweep(tmp_path, {"sweep.flop_budget": [1e9, 2e9], "model.d_model": [32, 64]})
    c.train.steps = 1  # replaced by the budget
    points = sweep.resolve(c)
    for p in points:
        per_step = p.flops_per_token * 8 * 16
        budget = sweep.settings(p.values)["sweep.flop_budget"]
        assert p.config.train.steps == round(budget / per_step)
    steps = {(p.values["sweep.flop_budget"], p.values["model.d_model"]): p.config.train.steps
             for p in points}
    assert steps[(1e9, 32)] > steps[(1e9, 64)]
    assert steps[(2e9, 32)] == pytest.approx(2 * steps[(1e9, 32)], abs=1)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_shipped_experiments_resolve(name):
    c = importlib.import_module(f"configs.scaling.{name}").get_config()
    points = sweep.resolve(c)
    assert len(points) >= 2
    assert c.sweep.plot.kind in report.PLOT_KINDS
    assert set(common.get_config("x").sweep) == set(sweep.default_sweep())


def test_plots_of_every_kind_from_fake_runs(tmp_path):
    calls = []
    kinds = {
        "lr_sweep": dict(kind="lr_sweep", x="optim.lr", series="model.d_model", panel="seed"),
        "optimizer_compare": dict(kind="optimizer_compare", x="optim.lr", series="optim.name"),
        "isoflop": dict(kind="isoflop"),
    }
    grids = {
        "lr_sweep": {"optim.lr": [1e-3, 2e-3, 4e-3], "model.d_model": [32, 64], "seed": [0, 1]},
        "optimizer_compare": {"optim.lr": [1e-3, 1e-2], "optim.name": ["adamw", "muon"]},
        "isoflop": {"sweep.flop_budget": [1e9, 3e9], "model.d_model": [16, 24, 32, 48, 64]},
    }
    for kind, plot in kinds.items():
        c = tiny_sweep(tmp_path / kind, grids[kind], steps=30, plot=plot)
        c.optim.lr = 1e-6 if kind == "isoflop" else c.optim.lr  # fake loss: width term only
        rows = sweep.run_sweep(c, run_fn=fake_run(calls))
        assert os.path.getsize(tmp_path / kind / "t.png") > 1000
        summary = json.loads((tmp_path / kind / "summary.json").read_text())
        if kind == "lr_sweep":
            assert summary["best"]["seed=0"]["d_model=32"]["x"] == 4e-3  # the fake loss
            assert summary["shift_grid_steps"] == {"seed=0": 0, "seed=1": 0}
        elif kind == "optimizer_compare":
            # fake loss 3 - lr*s: lr=1e-2 reaches 3 - 1e-2*30 at step 30 either way
            assert summary["optimizers"]["name=muon"]["ratio"] == pytest.approx(1.0)
        else:
            assert [o["budget"] for o in summary["optima"]] == [1e9, 3e9]
            assert all(o["interior"] for o in summary["optima"])
            # The numbers shown are train.scaling.compute_optimal's, C = a budget's mean FLOPs.
            mean = {b: np.mean([r["flops"] for r in rows if r["sweep.flop_budget"] == b])
                    for b in (1e9, 3e9)}
            res = scaling.compute_optimal([mean[r["sweep.flop_budget"]] for r in rows],
                                          [r["n_matmul"] for r in rows],
                                          [r["eval_loss"] for r in rows])
            assert [o["n_opt"] for o in summary["optima"]] == pytest.approx(
                [o.n_opt for o in res.optima])
            assert summary["n_opt_law"]["exponent"] == pytest.approx(res.n_opt.exponent)
            assert summary["loss_law"]["coef"] == pytest.approx(res.loss.coef)


def _iso_rows(budget, n_opt, widths, loss_opt=3.0):
    return [{"sweep.flop_budget": budget, "flops": budget * (1 + 1e-3 * i), "n_matmul": n,
             "status": "ok", "eval_loss": loss_opt + 0.05 * np.log(n / n_opt) ** 2}
            for i, n in enumerate(widths)]


def test_isoflop_fit_uses_interior_optima_and_keeps_failed_budgets():
    ns = np.geomspace(1e4, 1e6, 5)
    rows = (_iso_rows(1e15, 3e4, ns, 3.0) + _iso_rows(1e16, 1e5, ns, 2.8)
            + _iso_rows(1e17, 1e7, ns, 2.6)  # vertex above the sampled N: not in the laws
            + _iso_rows(1e18, 1e5, ns[:2]))  # two runs: no parabola
    rows.append({**rows[0], "status": "diverged", "eval_loss": math.nan})
    budgets, laws = report.isoflop_fit(rows)
    assert [g.budget for g in budgets] == [1e15, 1e16, 1e17, 1e18]
    assert budgets[0].optimum.n_opt == pytest.approx(3e4, rel=1e-6)
    assert budgets[0].params.size == 5  # the diverged run is left out
    assert not budgets[2].optimum.interior
    assert budgets[3].optimum is None and "at least 3" in budgets[3].error
    use = rows[:10]  # the two interior budgets
    expect = scaling.compute_optimal(
        [np.mean([u["flops"] for u in use if u["sweep.flop_budget"] == r["sweep.flop_budget"]])
         for r in use], [r["n_matmul"] for r in use], [r["eval_loss"] for r in use])
    assert laws.budgets == pytest.approx(expect.budgets)
    assert laws.n_opt.exponent == pytest.approx(expect.n_opt.exponent)
    assert laws.n_opt.exponent == pytest.approx(np.log10(1e5 / 3e4), rel=1e-3)


def test_read_metrics_skips_cut_lines(tmp_path):
    assert read_metrics(tmp_path) == []  # nothing logged yet
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": "nan"}\n{"step": 3, "lo')
    rows = read_metrics(tmp_path)  # the last line, cut by a kill: skipped silently
    assert rows == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": "nan"}]
    assert read_metrics(str(path)) == rows
    # A resumed run appended after a cut line: that line is skipped, with a warning.
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo{"step": 2, "loss": 1.5}\n'
                    '\n{"step": 3, "loss": 1.0}\n')
    with pytest.warns(UserWarning, match="skipped 1 malformed line.*line 2"):
        rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 3]


# ---- fits ----------------------------------------------------------------------------------


def test_power_law_fit_recovers_exponents():
    c = np.geomspace(1e15, 1e21, 9)
    law = scaling.fit_power_law(c, 0.3 * c**0.52)
    assert law.exponent == pytest.approx(0.52, abs=1e-9)
    assert law.coef == pytest.approx(0.3, rel=1e-6)
    rng = np.random.default_rng(0)
    loss = 1.69 + 406.4 * c**-0.154
    noisy = loss * np.exp(rng.normal(0, 1e-4, c.size))
    law = scaling.fit_power_law(c, noisy, irreducible=True)
    assert law.exponent == pytest.approx(-0.154, abs=0.01)
    assert law.offset == pytest.approx(1.69, abs=0.05)
    assert np.max(np.abs(law(c) / loss - 1)) < 1e-3


def test_isoflop_parabola_and_compute_optimal_recover_the_optimum():
    # L(N; C) = E(C) + 0.05 * (ln N - ln N_opt(C))^2 with N_opt = 0.1 * C^0.5.
    budgets = np.array([1e16, 1e17, 1e18, 1e19])
    flops, params, losses = [], [], []
    for cb in budgets:
        n_opt = 0.1 * cb**0.5
        for n in n_opt * np.geomspace(0.1, 8.0, 7):
            flops.append(cb)
            params.append(n)
            losses.append(2.0 + 30 * cb**-0.1 + 0.05 * np.log(n / n_opt) ** 2)
    one = scaling.isoflop_optimum(params[:7], losses[:7])
    assert one.n_opt == pytest.approx(0.1 * 1e16**0.5, rel=1e-6) and one.interior
    res = scaling.compute_optimal(flops, params, losses, irreducible=True)
    assert res.budgets == tuple(budgets)
    assert res.n_opt.exponent == pytest.approx(0.5, abs=1e-6)
    assert res.n_opt.coef == pytest.approx(0.1, rel=1e-4)
    assert res.loss.exponent == pytest.approx(-0.1, abs=0.01)
    assert res.loss.offset == pytest.approx(2.0, abs=0.05)
    with pytest.raises(ValueError, match="no minimum"):
        scaling.isoflop_optimum([1, 10, 100], [1.0, 2.0, 1.0])


def test_spikes_and_steps_to_reach():
    v = list(np.linspace(3.0, 2.0, 60))
    v[30] = 4.0  # one step
    v[45:48] = [5.0, 5.0, 5.0]  # one spike over three steps
    v[55] = float("nan")  # non-finite counts
    assert scaling.count_spikes(v, window=20, ratio=1.2) == 3
    assert scaling.count_spikes(np.linspace(3.0, 2.0, 60), 20, 1.2) == 0
    steps, vals = [10, 20, 30], [3.0, 2.0, 1.0]
    assert scaling.steps_to_reach(steps, vals, 1.5) == pytest.approx(25.0)
    assert scaling.steps_to_reach(steps, vals, 3.5) == 10.0
    assert math.isnan(scaling.steps_to_reach(steps, vals, 0.5))


def test_grid_sequence_of_pairs_and_tied_keys():
    pts = sweep.expand((("model.d_model,model.ffn_dim", [(64, 256), (128, 512)]),
                        ("optim.lr", [1e-3])))
    assert [sweep.settings(p) for p in pts] == [
        {"model.d_model": 64, "model.ffn_dim": 256, "optim.lr": 1e-3},
        {"model.d_model": 128, "model.ffn_dim": 512, "optim.lr": 1e-3},
    ]
    assert sweep.point_name(pts[0]) == "d_model,ffn_dim=64-256_lr=0.001"
    assert isinstance(common.grid({"a.b": [1]}), ConfigDict)

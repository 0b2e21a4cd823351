"""`python -m train.muon_scaling` plumbing on a synthetic `results.csv` (4 widths x 2
optimizers x 2 LRs, losses on known power laws): the best LR per width is kept, the edge
of the LR grid is flagged, the multiplier recovers the planted one, and the summary,
table and figure are written (the figure also to the publish dir); the experiment config
resolves to 24 points."""

from __future__ import annotations

import csv
import json
import os

import pytest

from configs.scaling import muon_scaling as muon_scaling_config
from train import muon_scaling, sweep
from train.errors import UserError

COLUMNS = ["name", "model.d_model", "model.ffn_dim", "train.steps", "optim.name", "optim.lr",
           "status", "flops", "params", "loss", "eval_loss"]
FACTOR = 2.0  # Muon reaches AdamW's loss with 1/FACTOR of the FLOPs


def _loss(c: float) -> float:
    return 30.0 * c ** -0.08


def _write(workdir, sizes=(64, 96, 128, 192), optimizers=("adamw", "muon")):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        for d in sizes:
            flops = 1e9 * d ** 2.5
            for opt in optimizers:
                best = _loss(flops * (FACTOR if opt == "muon" else 1.0))
                # lr 1e-3 is the worse one; the best (2e-3) is the grid's upper edge.
                for lr, extra in ((1e-3, 0.05), (2e-3, 0.0)):
                    w.writerow({"name": f"{d}-{opt}-{lr}", "model.d_model": d,
                                "model.ffn_dim": 4 * d, "train.steps": 10, "optim.name": opt,
                                "optim.lr": lr, "status": "ok", "flops": flops,
                                "params": 12 * d * d, "loss": best, "eval_loss": best + extra})
            w.writerow({"name": f"{d}-failed", "model.d_model": d, "optim.name": "muon",
                        "optim.lr": 5e-3, "status": "error", "flops": flops,
                        "eval_loss": "nan"})


def test_fit_summary_table_and_figure(tmp_path):
    work, pub = tmp_path / "sweep", tmp_path / "docs"
    _write(work)
    muon_scaling.main(["prog", "--workdir", str(work), "--n-boot", "50",
                       "--publish_dir", str(pub)])
    for f in (muon_scaling.SUMMARY_FILE, muon_scaling.TABLE_FILE, "muon_scaling.png"):
        assert os.path.getsize(work / f) > 0
    assert os.path.getsize(pub / "muon_scaling.png") > 0
    with open(work / muon_scaling.SUMMARY_FILE) as f:
        s = json.load(f)
    assert s["multiplier"] == pytest.approx(FACTOR, rel=1e-6)
    assert s["ci"][0] == pytest.approx(FACTOR, rel=1e-6) and s["n_boot"] > 0
    assert s["laws"]["adamw"]["exponent"] == pytest.approx(-0.08, rel=1e-6)
    for opt in ("adamw", "muon"):
        rows = s["tuned"][opt]
        assert [r["d_model"] for r in rows] == [64, 96, 128, 192]
        assert all(r["lr"] == 2e-3 and r["lr_at_edge"] for r in rows)
    for p in s["per_size"]:
        assert p["multiplier_at_baseline_loss"] == pytest.approx(FACTOR, rel=1e-6)
        assert p["loss_diff"] < 0
    text = (work / muon_scaling.TABLE_FILE).read_text()
    assert "**2.00x**" in text and "(edge)" in text


def test_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        muon_scaling.analyze(str(tmp_path / "none"))
    _write(tmp_path / "one", optimizers=("adamw",))
    with pytest.raises(UserError, match="'muon'"):
        muon_scaling.analyze(str(tmp_path / "one"), n_boot=10)
    _write(tmp_path / "small", sizes=(64,))
    with pytest.raises(UserError, match="too few sizes"):
        muon_scaling.analyze(str(tmp_path / "small"), n_boot=10)


def test_config_resolves_to_24_points():
    points = sweep.resolve(muon_scaling_config.get_config())
    assert len(points) == 24
    widths = {p.values["model.d_model,model.ffn_dim,train.steps"][0] for p in points}
    assert widths == {64, 96, 128, 192}

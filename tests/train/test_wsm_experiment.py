"""`python -m train.wsm_experiment` plumbing on a 2-point sweep of 4 steps (constant LR and
WSD, a checkpoint every step): the merge table, summary and figure are written, the merge
of K=1 is the constant run's final checkpoint (its logged eval loss, for every weighting),
and the weights are those of `train.merge`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs.scaling import common
from train import sweep, wsm_experiment
from train.errors import UserError


def _tiny_wsm_sweep(workdir):
    c = common.get_config("wsm_test")
    c.workdir = str(workdir)
    c.model.update(dict(d_model=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=16))
    c.data.update(dict(max_files=20, seq_len=16, batch_size=8))
    c.train.update(dict(steps=4, log_every=1, eval_every=2, eval_batches=1))
    c.optim.update(dict(warmup_steps=1, min_lr_frac=0.0))
    c.checkpoint.update(dict(every=1, keep=4))
    c.sweep.compile_cache = ""
    c.sweep.grid = common.grid({"optim.schedule,optim.wsd.decay": [("constant", "linear"),
                                                                   ("wsd", "sqrt")]})
    c.sweep.plot = dict(kind="curves", series="optim.schedule,optim.wsd.decay",
                        metrics=("eval_loss",))
    return c


def test_merges_summary_table_and_figure(tmp_path):
    work, pub = tmp_path / "wsm", tmp_path / "docs"
    sweep.run_sweep(_tiny_wsm_sweep(work))
    wsm_experiment.main(["prog", "--workdir", str(work), "--last", "1,2,4",
                         "--decay-shapes", "linear", "--publish_dir", str(pub)])

    for f in ("wsm_summary.json", "wsm.md", "wsm.png"):
        assert os.path.getsize(work / f) > 0, f
    assert os.path.getsize(pub / "wsm.png") > 0
    with open(work / "wsm_summary.json") as f:
        summary = json.load(f)
    assert set(summary["schedules"]) == {"constant", "WSD 1-sqrt"}
    final = summary["schedules"]["constant"]["eval_loss"]  # logged by the trainer at step 4
    merged = {(t["weights"], t["K"]): t for t in summary["merged"]}
    assert set(merged) == {(w, k) for w in ("uniform", "decay linear") for k in (1, 2, 4)}
    for w in ("uniform", "decay linear"):
        assert merged[w, 1]["window"] == 0
        assert merged[w, 1]["eval_loss"] == pytest.approx(final, rel=1e-4)
    runs = {(m["weights"], m["K"]): m for m in summary["merge_runs"]}
    assert runs["uniform", 1]["eval_loss"] == runs["uniform", 1]["eval_loss_newest"]
    assert runs["uniform", 4]["steps"] == [1, 2, 3, 4]
    np.testing.assert_allclose(runs["uniform", 4]["merge_weights"], [0.25] * 4)
    np.testing.assert_allclose(runs["decay linear", 4]["merge_weights"],
                               [1 / 6, 1 / 3, 1 / 3, 1 / 6])  # the trapezoid rule
    assert runs["uniform", 4]["eval_loss"] != pytest.approx(final, rel=1e-6)
    assert summary["best_merge"]["uniform"]["eval_loss"] == min(
        merged["uniform", k]["eval_loss"] for k in (1, 2, 4))
    with open(work / "wsm.md") as f:
        text = f.read()
    assert "| constant + merge, decay linear, K=4 (3 steps) |" in text
    assert "| WSD 1-sqrt |" in text


def test_schedule_labels_and_errors(tmp_path):
    label = wsm_experiment.schedule_label
    assert label({"schedule": "constant"}) == "constant"
    assert label({"schedule": "warmup_cosine"}) == "cosine"
    assert label({"schedule": "wsd", "wsd": {"decay": "sqrt"}}) == "WSD 1-sqrt"
    assert label({"schedule": "warmup_stable_decay", "wsd": {"decay": "linear"}}) == "WSD linear"
    with pytest.raises(UserError, match="no finished sweep points"):
        wsm_experiment.analyze(str(tmp_path))
    with pytest.raises(UserError, match="decay-shapes"):
        wsm_experiment.analyze(str(tmp_path), shapes=("exp",))

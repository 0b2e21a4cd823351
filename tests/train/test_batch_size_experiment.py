"""`python -m train.batch_size_experiment` on synthetic runs (metrics.jsonl written by hand,
no training): the arms, the noise scale in sequences, the critical-batch fit (which
recovers the E_min, S_min of curves built from McCandlish et al.'s model), the summary,
table and figure; and the experiment config's points (equal tokens, beta2 scaled to a
constant half-life in tokens, the noise scale logged on the reference batch only)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from train import batch_size_experiment as bse
from train import sweep
from train.errors import UserError

SEQ, REF, B2 = 4, 4, 0.95
E_MIN, S_MIN = 640.0, 10.0  # tokens, steps: B_crit = E_MIN / SEQ / S_MIN = 16 sequences
G_SQ, TRACE = 0.5, 100.0  # B_simple = 200 tokens = 50 sequences


def _write_run(root, batch, b2, noise=False):
    d = root / f"B{batch}_b2{b2:g}"
    d.mkdir(parents=True)
    (d / "done.json").write_text("{}")
    cfg = {"data": {"batch_size": batch, "seq_len": SEQ}, "optim": {"b2": b2}}
    (d / "config.json").write_text(json.dumps(cfg))
    e_b = E_MIN + S_MIN * batch * SEQ  # tokens to reach loss 2.0 (linear curves)
    steps = int(1280 // (batch * SEQ))  # the same 1280 tokens at every batch size
    rows = []
    for s in range(1, steps + 1):
        row = {"step": s, "loss": 3.0, "eval_loss": 3.0 - s * batch * SEQ / e_b}
        if noise:
            bs, bb = batch * SEQ / 2, batch * SEQ
            row.update({"noise/g_small_sq": G_SQ + TRACE / bs, "noise/g_big_sq": G_SQ + TRACE / bb,
                        "noise/b_small": bs, "noise/b_big": bb})
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_fit_noise_table_and_figure(tmp_path):
    work, pub = tmp_path / "bs", tmp_path / "docs"
    for b in (1, 4, 16):
        _write_run(work, b, B2, noise=b == REF)
    for b in (1, 16):
        _write_run(work, b, round(B2 ** (b / REF), 6))
    bse.main(["prog", "--workdir", str(work), "--ref-batch", str(REF), "--b2", str(B2),
              "--publish_dir", str(pub)])
    with open(work / bse.SUMMARY_FILE) as f:
        s = json.load(f)
    assert sorted(s["arms"]["fixed"]["final_eval_loss"]) == ["1", "16", "4"]
    assert sorted(s["arms"]["scaled"]["final_eval_loss"]) == ["1", "16", "4"]  # ref in both
    assert s["arms"]["scaled"]["beta2"]["16"] == pytest.approx(B2 ** 4, abs=1e-6)
    for arm in ("fixed", "scaled"):
        c = s["arms"][arm]["critical_batch"]
        assert c["target"] == pytest.approx(2.0)  # the worst final: B=16's
        assert c["e_min"] == pytest.approx(E_MIN) and c["s_min"] == pytest.approx(S_MIN)
        assert c["b_crit"] == pytest.approx(E_MIN / SEQ / S_MIN)
        assert s["arms"][arm]["best_batch"] == 1
    (n,) = s["noise_scale"]
    assert n["batch"] == REF and n["tokens_per_sequence"] == pytest.approx(SEQ)
    assert n["b_simple_tokens"] == pytest.approx(TRACE / G_SQ)
    assert s["b_simple_sequences"] == pytest.approx(TRACE / G_SQ / SEQ)
    assert (work / bse.TABLE_FILE).read_text().startswith("| batch (sequences) |")
    assert os.path.getsize(pub / "batch_size.png") > 10_000
    assert os.path.isfile(work / "batch_size.png")


def test_tokens_to_reach_and_no_runs(tmp_path):
    run = bse.Run("r", 2, B2, 4, np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0]), [])
    assert bse.tokens_to_reach(run, 1.5) == pytest.approx(20.0)  # halfway, steps 2..3
    assert math.isnan(bse.tokens_to_reach(run, 0.5))
    with pytest.raises(UserError, match="no finished sweep points"):
        bse.find_runs(str(tmp_path), REF)


def test_config_points_equal_tokens_and_scaled_beta2():
    from configs.scaling import batch_size as cfg_mod

    points = sweep.resolve(cfg_mod.get_config())
    assert len(points) == 2 * len(cfg_mod.BATCHES) - 1
    for p in points:
        c = p.config
        b, b2 = int(c.data.batch_size), float(c.optim.b2)
        assert c.train.steps * b * c.data.seq_len == cfg_mod.TOKENS
        assert c.train.eval_batches * b == cfg_mod.EVAL_SEQS
        assert b2 == pytest.approx(cfg_mod.B2) or b2 == pytest.approx(
            cfg_mod.B2 ** (b / cfg_mod.REF_BATCH), abs=1e-6)
        ref = b == cfg_mod.REF_BATCH
        assert (c.train.noise_scale_every > 0) == ref and (c.train.grad_accum >= 2) == ref

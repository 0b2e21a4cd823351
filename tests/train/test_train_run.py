"""End-to-end training runs on a tiny MLA+MoE config: outputs, learning, exact resume."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from configs import tiny
from model import ModelConfig
from train.errors import UserError
from train.loop import run


def small_config(workdir: str, steps: int = 16):
    c = tiny.get_config()
    c.workdir = str(workdir)
    c.model.update(dict(d_model=48, n_layers=2, n_heads=2, q_lora_rank=0, kv_lora_rank=16,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, ffn_dim=96,
                        n_routed_experts=4, moe_ffn_dim=32, max_seq_len=64))
    c.data.update(dict(max_files=40, seq_len=32, batch_size=8))
    c.train.update(dict(steps=steps, log_every=4, eval_every=8, eval_batches=2, progress=False))
    c.optim.update(dict(total_steps=16, warmup_steps=4, lr=1e-2))
    c.checkpoint.every = 4
    c.mesh.update(dict(data=2, fsdp=2, tensor=1, expert=2))
    return c


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_run_writes_outputs_and_learns(tmp_path):
    # Muon (+AdamW for embeddings, head, norms) with QK-clip inside the jitted step.
    c = small_config(tmp_path)
    c.optim.name = "muon"
    c.optim.qk_clip.enabled = True
    out = run(c)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [4, 8, 12, 16]
    for r in rows:
        for key in ("loss", "lr", "tokens_per_s", "grad_norm", "max_logit", "moe/maxvio", "mfu",
                    "qk_clip/frac_clipped", "max_logit_per_layer"):
            assert key in r, key
        assert len(r["moe/maxvio"]) == 1  # one MoE layer (first_k_dense=1)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert "eval_loss" in rows[1] and np.isfinite(rows[1]["eval_loss"])
    assert out["step"] == 16
    assert os.path.exists(tmp_path / "config.json")
    assert os.path.isdir(tmp_path / "checkpoints" / "16")
    assert any(p.startswith("events") for p in os.listdir(tmp_path / "tb"))


def test_resume_equals_uninterrupted(tmp_path):
    straight = tmp_path / "straight"
    run(small_config(straight, steps=12))
    split = tmp_path / "split"
    run(small_config(split, steps=8))
    run(small_config(split, steps=12))  # same command, more steps: resumes at 8
    a, b = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in b] == [4, 8, 12]
    # On CPU with the same mesh the resumed run is bitwise identical.
    assert a[-1]["loss"] == b[-1]["loss"]
    assert a[-1]["moe/maxvio"] == b[-1]["moe/maxvio"]


def test_bad_inputs_raise_named_errors(tmp_path):
    c = small_config(tmp_path)
    c.data.source = "text"
    c.data.paths = (str(tmp_path / "missing"),)
    with pytest.raises(UserError, match="missing"):
        run(c)
    c = small_config(tmp_path)
    c.data.batch_size = 6
    with pytest.raises(UserError, match="batch_size"):
        run(c)
    c = small_config(tmp_path)
    c.mesh.data = 3
    with pytest.raises(UserError, match="config.mesh"):
        run(c)
    c = small_config(tmp_path)
    c.model.vocab_size = 100
    with pytest.raises(UserError, match="vocab_size"):
        run(c)
    assert not os.path.exists(tmp_path / "metrics.jsonl")
    assert jax.device_count() == 8


def test_restore_onto_another_mesh_and_bad_checkpoints(tmp_path):
    import shutil

    a = tmp_path / "a"
    run(small_config(a, steps=8))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    run(small_config(a, steps=12))  # same mesh
    c = small_config(b, steps=12)
    c.mesh.update(dict(data=1, fsdp=4, tensor=2, expert=1))  # another layout of the 8 devices
    run(c)
    la, lb = read_metrics(a)[-1], read_metrics(b)[-1]
    assert la["step"] == lb["step"] == 12
    np.testing.assert_allclose(la["loss"], lb["loss"], rtol=2e-4)

    before = sorted(os.listdir(a / "checkpoints"))
    bad = small_config(a, steps=16)
    bad.model.d_model = 64  # incompatible with the saved tree
    with pytest.raises(UserError, match="cannot restore"):
        run(bad)
    assert sorted(os.listdir(a / "checkpoints")) == before

    # Corrupt every data file of the latest checkpoint: a clear error, nothing deleted.
    latest = a / "checkpoints" / "12"
    for root, _, files in os.walk(latest):
        for f in files:
            if "metadata" not in f:
                with open(os.path.join(root, f), "wb") as fh:
                    fh.write(b"garbage")
    with pytest.raises(UserError, match="cannot restore"):
        run(small_config(a, steps=16))
    assert sorted(os.listdir(a / "checkpoints")) == before


def test_init_from_imported_checkpoint(tmp_path):
    import flax.linen as nn
    import jax.numpy as jnp

    from model import Transformer
    from model.hf.checkpoint import write_orbax
    from train.checkpoint import Checkpointer

    c = small_config(tmp_path / "run", steps=1)
    cfg = ModelConfig.from_dict(c.model.to_dict())
    v = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(123), jnp.zeros((1, 8), jnp.int32)))
    v["router_bias"] = jax.tree.map(lambda b: b + 0.5, v["router_bias"])
    write_orbax(str(tmp_path / "imported"), cfg, v)
    c.init_from = str(tmp_path / "imported")
    c.model.d_model = 999  # ignored: the architecture comes from the checkpoint
    c.optim.update(dict(schedule="constant", lr=0.0, warmup_steps=0, weight_decay=0.0))
    c.model.bias_update_rate = 0.0
    run(c)
    ck = Checkpointer(str(tmp_path / "run" / "checkpoints"), 1, 1, False)
    restored = ck.manager.restore(1)
    for a, b in zip(jax.tree.leaves(v["params"]), jax.tree.leaves(restored["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(v["router_bias"]), jax.tree.leaves(restored["router_bias"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bad = small_config(tmp_path / "run2", steps=1)
    bad.init_from = str(tmp_path / "nothing")
    with pytest.raises(UserError, match="init_from"):
        run(bad)


def test_nonfinite_loss_aborts_cleanly_with_checkpoints_kept(tmp_path):
    # An LR this large makes the loss itself non-finite at logged steps (not only the
    # gradient): every such step is skipped, and the run aborts with a named error.
    c = small_config(tmp_path, steps=40)
    c.optim.update(dict(lr=1e30, clip_norm=0.0, total_steps=40))
    c.train.max_bad_steps = 3
    with pytest.raises(UserError, match="non-finite loss or gradient.*max_bad_steps"):
        run(c)
    rows = read_metrics(tmp_path)
    assert any(isinstance(r["loss"], str) for r in rows)  # 'nan' / 'inf' rows were written
    assert sorted(os.listdir(tmp_path / "checkpoints"))  # the saved steps are kept

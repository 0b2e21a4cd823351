"""`python -m train.merge` (WSM checkpoint merging): the average equals the numpy mean of
the individually restored checkpoints, the decay weights match a hand computation, the
result starts a run (`config.init_from`) and exports to Hugging Face, and the errors
(too few checkpoints, a corrupt checkpoint in the window, an existing --out) are one line
with nothing written or deleted. One tiny 4-step run (a checkpoint every step) is shared."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from model import LOGICAL_RULES, Transformer
from model.hf.checkpoint import read_orbax
from model.hf.convert import abstract_variables
from model.sharding import make_mesh
from train import merge as merge_lib
from train import setup
from train.errors import UserError

_spec = importlib.util.spec_from_file_location(
    "_train_conftest", os.path.join(os.path.dirname(__file__), "conftest.py"))
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
ROOT, TINY_MODEL_ARGS = _conftest.ROOT, list(_conftest.TINY_MODEL_ARGS)
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
           JAX_PLATFORMS="cpu")


def _tree(d) -> dict[str, int]:
    return {os.path.relpath(p, d): os.path.getsize(p)
            for p in glob.glob(os.path.join(d, "**"), recursive=True) if os.path.isfile(p)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 4-step tiny MLA+MoE run with checkpoints 1..4 and an eval split."""
    work = tmp_path_factory.mktemp("merge") / "run"
    cmd = [sys.executable, "-m", "train", *TINY_MODEL_ARGS, f"--config.workdir={work}",
           "--config.train.steps=4", "--config.optim.total_steps=8",
           "--config.optim.warmup_steps=1", "--config.optim.lr=1e-2",
           "--config.train.log_every=1", "--config.train.eval_every=4",
           "--config.train.eval_batches=1", "--config.checkpoint.every=1",
           "--config.checkpoint.keep=4", "--config.checkpoint.async_save=False",
           "--config.mesh.data=1"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(work)


def _restore(workdir, step):
    cfg = setup.source_model_config(workdir)
    abstract, _ = abstract_variables(cfg)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                            abstract)
    return jax.tree.map(np.asarray, setup.restore_variables(workdir, abstract, step))


def test_uniform_merge_is_the_mean_of_the_restored_checkpoints(run_dir, tmp_path):
    out = str(tmp_path / "merged")
    result = merge_lib.merge(run_dir, out, last=3)
    assert result.steps == (2, 3, 4)
    np.testing.assert_allclose(result.weights, [1 / 3] * 3)
    each = [_restore(run_dir, s) for s in (2, 3, 4)]
    want = jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), axis=0), *each)
    _, got = read_orbax(out)
    assert set(got) == {"params", "router_bias"}  # the router biases are averaged too
    n = 0
    for (kp, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want),
                          strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-6, atol=1e-7, err_msg=str(kp))
        n += 1
    assert n == len(jax.tree.leaves(each[0]))
    # The checkpoints differ (the test can fail): the mean is not the newest one.
    assert max(float(np.abs(a - b).max()) for a, b in
               zip(jax.tree.leaves(each[0]), jax.tree.leaves(each[2]), strict=True)) > 1e-4
    meta = json.load(open(os.path.join(out, merge_lib.MERGE_FILE)))
    assert meta["steps"] == [2, 3, 4] and np.isfinite(meta["eval_loss"])
    assert np.isfinite(result.eval_loss) and np.isfinite(result.eval_loss_newest)


def test_decay_weights_by_hand():
    # Equal spacing, linear decay to 0: the trapezoid rule (1/2k, 1/k, ..., 1/2k).
    np.testing.assert_allclose(merge_lib.decay_weights([10, 20, 30]), [0.25, 0.5, 0.25])
    np.testing.assert_allclose(merge_lib.decay_weights([1, 2, 3, 4, 5]),
                               [1 / 8, 1 / 4, 1 / 4, 1 / 4, 1 / 8])
    # Unequal spacing, steps 0, 10, 40: tau = 0, 1/4, 1. The intervals' mean LR factors
    # w1 = 1 - 1/8 = 7/8 and w2 = 1 - (1/4 + 1)/2 = 3/8; c = (1 - w1, w1 - w2, w2).
    np.testing.assert_allclose(merge_lib.decay_weights([0, 10, 40]), [1 / 8, 1 / 2, 3 / 8])
    # Cosine, two intervals: w1 = mean over [0, 1/2] of (1 + cos pi t)/2 = 1/2 + 1/pi.
    w1, w2 = 0.5 + 1 / np.pi, 0.5 - 1 / np.pi
    np.testing.assert_allclose(merge_lib.decay_weights([0, 1, 2], "cosine"),
                               [1 - w1, w1 - w2, w2])
    for shape in merge_lib.DECAY_SHAPES:
        c = merge_lib.decay_weights([3, 5, 9, 10, 20], shape)
        assert np.all(c >= 0) and abs(c.sum() - 1) < 1e-12
    np.testing.assert_allclose(merge_lib.merge_weights([4, 8], "uniform"), [0.5, 0.5])
    np.testing.assert_allclose(merge_lib.decay_weights([7]), [1.0])


def test_emulated_decay_equals_training_with_that_decay():
    """The WSM identity on a toy run: constant-LR iterates u_t added up, merged with the
    decay weights, equal theta_0 plus each interval's updates scaled by its mean factor."""
    rng = np.random.default_rng(0)
    u = rng.standard_normal((12, 3))
    theta = np.concatenate([np.zeros((1, 3)), np.cumsum(u, axis=0)])  # theta_t, t = 0..12
    steps = [0, 3, 4, 8, 12]
    c = merge_lib.decay_weights(steps)
    merged = sum(ci * theta[s] for ci, s in zip(c, steps, strict=True))
    tau = np.asarray(steps) / 12.0
    want = sum((1 - (tau[i] + tau[i + 1]) / 2) * u[steps[i]:steps[i + 1]].sum(0)
               for i in range(len(steps) - 1))
    np.testing.assert_allclose(merged, want, atol=1e-12)


def test_select_steps_and_too_few_checkpoints():
    assert merge_lib.select_steps([1, 2, 3, 4, 5, 6], 2, every=2) == [4, 6]
    with pytest.raises(UserError, match=r"--last=4 needs 4 checkpoints at multiples of "
                                        r"--every=2, the run has 3.*checkpoint.keep=4"):
        merge_lib.select_steps([1, 2, 3, 4, 5, 6], 4, every=2)


def test_merged_dir_starts_a_run_and_exports(run_dir, tmp_path):
    out = str(tmp_path / "merged")
    merge_lib.merge(run_dir, out, last=2, weights="decay")
    _, merged = read_orbax(out)

    c = ConfigDict(json.load(open(os.path.join(run_dir, "config.json"))))
    c.init_from = out
    mesh = make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
    cfg = setup.model_config(c)
    model = Transformer(cfg, mesh=mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        tx, _ = setup.build_optimizer(c.optim, setup.abstract_params(model, 8))
        state = setup.init_state(model, tx, mesh, 1, 8)
        state = setup.load_init_from(out, state, mesh)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(merged["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(state.router_bias), jax.tree.leaves(merged["router_bias"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    from model.hf.__main__ import main as hf_cli

    assert hf_cli(["export", out, str(tmp_path / "hf")]) == 0
    assert os.path.isfile(tmp_path / "hf" / "config.json")
    assert glob.glob(str(tmp_path / "hf" / "*.safetensors"))


def test_existing_out_and_too_few_checkpoints_refuse(run_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        merge_lib.merge(run_dir, str(out), last=2)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="--last=5 needs 5 checkpoints, the run has 4"):
        merge_lib.merge(run_dir, str(tmp_path / "new"), last=5)
    assert not os.path.exists(tmp_path / "new")


def test_corrupt_checkpoint_in_the_window_is_named_and_nothing_deleted(run_dir, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    (work / "checkpoints" / "3" / "default" / "_METADATA").write_text("garbage")
    before = _tree(work)
    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "train.merge", "--workdir", str(work),
                        "--last", "3", "--out", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    line = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1]
    assert line.startswith("error: checkpoint step 3 of the merge window"), line
    assert _tree(work) == before and not out.exists()
    # Outside the window the corrupt step does not matter; the CLI prints one line.
    r = subprocess.run([sys.executable, "-m", "train.merge", "--workdir", str(work),
                        "--last", "2", "--every", "2", "--weights", "decay", "--out", str(out)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and "2:0.5, 4:0.5" in lines[0] and "eval_loss" in lines[0], lines

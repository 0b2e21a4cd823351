"""`config.init_from` of a training run's workdir (`train.setup`): the architecture of the
run's saved `config.json` (through a chain of runs), its latest checkpoint's params and
router biases (any job's state: only those entries are read), its LoRA adapters merged,
and clear errors for a directory that is no checkpoint and a run that saved none."""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from configs import base
from model import LOGICAL_RULES, Transformer, lora
from model.sharding import make_mesh
from train import setup
from train.errors import UserError

SMALL = dict(vocab_size=272, d_model=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=16)


def _config(workdir, **model):
    c = base.get_config()
    c.workdir = str(workdir)
    c.model.update({**SMALL, **model})
    c.optim.update(dict(lr=1e-2, warmup_steps=0, total_steps=10, schedule="constant"))
    return c


def _mesh():
    return make_mesh({"fsdp": 2}, devices=jax.devices()[:2])


def _state(c, mesh, seed=0):
    cfg = setup.model_config(c)
    model = Transformer(cfg, mesh=mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        tx, _ = setup.build_optimizer(c.optim, setup.abstract_params(model, 8))
        return setup.init_state(model, tx, mesh, seed, 8)


def _save_run(c, state, steps=(3, 5)):
    """A finished run's workdir: `config.json` and checkpoints at `steps` (the last one
    holds `state`, earlier ones zeros)."""
    os.makedirs(c.workdir, exist_ok=True)
    setup.write_config(c.workdir, c)
    ckpt = setup.checkpointer(c, f"{c.workdir}/checkpoints")
    ckpt.save(steps[0], state.replace(params=jax.tree.map(lambda x: x * 0, state.params)),
              force=True)
    ckpt.save(steps[-1], state, force=True)
    ckpt.close()


def _perturb_adapters(params):
    """Nonzero `lora_b` (fresh adapters add exactly 0, which would hide a missing merge)."""
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype)
        if lora.is_adapter(kp) else x, params)


def test_run_workdir_architecture_and_latest_params(tmp_path):
    """A run's latest checkpoint loads into a config whose own `model` section differs:
    the architecture comes from the run's config.json (d_model 32, not 48), the runtime
    fields from the new config; a run started from that run resolves to the same."""
    mesh = _mesh()
    src = _config(tmp_path / "a", attn_impl="explicit")
    saved = _state(src, mesh, seed=3)
    _save_run(src, saved)

    c = _config(tmp_path / "b", d_model=48, dtype="bfloat16")
    c.init_from = src.workdir
    cfg = setup.model_config(c)
    assert (cfg.d_model, cfg.dtype) == (32, "bfloat16")
    state = setup.load_init_from(c.init_from, _state(c, mesh), mesh)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # step 5, not 3
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)

    # A chain: b (started from a) has saved config.model d_model=48; c from b still gets 32.
    _save_run(c, state)
    c2 = _config(tmp_path / "c", d_model=64)
    c2.init_from = c.workdir
    assert setup.model_config(c2).d_model == 32


def test_lora_run_is_merged_before_loading(tmp_path):
    """A run trained with adapters (rank 2) loads into a model without adapters as its
    merged kernels, and into one with fresh adapters (rank 4) with those kernels and B = 0:
    both compute the adapted run's function."""
    mesh = _mesh()
    src = _config(tmp_path / "lora", lora_rank=2)
    saved = _state(src, mesh)
    saved = saved.replace(params=_perturb_adapters(saved.params))
    _save_run(src, saved)
    src_cfg = setup.model_config(src)
    merged = lora.merge_lora(src_cfg, saved.params)
    tokens = np.arange(16, dtype=np.int32).reshape(2, 8) % 200
    want = jax.jit(Transformer(src_cfg).apply)({"params": saved.params}, tokens)[0]

    for rank in (0, 4):
        c = _config(tmp_path / f"to{rank}", lora_rank=rank)
        c.init_from = src.workdir
        cfg = setup.model_config(c)
        assert cfg.lora_rank == rank  # a runtime field: the new run's choice
        state = setup.load_init_from(c.init_from, _state(c, mesh), mesh)
        flat, ref = flatten_dict(state.params, sep="/"), flatten_dict(merged, sep="/")
        assert all(np.array_equal(np.asarray(flat[k]), np.asarray(v)) for k, v in ref.items())
        assert lora.has_adapters(state.params) == (rank > 0)
        assert all(not np.any(np.asarray(x)) for k, x in flat.items() if k.endswith("lora_b"))
        got = jax.jit(Transformer(cfg).apply)({"params": state.params}, tokens)[0]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_errors_name_the_directory(tmp_path):
    c = _config(tmp_path / "x")
    c.init_from = str(tmp_path / "nothing")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="neither a model checkpoint .* nor a training run"):
        setup.model_config(c)
    # A run that wrote its config.json but no checkpoint (killed before the first save).
    empty = _config(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    setup.write_config(empty.workdir, empty)
    c.init_from = empty.workdir
    mesh = _mesh()
    state = _state(c, mesh)
    with pytest.raises(UserError, match=r"config.init_from=.*empty.*no checkpoint found"):
        setup.load_init_from(c.init_from, state, mesh)

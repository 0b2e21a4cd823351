"""train.setup: optimizer-state shardings follow the parameters (AdamW and Muon)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import tiny
from model import LOGICAL_RULES, Transformer
from model.sharding import make_mesh
from train import setup


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizer_state_takes_each_parameters_sharding(name):
    c = tiny.get_config()
    c.optim.name = name
    c.optim.total_steps = 100
    cfg = setup.model_config(c)
    mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    model = Transformer(cfg, mesh=mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        tx, _ = setup.build_optimizer(c.optim, setup.abstract_params(model, 16))
        state = setup.init_state(model, tx, mesh, 0, 16)
    by_path = {jax.tree_util.keystr(p): x for p, x in
               jax.tree_util.tree_flatten_with_path(state.params)[0]}
    n_moments = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        key = jax.tree_util.keystr(path)
        owner = [p for p in by_path if key.endswith(p)]
        if owner and by_path[owner[0]].shape == leaf.shape:
            n_moments += 1
            assert leaf.sharding.is_equivalent_to(by_path[owner[0]].sharding, leaf.ndim), key
        else:  # counters, schedule state
            assert leaf.sharding.is_fully_replicated, key
    assert n_moments >= len(by_path)  # every parameter has at least one moment
    # Some parameters really are split (so the check above is not trivially true).
    assert any(not x.sharding.is_fully_replicated for x in by_path.values())


def test_checkpointer_keeps_every_step_when_keep_is_none(tmp_path):
    c = tiny.get_config()
    c.checkpoint.keep = None  # allowed by train.validate: keep all
    c.checkpoint.update(dict(every=1, async_save=False))
    ckpt = setup.checkpointer(c, str(tmp_path / "ckpt"))
    for step in range(1, 6):
        ckpt.save(step, {"w": jnp.full((2,), step, jnp.float32)}, force=True)
    ckpt.close()
    assert setup.Checkpointer(str(tmp_path / "ckpt")).all_steps() == [1, 2, 3, 4, 5]

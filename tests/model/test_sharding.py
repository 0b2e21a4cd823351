"""Sharding: the forward on the 8-device CPU mesh equals the single-device forward (MLA+MoE
with data/fsdp/expert parallelism, GQA with tensor parallelism), parameters really are split,
and make_mesh rejects impossible meshes with a message naming the problem."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from model import LOGICAL_RULES, ModelConfig, make_mesh
from model.moe import choose_moe
from model.sharding import MESH_AXES, batch_sharding, logical_to_sharding

MLA_MOE = ModelConfig(
    vocab_size=128, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=16,
    attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
    v_head_dim=8, n_routed_experts=4, n_shared_experts=1, top_k=2, moe_ffn_dim=16,
    first_k_dense=1, capacity_factor=2.0, moe_dispatch="capacity",
)
GQA = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=16)


def _split_axes(spec: P, mesh) -> set[str]:
    """Mesh axes of size > 1 that a PartitionSpec splits over."""
    axes = set()
    for entry in spec:
        if entry is None:
            continue
        axes.update(a for a in (entry if isinstance(entry, tuple) else (entry,)) if mesh.shape[a] > 1)
    return axes


@pytest.mark.parametrize(
    "cfg, mesh_shape, split_params",
    [
        # MLA + MoE: batch over data x fsdp x expert; weights on fsdp, experts on expert.
        (MLA_MOE, {"data": 2, "fsdp": 2, "expert": 2},
         {("layers_1", "moe", "experts", "w_gate"): {"expert", "fsdp"},
          ("layers_0", "attn", "kv_a_proj", "kernel"): {"fsdp"}}),
        (MLA_MOE.replace(scan_layers=True), {"data": 2, "fsdp": 2, "expert": 2},
         {("moe_stack", "moe", "experts", "w_down"): {"expert", "fsdp"}}),
        # Dropless dispatch: expert parallelism through all-to-all inside shard_map.
        (MLA_MOE.replace(moe_dispatch="dropless"), {"data": 2, "expert": 4},
         {("layers_1", "moe", "experts", "w_up"): {"expert"}}),
        # GQA with tensor parallelism: heads, kv heads, mlp and vocab split 4 ways.
        (GQA, {"data": 2, "tensor": 4},
         {("layers_0", "attn", "q_proj", "kernel"): {"tensor"},
          ("layers_1", "attn", "k_proj", "kernel"): {"tensor"},
          ("layers_0", "mlp", "down_proj", "kernel"): {"tensor"},
          ("lm_head", "kernel"): {"tensor"}}),
        (GQA, {"fsdp": 2, "tensor": 4},
         {("layers_0", "attn", "o_proj", "kernel"): {"tensor", "fsdp"},
          ("embed", "embedding"): {"tensor", "fsdp"}}),
    ],
    ids=["mla_moe_dp_fsdp_ep", "mla_moe_scan_dp_fsdp_ep", "mla_moe_dropless_dp_ep", "gqa_dp_tp",
         "gqa_fsdp_tp"],
)
def test_sharded_forward_equals_single_device(cfg, mesh_shape, split_params, make_model, jit):
    model, variables, fwd = make_model(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (8, 8)), jnp.int32)
    ref_logits, ref_aux = fwd(variables, tokens)

    mesh = make_mesh(mesh_shape)
    with nn.logical_axis_rules(LOGICAL_RULES):
        shardings = logical_to_sharding(nn.get_partition_spec(variables), mesh)
        params = jax.device_put(nn.unbox(variables), shardings)
    sharded = model.clone(mesh=mesh)  # as the trainer builds it: Transformer(cfg, mesh=mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        in_batch = batch_sharding(mesh)
        apply = jit(lambda v, t: sharded.apply(v, t), in_shardings=(shardings, in_batch))
        tokens_sharded = jax.device_put(tokens, in_batch)
        hlo = apply.lower(params, tokens_sharded).as_text()
        logits, aux = apply(params, tokens_sharded)
    # Dropless MoE over an expert axis runs expert-parallel (all_to_all in shard_map).
    assert ("all_to_all" in hlo) == (cfg.is_moe and choose_moe(cfg).dispatch == "dropless")

    # The parameters named above are really split over the expected mesh axes.
    flat = {tuple(k.key for k in path): s for path, s in jax.tree_util.tree_leaves_with_path(
        shardings["params"], is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))}
    for path, axes in split_params.items():
        sharding = flat[path]
        assert _split_axes(sharding.spec, mesh) == axes, (path, sharding.spec)
        assert not sharding.is_fully_replicated
        leaf = params["params"]
        for key in path:
            leaf = leaf[key]
        shard = leaf.addressable_shards[0].data
        assert shard.size * np.prod([mesh.shape[a] for a in axes]) == leaf.size
    # The batch really is split too.
    assert not in_batch.is_fully_replicated

    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(aux["max_logits"]), np.asarray(ref_aux["max_logits"]),
                               rtol=1e-5, atol=1e-5)
    if cfg.is_moe:
        np.testing.assert_array_equal(np.asarray(aux["moe_load"]), np.asarray(ref_aux["moe_load"]))
        assert float(np.asarray(aux["moe_load"]).sum()) == 8 * 8 * cfg.top_k * cfg.n_moe_layers


def test_make_mesh_shapes():
    mesh = make_mesh({"fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    assert mesh.axis_names == MESH_AXES
    assert sorted(d.id for d in mesh.devices.ravel()) == sorted(d.id for d in jax.devices())
    assert dict(make_mesh({}, devices=jax.devices()[:1]).shape) == dict.fromkeys(MESH_AXES, 1)


@pytest.mark.parametrize(
    "shape, words",
    [
        ({"data": 3}, ["3", "8 devices"]),  # 3 slots for 8 devices
        ({"data": 2, "tensor": 2}, ["4", "8 devices"]),
        ({"data": 3, "fsdp": -1}, ["8 devices", "3"]),  # 3 does not divide 8
        ({"data": -1, "fsdp": -1}, ["-1", "data", "fsdp"]),
        ({"pipeline": 2}, ["pipeline"]),
        ({"data": 0, "fsdp": -1}, ["data"]),
    ],
)
def test_make_mesh_errors_name_the_problem(shape, words):
    with pytest.raises(ValueError) as ei:
        make_mesh(shape)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))

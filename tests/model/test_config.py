"""ModelConfig: invalid combinations raise a ValueError naming the fields; param_counts()
matches the parameters an initialized Transformer really has."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model import ModelConfig, Transformer

MOE = dict(n_routed_experts=4, n_shared_experts=1, top_k=2, moe_ffn_dim=16)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(d_model=30, n_heads=4), ["d_model", "n_heads"]),
        (dict(d_model=32, n_heads=4, n_kv_heads=3), ["n_heads", "n_kv_heads"]),
        (dict(d_model=36, n_heads=4), ["head_dim"]),  # 36 / 4 = 9 is odd
        (dict(d_model=32, n_heads=4, head_dim=7), ["head_dim"]),
        (dict(attention="mla", qk_rope_head_dim=5), ["qk_rope_head_dim"]),
        (dict(**{**MOE, "top_k": 5}), ["top_k", "n_routed_experts"]),
        (dict(**MOE, n_group=3, topk_group=1), ["n_routed_experts", "n_group"]),
        (dict(**MOE, n_group=2, topk_group=3), ["topk_group", "n_group"]),
        (dict(attention="mla", qk_norm=True), ["qk_norm"]),
        (dict(**MOE, first_k_dense=-1), ["first_k_dense"]),
        (dict(**MOE, n_layers=2, first_k_dense=3), ["first_k_dense"]),
    ],
)
def test_invalid_config_names_fields(kwargs, names):
    with pytest.raises(ValueError) as ei:
        ModelConfig(**kwargs)
    msg = str(ei.value)
    for name in names:
        assert name in msg, (name, msg)


def test_valid_configs_construct():
    # Each neighbour of an invalid case above is accepted.
    ModelConfig(d_model=32, n_heads=4, n_kv_heads=2)
    ModelConfig(d_model=30, n_heads=4, head_dim=8)
    ModelConfig(attention="mla", qk_rope_head_dim=4)
    ModelConfig(**MOE, n_group=2, topk_group=2)
    ModelConfig(**{**MOE, "top_k": 4})
    ModelConfig(**MOE, first_k_dense=2, n_layers=2)


def test_from_dict_unknown_key_named():
    with pytest.raises(ValueError, match="not_a_field"):
        ModelConfig.from_dict({"d_model": 32, "not_a_field": 3})
    cfg = ModelConfig(d_model=32, n_heads=2, attention="mla", **MOE)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def _n_params(cfg: ModelConfig) -> tuple[int, dict]:
    model = Transformer(cfg)
    tokens = jnp.zeros((1, 4), jnp.int32)
    # Abstract init: the real parameter shapes without spending time on the forward.
    variables = jax.eval_shape(model.init, jax.random.key(0), tokens)
    params = nn.unbox(variables["params"])
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)), params


BASE = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=16)


def _hand_count_dense_mha(d, v, L, h, kvh, hd, f, tied):
    attn = d * h * hd + 2 * d * kvh * hd + h * hd * d
    layer = attn + 3 * d * f + 2 * d
    return v * d + (0 if tied else d * v) + d + L * layer


@pytest.mark.parametrize(
    "extra, hand",
    [
        (dict(), _hand_count_dense_mha(32, 96, 2, 4, 4, 8, 48, False)),
        (dict(n_kv_heads=2), _hand_count_dense_mha(32, 96, 2, 4, 2, 8, 48, False)),
        (dict(n_kv_heads=1, tie_embeddings=True), _hand_count_dense_mha(32, 96, 2, 4, 1, 8, 48, True)),
        (dict(head_dim=6), _hand_count_dense_mha(32, 96, 2, 4, 4, 6, 48, False)),
        # q/k/v biases (4*8 + 2*2*8 per layer) and per-head q/k norm gains (2*8 per layer).
        (dict(n_kv_heads=2, attn_bias=True, qk_norm=True),
         _hand_count_dense_mha(32, 96, 2, 4, 2, 8, 48, False) + 2 * (32 + 32 + 16)),
    ],
)
def test_param_counts_dense(extra, hand):
    cfg = ModelConfig(**BASE, **extra)
    actual, _ = _n_params(cfg)
    assert actual == hand
    assert cfg.param_counts()["total"] == actual
    assert cfg.param_counts()["active"] == actual
    assert cfg.param_counts()["embedding"] == 96 * 32


@pytest.mark.parametrize("scan, q_lora_rank, tied", [(False, 0, False), (True, 12, True), (False, 12, True)])
def test_param_counts_mla_moe(scan, q_lora_rank, tied):
    cfg = ModelConfig(
        **{**BASE, "n_layers": 3},
        attention="mla", q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=6, n_routed_experts=4, n_shared_experts=2, top_k=2,
        moe_ffn_dim=10, first_k_dense=1, tie_embeddings=tied, scan_layers=scan,
    )
    actual, params = _n_params(cfg)
    counts = cfg.param_counts()
    assert counts["total"] == actual
    # Active = total minus the (E - k) unused routed experts of each MoE layer.
    expert = 3 * 32 * 10
    assert counts["active"] == actual - cfg.n_moe_layers * (4 - 2) * expert
    # The shared experts really exist as one SwiGLU of width n_shared * moe_ffn_dim.
    shared = params["moe_stack"]["moe"]["shared"] if scan else params["layers_1"]["moe"]["shared"]
    assert shared["gate_proj"]["kernel"].shape[-1] == 2 * 10
    assert math.prod(params["embed"]["embedding"].shape) == counts["embedding"]

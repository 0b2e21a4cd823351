"""FLOP accounting against a hand count."""

from __future__ import annotations

from model import ModelConfig
from train.flops import flops_per_token, matmul_params_per_token, measure_peak


def test_dense_flops_by_hand():
    cfg = ModelConfig(vocab_size=100, d_model=16, n_layers=2, n_heads=2, ffn_dim=32)
    per_layer = 4 * 16 * 16 + 3 * 16 * 32  # q,k,v,o + gate,up,down
    n = 2 * per_layer + 16 * 100  # + LM head
    assert matmul_params_per_token(cfg) == n
    assert flops_per_token(cfg, seq_len=8) == 6 * n + 6 * 2 * 8 * 2 * (8 + 8)


def test_moe_counts_only_active_experts():
    base = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=2, ffn_dim=32, attention="mla",
                kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
                n_routed_experts=8, n_shared_experts=1, moe_ffn_dim=8, first_k_dense=1)
    k1 = matmul_params_per_token(ModelConfig(**base, top_k=1))
    k2 = matmul_params_per_token(ModelConfig(**base, top_k=2))
    assert k2 - k1 == 3 * 16 * 8  # one more expert's gate, up and down for the MoE layer
    tied = matmul_params_per_token(ModelConfig(**base, top_k=1, tie_embeddings=True))
    assert tied == k1  # the tied head is still a matmul


def test_measured_peak_is_positive():
    assert measure_peak(64, 0.05) > 0
    assert measure_peak(64, 0.05, "bfloat16") > 0

"""Tiny MLA + MoE model on the standard-library corpus: trains on a CPU in minutes.

    python -m train --config configs/tiny.py
"""

from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/tiny"
    c.model.update(
        dict(
            vocab_size=320,
            d_model=128,
            n_layers=3,
            n_heads=4,
            max_seq_len=256,
            attention="mla",
            q_lora_rank=64,
            kv_lora_rank=32,
            qk_nope_head_dim=32,
            qk_rope_head_dim=16,
            v_head_dim=32,
            ffn_dim=384,
            n_routed_experts=8,
            n_shared_experts=1,
            moe_ffn_dim=96,
            top_k=2,
            first_k_dense=1,
            routed_scaling_factor=1.0,
            bias_update_rate=1e-2,  # short runs: balance within tens of steps
            capacity_factor=2.0,
        )
    )
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.optim.lr = 3e-3
    c.train.steps = 300
    return c

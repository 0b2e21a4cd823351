"""Tiny MLA + MoE model on the standard-library corpus: trains on a CPU in minutes.

    python -m train --config configs/tiny.py
"""

from configs import base


def get_config():
    c = base.get_config()
    c.workdir = "runs/tiny"
    c.model.update(
        dict(
            n_layers=3,
            attention="mla",
            q_lora_rank=64,
            kv_lora_rank=32,
            ffn_dim=384,
            n_routed_experts=8,
            n_shared_experts=1,
            moe_ffn_dim=96,
            first_k_dense=1,
            bias_update_rate=1e-2,  # short runs: balance within tens of steps
        )
    )
    c.train.steps = 300
    return c

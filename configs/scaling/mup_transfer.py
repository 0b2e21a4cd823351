"""muP learning-rate transfer (Tensor Programs V): an AdamW LR sweep at widths 64..256
under standard parametrization and under muP (base width 64).

    python -m train.sweep --config configs/scaling/mup_transfer.py

muP here: hidden init std / sqrt(m), hidden Adam LR / m, logits x 1/m, attention 1/d_head
(m = d_model / 64). Embeddings are not multiplied by sqrt(d) in either arm (the
multiplier would make the embedding update grow with width, outside muP's table); the
head count is fixed, so the head size grows with the width.
"""

from configs.scaling import common


def get_config():
    c = common.get_config("mup_transfer")
    c.model.scale_embeddings = False
    c.sweep.grid = common.grid({
        "model.mup_base_d_model,model.attn_logit_scale": [(0, "sqrt"), (64, "inverse")],
        "model.d_model,model.ffn_dim": [(64, 256), (128, 512), (256, 1024)],
        "optim.lr": [2.0**-k for k in range(11, 4, -1)],  # 4.9e-4 .. 3.1e-2, x2 steps
    })
    c.sweep.plot = dict(
        kind="lr_sweep", x="optim.lr", series="model.d_model,model.ffn_dim",
        panel="model.mup_base_d_model,model.attn_logit_scale", metric="eval_loss",
        labels=("d=64", "d=128", "d=256"),
        panel_labels=("standard parametrization", "muP (base width 64)"),
        x_label="peak learning rate (AdamW)",
        title="LR transfer across widths: final eval loss after 200 steps",
    )
    return c

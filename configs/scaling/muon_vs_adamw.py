"""Muon vs AdamW (Moonlight, "Muon is Scalable"): the same model, data and steps, each
optimizer with its LR tuned over one grid; the steps Muon needs to reach AdamW's final
eval loss, as a ratio.

    python -m train.sweep --config configs/scaling/muon_vs_adamw.py

Muon uses Moonlight's update scale 0.2 sqrt(max(fan_in, fan_out)) (RMS-matched to AdamW,
so both share one LR grid); embeddings, head and gains use AdamW in both arms.
"""

from configs.scaling import common


def get_config():
    c = common.get_config("muon_vs_adamw")
    c.train.update(dict(steps=300, eval_every=15))
    c.sweep.grid = common.grid({
        "optim.name": ["adamw", "muon"],
        "optim.lr": [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2],
    })
    c.sweep.plot = dict(kind="optimizer_compare", x="optim.lr", series="optim.name",
                        baseline="adamw", metric="eval_loss", labels=("AdamW", "Muon"),
                        x_label="peak learning rate (Muon: Moonlight update scale)",
                        title="Muon vs AdamW: d=128, 2 layers, 300 steps")
    return c

"""Scaled embeddings ("Spike No More", Takase et al.): token embeddings with and without
the sqrt(d_model) multiplier at a high LR; loss spikes and grad-norm spikes counted.

    python -m train.sweep --config configs/scaling/scaled_embeddings.py

Without the multiplier the embeddings keep the N(0, 0.02^2) init (small norm: the
paper's unstable case); with it they are N(0, 1/d) x sqrt(d) (unit scale). A spike
(`train.scaling.count_spikes`): a logged value above `ratio` x the median of the previous
20 logged values (loss ratio 1.2, grad-norm ratio 3), runs of such steps counted once.
"""

from configs.scaling import common


def get_config():
    c = common.get_config("scaled_embeddings")
    c.optim.update(dict(lr=3e-2))
    c.train.update(dict(steps=300, log_every=1))
    c.sweep.grid = common.grid({
        "model.scale_embeddings": [False, True],
        "seed": [0, 1],
    })
    c.sweep.plot = dict(
        kind="curves", series="model.scale_embeddings", metrics=("loss", "grad_norm"),
        labels=("unscaled (std 0.02)", "x sqrt(d)"), logy=("grad_norm",), mark_spikes=True,
        report=("loss_spikes", "grad_spikes", "loss", "eval_loss", "max_grad_norm"),
        title="Scaled embeddings: AdamW lr 3e-2, d=128, seeds 0 and 1 (v: spike onsets)",
    )
    return c

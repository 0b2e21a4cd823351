"""MoE load balancing (Wang et al., "Auxiliary-Loss-Free Load Balancing"; DeepSeek-V3):
no balancing vs a sequence-wise auxiliary loss vs the loss-free router bias, MaxVio over
training and the final loss.

    python -m train.sweep --config configs/scaling/moe_balancing.py

8 routed experts, top-2, sigmoid router, no shared expert, capacity factor 4 (= E / k:
no token is ever dropped, so imbalance costs no tokens, as in the paper).
"""

from configs.scaling import common


def get_config():
    c = common.get_config("moe_balancing")
    # top_k=2, the sigmoid router, no shared expert and no dense layer are the defaults.
    c.model.update(dict(n_routed_experts=8, moe_ffn_dim=128, capacity_factor=4.0))
    c.train.steps = 300
    c.sweep.grid = common.grid({
        # (bias update rate u, aux-loss alpha)
        "model.bias_update_rate,model.aux_loss_alpha": [
            (0.0, 0.0), (0.0, 1e-3), (0.0, 1e-2), (1e-3, 0.0), (1e-2, 0.0)],
    })
    c.sweep.plot = dict(
        kind="curves", series="model.bias_update_rate,model.aux_loss_alpha",
        metrics=("moe/maxvio", "loss"), reduce="mean",  # loss: mean of the last 6 logs
        labels=("none", "aux loss 1e-3", "aux loss 1e-2", "loss-free u=1e-3",
                "loss-free u=1e-2"),
        report=("maxvio_mean", "maxvio_final", "maxvio_max", "loss", "eval_loss"),
        ylim={"loss": (1.9, 3.0)}, smooth={"loss": 6},
        title="MoE balancing: 8 experts, top-2, d=128, 2 MoE layers",
    )
    return c

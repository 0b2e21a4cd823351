"""Muon vs AdamW by scaling laws (Moonlight, "Muon is Scalable", Sec. 3): at four model
sizes, each optimizer's LR tuned over a 3-point grid around its d=128 optimum
(`configs/scaling/muon_vs_adamw.py`: AdamW 4e-3, Muon 1.6e-2), the best LR's final eval
loss per size against training FLOPs, a power law L = a C^-b per optimizer and Muon's
compute multiplier at matched loss with a bootstrap interval (`train.scaling.
compute_multiplier`).

    python -m train.muon_scaling --config configs/scaling/muon_scaling.py --sweep.publish_dir=docs/scaling

runs the sweep (`train.sweep.run_sweep`: finished points skipped) and then the fit; on a
finished sweep, `python -m train.muon_scaling --workdir runs/scaling/muon_scaling
--publish_dir docs/scaling` redoes only the fit.

Sizes: d_model 64, 96, 128, 192 (ffn 4x, 2 layers, 4 heads), trained for 120, 180, 240,
360 steps (tokens grow with width, so the larger models get the larger budgets, as on a
compute-optimal frontier); 4 x 2 x 3 = 24 runs, ~15-20 min on 2 CPU cores. Standard
parametrization, as in `muon_vs_adamw.py` (muP transfers the optimum LR here but its
models lose to standard parametrization at d >= 128, see `mup_transfer.py`), so instead
of transferring one LR each width gets the same 3-point grid per optimizer (x0.5, x1, x2
of the d=128 optimum); Muon's update scale 0.2 sqrt(max(fan_in, fan_out)) is meant to
keep its optimum in place across widths. A best LR at the grid's edge is flagged in the
table.
"""

from configs.scaling import common

# (d_model, ffn_dim, steps) per size.
SIZES = ((64, 256, 120), (96, 384, 180), (128, 512, 240), (192, 768, 360))
LRS = {"adamw": (2e-3, 4e-3, 8e-3), "muon": (8e-3, 1.6e-2, 3.2e-2)}


def get_config():
    c = common.get_config("muon_scaling")
    c.sweep.name = "muon_scaling_sweep"  # the sweep's own curves; muon_scaling.png is the fit
    c.train.update(dict(eval_every=60))
    c.sweep.grid = common.grid({
        "model.d_model,model.ffn_dim,train.steps": list(SIZES),
        "optim.name,optim.lr": [(name, lr) for name, lrs in LRS.items() for lr in lrs],
    })
    c.sweep.plot = dict(kind="curves", series="optim.name,optim.lr", metrics=("eval_loss",),
                        report=("eval_loss",),
                        title="Muon vs AdamW scaling: eval loss per point")
    # Read by `python -m train.muon_scaling` (not by the sweep).
    c.sweep.muon_scaling = dict(baseline="adamw", candidate="muon", metric="eval_loss",
                                n_boot=1000, irreducible=False,
                                title="Muon vs AdamW: d=64..192, 2 layers, 120..360 steps, "
                                      "best of 3 LRs each")
    return c

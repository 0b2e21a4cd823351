"""WSM (Tian et al. 2025, "Decay-Free Learning Rate Schedule via Checkpoint Merging"): at
equal steps and data, cosine decay vs WSD with a linear and a 1-sqrt decay vs a constant
LR whose last K checkpoints are merged (uniform and decay-emulating weights).

    python -m train.wsm_experiment --config configs/scaling/wsm.py --sweep.publish_dir=docs/scaling

runs the sweep (`train.sweep.run_sweep`: finished points skipped, as `python -m
train.sweep --config configs/scaling/wsm.py` would) and then the merges; on a finished
sweep, `python -m train.wsm_experiment --workdir runs/scaling/wsm --publish_dir
docs/scaling` redoes only the merges.

The sweep trains the four schedules (AdamW lr 4e-3, 20 warmup steps, 1000 steps, every
decay to 0, WSD decaying over the last 20% = 200 steps), ~12 min on 2 CPU cores; the
merges take ~1 min: the constant-LR run's last K = 2, 4, 8, 16 checkpoints (20 steps
apart: windows of 20..300 steps) with uniform weights and with the weights that emulate a
linear and a 1-sqrt decay (`train.merge.decay_weights`), evaluated on the sweep's eval
batches. Output: `runs/scaling/wsm/wsm_summary.json`, `wsm.md` (the table) and `wsm.png`
(copied to `--publish_dir`; the sweep's own curves are `wsm_schedules.png`). Every point
saves a checkpoint every 20 steps and keeps the last 16 (`checkpoint.every`,
`checkpoint.keep`); only the constant-LR point's are merged.
"""

from configs.scaling import common

STEPS = 1000
CKPT_EVERY = 20
CKPT_KEEP = 16  # the largest merge window, in checkpoints

# (optim.schedule, optim.wsd.decay) per point and its label; the decay shape is ignored
# by cosine and constant.
SCHEDULES = (("constant", "linear"), ("warmup_cosine", "linear"), ("wsd", "linear"),
             ("wsd", "sqrt"))
LABELS = ("constant", "cosine", "WSD linear", "WSD 1-sqrt")


def get_config():
    c = common.get_config("wsm")
    c.sweep.name = "wsm_schedules"  # the sweep's own curves; wsm.png is the merge figure
    c.optim.update(dict(lr=4e-3, warmup_steps=20, min_lr_frac=0.0))
    c.optim.wsd.decay_frac = 0.2
    # All 1762 standard-library files (30M tokens: 1M tokens of training, no repeats, 37
    # held-out files); 64 eval batches (66k tokens) so that merges differing by 0.01 differ.
    c.data.max_files = 0
    c.train.update(dict(steps=STEPS, eval_every=50, eval_batches=64))
    c.checkpoint.update(dict(every=CKPT_EVERY, keep=CKPT_KEEP))
    c.sweep.grid = common.grid({"optim.schedule,optim.wsd.decay": list(SCHEDULES),
                                "seed": [0]})  # [0, 1]: two seeds, twice the time
    c.sweep.plot = dict(
        kind="curves", series="optim.schedule,optim.wsd.decay", metrics=("eval_loss", "loss"),
        labels=LABELS, smooth={"loss": 6}, report=("loss", "eval_loss"),
        title=f"LR schedules: AdamW lr 4e-3, d=128, {STEPS} steps",
    )
    # Read by `python -m train.wsm_experiment` (not by the sweep).
    c.sweep.wsm = dict(merge_last=(2, 4, 8, 16), decay_shapes=("linear", "sqrt"),
                       merge_every=CKPT_EVERY)
    return c

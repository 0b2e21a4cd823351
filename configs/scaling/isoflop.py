"""IsoFLOP profiles (Chinchilla approach 2): at each FLOP budget, models of several widths
trained for budget / (6N + attention FLOPs per token x tokens per step) steps; a parabola in
log N per budget gives N_opt(C), and a power law N_opt = k C^a is fitted through them
(`train.scaling`).

    python -m train.sweep --config configs/scaling/isoflop.py

The budgets here are CPU-sized (minutes); for a real study raise `sweep.flop_budget`
and the widths (and depth) together, and shard the points over hosts with
`--sweep.shard=i --sweep.num_shards=n`.
"""

from configs.scaling import common


def get_config():
    c = common.get_config("isoflop")
    c.optim.update(dict(lr=4e-3, warmup_steps=10))
    c.train.update(dict(log_every=10))
    c.sweep.grid = common.grid({
        "sweep.flop_budget": [1e11, 3e11, 1e12],
        "model.d_model,model.ffn_dim": [(16, 64), (24, 96), (32, 128), (48, 192), (64, 256),
                                        (96, 384)],
    })
    c.sweep.plot = dict(kind="isoflop", metric="eval_loss", budget="sweep.flop_budget",
                        title="IsoFLOP profiles: widths 16..96, 2 layers, AdamW lr 4e-3")
    return c

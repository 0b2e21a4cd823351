"""Pipeline stage 1: SFT on demonstrations of 2-digit addition (training split only).

    python -m train --config configs/pipeline/sft.py --config.data.paths=demos.jsonl

`rl.pipeline` writes the demonstrations and runs this in chunks of steps, stopping once
greedy accuracy on training prompts reaches its target (the model is left partly right).
"""

from configs import sft
from configs.pipeline import common


def get_config():
    c = sft.get_config()
    c.workdir = "runs/pipeline/sft"
    c.model.update(common.MODEL)
    common.chat_data(c, batch_size=64)  # one example per 17-token row
    c.train.update(dict(steps=500, log_every=10, eval_every=0, eval_batches=1))
    c.optim.update(dict(lr=3e-3, warmup_steps=20, schedule="constant"))
    c.checkpoint.update(dict(every=50, keep=2))
    return c

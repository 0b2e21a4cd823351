"""Pipeline stage 2: DPO on pairs of the SFT model's own samples of training prompts
(chosen: a correct answer, rejected: an incorrect one), from the SFT run's workdir.

    python -m train --config configs/pipeline/preference.py --config.data.paths=pairs.jsonl \\
        --config.init_from=runs/pipeline/sft
"""

from configs import preference
from configs.pipeline import common


def get_config():
    c = preference.get_config()
    c.workdir = "runs/pipeline/preference"
    c.init_from = "runs/pipeline/sft"
    c.model.update(common.MODEL)
    common.chat_data(c, batch_size=32)  # pairs per step
    c.data.eval_permille = 50
    c.preference.loss = "dpo"
    c.preference.beta = 0.1
    c.train.update(dict(steps=150, log_every=10, eval_every=50, eval_batches=1))
    c.optim.update(dict(lr=1e-4, warmup_steps=10, schedule="constant"))
    c.checkpoint.update(dict(every=50, keep=2))
    return c

"""Pipeline stage 2: DPO on pairs of the SFT model's own samples of training prompts
(chosen: a correct answer, rejected: an incorrect one), from the SFT run's workdir.

The loss is DPO plus the chosen answers' token-mean NLL (`preference.nll_weight` = 1, the
"DPO + NLL" of Iterative RPO, Pang et al. 2024, with its beta = 0.1). Plain DPO on these
pairs lowered the chosen answers' log-probs along with the rejected ones (likelihood
displacement: mean summed log-prob of the chosen -1.9 -> -3.4 over the run) and cut the
greedy held-out accuracy from 17.6% to 11.1% (13.9% at lr 1e-5); with the NLL term the
chosen log-probs rise and it went to 30.7% (README, "Post-training", lists the trials).

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
    c.preference.nll_weight = 1.0  # + NLL of the chosen answer (RPO); 0 is plain DPO
    c.train.update(dict(steps=150, log_every=10, eval_every=50, eval_batches=1))
    c.optim.update(dict(lr=1e-4, warmup_steps=10, schedule="constant"))
    c.checkpoint.update(dict(every=50, keep=2))
    return c

"""Preference optimization (DPO, cDPO, IPO, SimPO, ORPO, KTO): `rl.preference_loop`.

    python -m train --config configs/preference.py --config.data.paths=pairs.jsonl \\
        [--config.init_from=runs/imported] [--config.preference.loss=simpo]

`data.paths`: JSONL files of {"prompt", "chosen", "rejected"} records (chat form: `prompt`
a list of messages, `chosen` / `rejected` strings or assistant messages); for
`loss="kto"` also unpaired {"prompt", "completion", "label": bool} records
(`rl/preference_data.py`). From scratch it trains the tiny model below with the byte
tokenizer and the built-in ChatML template (the reference is then the scratch
initialization); with `init_from` (a `python -m model.hf import` directory, e.g. an SFT
model) the checkpoint's architecture, tokenizer and chat template, and the reference is
that checkpoint.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from configs import base


def get_config():
    c = base.get_config()
    c.job = "preference"
    c.workdir = "runs/preference"
    c.model.update(dict(d_model=64, n_layers=2, n_heads=4, ffn_dim=192, max_seq_len=256))
    c.data.update(dict(
        source="preference",  # the preference job reads only JSONL preference records
        paths=(),
        tokenizer="",  # "" -> init_from's tokenizer.json, else "byte"
        seq_len=256,  # a row: prompt + completion, cut at the end beyond seq_len + 1 tokens
        batch_size=8,  # pairs per step (examples for kto)
        eval_permille=50,  # held-out records, by a hash of each record
    ))
    # "" -> the template beside the tokenizer, else the built-in ChatML; "builtin"; a path.
    c.data.chat_template = ""
    c.preference = ConfigDict(dict(
        loss="dpo",  # dpo | ipo | simpo | orpo | kto (rl/preference.py)
        # Hyperparameters, None -> the loss's own default (dpo/ipo/kto beta 0.1, simpo
        # beta 2.0 and gamma 0.5, orpo lam 0.1, kto lambda_d = lambda_u = 1); setting one
        # the loss does not take is an error.
        beta=placeholder(float),
        label_smoothing=placeholder(float),  # dpo: > 0 is cDPO
        # dpo: weight of the chosen completions' token-mean NLL added to the loss (RPO,
        # Pang et al. 2024; counters DPO lowering the chosen log-probs too); default 0.
        nll_weight=placeholder(float),
        gamma=placeholder(float),  # simpo: target reward margin
        lam=placeholder(float),  # orpo: weight of the odds-ratio term
        lambda_d=placeholder(float),  # kto: weight of desirable examples
        lambda_u=placeholder(float),  # kto: weight of undesirable examples
        # None -> True for dpo/ipo (reference log-probs computed once at the start: no
        # second copy of the weights in memory), False for kto (a frozen copy in the step).
        precompute_ref=placeholder(bool),
        chunk_tokens=512,  # log-probs over chunks of ~this many tokens (0: whole logits)
    ))
    c.train.update(dict(steps=200, log_every=10, eval_every=50, eval_batches=4))
    # Real models want lr ~5e-7 (DPO paper); this tiny model from scratch learns at 1e-3.
    c.optim.update(dict(lr=1e-3, warmup_steps=10, weight_decay=0.0))
    c.checkpoint.every = 100
    return c

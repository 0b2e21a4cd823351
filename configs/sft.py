"""Supervised fine-tuning on chat data (`train.sft`, records and templates: `train.chat`).

    python -m train --config configs/sft.py --config.data.paths=data.jsonl \\
        [--config.init_from=runs/imported]

`data.paths`: JSONL files of {"messages": [{"role", "content"}, ...]} or
{"prompt", "completion"} records. From scratch it trains the tiny model below with the
byte tokenizer and the built-in ChatML template; with `init_from` (a
`python -m model.hf import` directory) the checkpoint's architecture, tokenizer and chat
template.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.job = "sft"
    c.workdir = "runs/sft"
    c.model.update(dict(d_model=64, n_layers=2, n_heads=4, ffn_dim=192, max_seq_len=256))
    c.data.update(dict(
        source="chat",  # the sft job reads only JSONL chat records (train/chat.py)
        paths=(),
        tokenizer="",  # "" -> init_from's tokenizer.json, else "byte"
        seq_len=256,
        batch_size=8,
        eval_permille=50,  # held-out records, by a hash of each record
    ))
    # "" -> the template beside the tokenizer (tokenizer_config.json / chat_template.jinja),
    # else the built-in ChatML; "builtin"; or a path (.jinja, tokenizer_config.json, a dir).
    c.data.chat_template = ""
    c.train.update(dict(steps=200, eval_every=50, eval_batches=2))
    c.train.loss = "ce"  # ce | dft (token CE weighted by stop_gradient(p), Wu et al. 2025)
    c.optim.update(dict(lr=3e-4, warmup_steps=10))
    c.checkpoint.every = 100
    return c

"""The supervised fine-tuning job, `run(config)` (`config.job = "sft"`).

The pretraining job (`train.loop.train`: mesh, state from `config.init_from` / scratch /
resume, the jitted train step run by `train.runner.run_steps`, logs, eval, checkpoints)
on chat data (`train.chat.ChatData`: JSONL conversations, the chat template, a loss mask
on the assistant tokens, packed rows). `config.train.loss` is "ce" or "dft"; the logged
`loss` and `eval_loss` (on the held-out records) are the masked token cross-entropy.

    python -m train --config configs/sft.py --config.data.paths=data.jsonl \\
        [--config.init_from=runs/imported]

With `config.init_from` (a `python -m model.hf import` directory) and an empty
`config.data.tokenizer`, the checkpoint's `tokenizer.json` and its chat template
(`tokenizer_config.json`) are used.
"""

from __future__ import annotations

from typing import Any

import jax
from ml_collections import ConfigDict

from train.chat import ChatData
from train.loop import train

__all__ = ["run"]


def run(config: ConfigDict) -> dict[str, Any]:
    """Fine-tunes per `config`; returns the last logged metrics (resumes like pretraining)."""
    return train(config, _chat_data)


def _chat_data(config: ConfigDict, n_eval: int) -> ChatData:
    data = ChatData(config.data, int(config.data.seq_len), int(config.data.batch_size),
                    int(config.seed), jax.process_index(), jax.process_count(),
                    eval_batches=n_eval, init_from=str(config.get("init_from", "") or ""))
    if jax.process_index() == 0:
        print(data.summary())
    return data

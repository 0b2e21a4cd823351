"""Text in, text out: `generate_text` samples continuations of string prompts with the
in-graph sampler (`rl.sampling.sample`) and the byte tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from model import Transformer
from rl.sampling import sample
from train.data import ByteTokenizer


def generate_text(
    model: Transformer,
    variables: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    seed: int = 0,
) -> list[str]:
    """Continuations of `prompts` (UTF-8 bytes as tokens, EOS = 256), each cut at its first
    EOS; invalid UTF-8 is replaced. An empty prompt is given as a lone EOS (the document
    separator of the training data), i.e. "start of a document".

    All prompts run as one batch in one jitted call (right-padded to the longest). Raises
    ValueError when the longest prompt plus `max_new_tokens` exceeds the model's
    `max_seq_len`.
    """
    tok = ByteTokenizer()
    ids = [tok.encode(p) if p else np.asarray([tok.eos_id], np.int32) for p in prompts]
    if not ids:
        return []
    width = max(len(x) for x in ids)
    batch = np.full((len(ids), width), tok.eos_id, np.int32)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = x
    lens = np.asarray([len(x) for x in ids], np.int32)

    @jax.jit
    def run(variables, batch, lens, key):
        out = sample(model, variables, batch, lens, key, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                     eos_id=tok.eos_id)
        return out["completion"], out["completion_mask"]

    completion, mask = jax.device_get(run(variables, batch, lens, jax.random.key(seed)))
    texts = []
    for row, m in zip(completion, mask, strict=True):
        row = row[m.astype(bool)]
        end = np.flatnonzero(row == tok.eos_id)
        texts.append(tok.decode(row[: end[0]] if len(end) else row))
    return texts

"""Text in, text out: `generate_text` samples continuations of string prompts with the
in-graph sampler (`rl.sampling.sample`) and a tokenizer (the byte tokenizer by default);
`load` reads a run's model, checkpoint and config.

    python -m rl.generate --workdir runs/rl_arith --prompt "12+34=" [--temperature 0.7]
    python -m rl.generate --workdir runs/rl_dataset --chat --prompt "What is 6 * 7?"

The command tokenizes with the run's own tokenizer (`config.data.tokenizer`, else its
`init_from` checkpoint's `tokenizer.json`, else bytes). `--chat` sends each prompt as a user
turn through the run's chat template with its generation prompt, and stops at the
template's end-of-turn token too, as the dataset RL task does (`rl.dataset`). Without
`--max-new-tokens` a completion may run to the end of the model's context (`max_seq_len`)
after the longest prompt.
"""

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
    max_new_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    seed: int = 0,
    tokenizer: Any = None,
    stop_ids: Sequence[int] | None = None,
) -> list[str]:
    """Continuations of `prompts` tokenized by `tokenizer` (a `train.tokenizers` tokenizer;
    None: UTF-8 bytes, EOS = 256), each cut at its first stop token (`stop_ids`, default the
    tokenizer's EOS) and decoded (invalid UTF-8 replaced). An empty prompt is given as a
    lone EOS (the document separator of the training data), i.e. "start of a document".

    All prompts run as one batch in one jitted call (right-padded to the longest).
    `max_new_tokens=None`: as many as fit in the model's `max_seq_len` after the longest
    prompt. Raises ValueError (naming the prompt) when a prompt leaves no room for a new
    token, or when the longest prompt plus an explicit `max_new_tokens` exceeds
    `max_seq_len`.
    """
    tok = ByteTokenizer() if tokenizer is None else tokenizer
    stops = tuple(int(i) for i in stop_ids) if stop_ids else (int(tok.eos_id),)
    ids = [np.asarray(tok.encode(p), np.int32) if p else np.asarray([tok.eos_id], np.int32)
           for p in prompts]
    if not ids:
        return []
    width = max(len(x) for x in ids)
    max_new_tokens = _budget(prompts, ids, max_new_tokens, model.cfg.max_seq_len)
    batch = np.full((len(ids), width), tok.eos_id, np.int32)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = x
    lens = np.asarray([len(x) for x in ids], np.int32)

    @jax.jit
    def run(variables, batch, lens, key):
        out = sample(model, variables, batch, lens, key, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                     eos_id=stops)
        return out["completion"], out["completion_mask"]

    completion, mask = jax.device_get(run(variables, batch, lens, jax.random.key(seed)))
    texts = []
    for row, m in zip(completion, mask, strict=True):
        row = row[m.astype(bool)]
        end = np.flatnonzero(np.isin(row, stops))
        texts.append(tok.decode(row[: end[0]] if len(end) else row))
    return texts


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _budget(prompts: Sequence[str], ids: Sequence[np.ndarray], max_new_tokens: int | None,
            max_seq_len: int) -> int:
    """The completion budget: `max_new_tokens`, or (None) what fits after the longest prompt;
    ValueError when a prompt leaves no room or an explicit budget does not fit."""
    lens = [len(x) for x in ids]
    full = [f"{_short(p)} ({n} tokens)" for p, n in zip(prompts, lens, strict=True)
            if n >= max_seq_len]
    if full:
        raise ValueError(f"prompt{'s' if len(full) > 1 else ''} {', '.join(full)} "
                         f"{'leave' if len(full) > 1 else 'leaves'} no room for a new token "
                         f"in the model's max_seq_len={max_seq_len}")
    longest = int(np.argmax(lens))
    room = max_seq_len - lens[longest]
    if max_new_tokens is None:
        return room
    n = int(max_new_tokens)
    if n > room:
        raise ValueError(
            f"the longest prompt {_short(prompts[longest])} ({lens[longest]} tokens) + "
            f"max_new_tokens {n} = {lens[longest] + n} exceeds the model's max_seq_len="
            f"{max_seq_len} (at most {room} new tokens fit)")
    return n


def load(workdir: str, step: int | None = None) -> tuple[Transformer, dict[str, Any]]:
    """The model of a training or RL run's `workdir` (its `config.json`) and the
    variables of its latest checkpoint (RL or pretraining; the warm-up's when RL has not
    saved yet), on the first device. Raises `UserError`."""
    model, variables, _ = load_run(workdir, step)
    return model, variables


def load_run(workdir: str, step: int | None = None) -> tuple[Transformer, dict[str, Any], Any]:
    """`load`, plus the run's config (`ml_collections.ConfigDict`)."""
    import json
    import os

    import flax.linen as nn
    import jax.numpy as jnp
    from ml_collections import ConfigDict

    from train.errors import UserError
    from train.setup import model_config, restore_variables

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"no config.json in --workdir {workdir!r} (not a run directory)")
    with open(path) as f:
        config = ConfigDict(json.load(f))
    model = Transformer(model_config(config))
    abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0),
                                                          jnp.zeros((1, 4), jnp.int32))))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                            abstract)
    variables = restore_variables(workdir, abstract, step)
    return model, {"router_bias": {}, **variables}, config


def main(argv: list[str] | None = None) -> None:
    """`python -m rl.generate --workdir DIR --prompt "12+34=" [--prompt ...]`: prints one
    line per prompt, the prompt followed by its sampled continuation."""
    import argparse

    from train.cli import user_errors
    from train.errors import UserError

    ap = argparse.ArgumentParser(prog="python -m rl.generate", description=main.__doc__)
    ap.add_argument("--workdir", required=True, help="a training or RL run directory")
    ap.add_argument("--prompt", action="append", required=True, help="repeatable")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="default: as many as fit in the model's max_seq_len after the "
                         "longest prompt")
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--chat", action="store_true",
                    help="send each prompt as a user turn through the run's chat template")
    args = ap.parse_args(argv)
    with user_errors():
        from rl.dataset import chat_stop_ids, render_prompt, run_tokenizer
        from train.chat import load_template

        model, variables, config = load_run(args.workdir, args.step)
        tokenizer = run_tokenizer(config)
        prompts, stops = list(args.prompt), None
        if args.chat:
            template = load_template(str(config.data.get("chat_template", "") or ""), tokenizer)
            prompts = [render_prompt(p, template) for p in prompts]
            stops = chat_stop_ids(tokenizer, template)
        try:
            texts = generate_text(model, variables, prompts, tokenizer=tokenizer, stop_ids=stops,
                                  max_new_tokens=args.max_new_tokens,
                                  temperature=max(args.temperature, 1e-6), top_k=args.top_k,
                                  top_p=args.top_p, greedy=args.temperature <= 0, seed=args.seed)
        except ValueError as e:  # a prompt or length the model cannot take
            raise UserError(str(e)) from e
    for p, t in zip(args.prompt, texts, strict=True):
        print(p + t)


if __name__ == "__main__":
    main()

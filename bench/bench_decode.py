"""Decode tokens/s: the in-graph sampler (`rl.sampling.sample`: prefill + `lax.while_loop`
in one jitted program) vs (a) a Python loop calling a jitted one-token decode step with the
same KV cache and (b) Hugging Face transformers `generate()` (PyTorch, CPU) on the same
Llama-architecture model with the same random weights (exported with `model.hf.save`,
loaded from a temporary directory: no downloads).

Prints one JSON object per line: per implementation the median wall time of a full
generation (after a warm-up call that compiles) and tokens/s = batch x new tokens / time;
then the ratios in_graph / python_loop and in_graph / hf, and whether the three greedy
outputs agree (same weights, greedy decoding; near-ties may differ in float32).

    python bench/bench_decode.py                      # tiny: d=128, 3 layers, B=8, 128 tokens
    python bench/bench_decode.py --batch 1 --new-tokens 256 --repeats 5

All three decode greedily for exactly `--new-tokens` tokens (no stop token), after a
`--prompt-len` prompt, on the same device type (the CPU unless JAX finds an accelerator;
the torch side always runs on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from model import ModelConfig, Transformer, init_cache  # noqa: E402
from rl.sampling import sample  # noqa: E402


def _emit(**row):
    print(json.dumps(row), flush=True)


def _time(fn, repeats: int) -> tuple[float, float, object]:
    """(first-call seconds, median seconds of `repeats` further calls, last output)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=320)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true")
    args = ap.parse_args(argv)

    b, p, n = args.batch, args.prompt_len, args.new_tokens
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                      n_heads=args.heads, ffn_dim=args.ffn, max_seq_len=p + n,
                      scale_embeddings=False, init_std=0.05)
    model = Transformer(cfg)
    variables = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    prompts = np.random.default_rng(0).integers(0, 256, (b, p)).astype(np.int32)
    lens = np.full((b,), p, np.int32)
    counts = cfg.param_counts()
    _emit(bench="decode", device=str(jax.devices()[0].platform), jax=jax.__version__,
          params=counts["total"], d_model=cfg.d_model, layers=cfg.n_layers, batch=b,
          prompt_len=p, new_tokens=n, cpu_count=os.cpu_count())

    # In-graph: prefill + while_loop, one program.
    @jax.jit
    def in_graph(v, prompts, lens):
        return sample(model, v, prompts, lens, jax.random.PRNGKey(0), max_new_tokens=n,
                      greedy=True, eos_id=-1, pad_id=0)["completion"]

    first, med, out_graph = _time(lambda: jax.block_until_ready(in_graph(variables, prompts, lens)),
                                  args.repeats)
    tps_graph = b * n / med
    _emit(impl="in_graph", first_call_s=first, median_s=med, tokens_per_s=tps_graph)

    # (a) Python loop over a jitted one-token step, same cache layout.
    @jax.jit
    def prefill(v, prompts):
        pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), prompts.shape)
        (logits, _), upd = model.apply({**v, "cache": init_cache(model, v, b)}, prompts, pos,
                                       decode=True, mutable=["cache"])
        return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), upd["cache"]

    @jax.jit
    def one_token(v, cache, tok, pos):
        (logits, _), upd = model.apply({**v, "cache": cache}, tok[:, None], pos[:, None],
                                       decode=True, mutable=["cache"])
        return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), upd["cache"]

    one_token = jax.jit(one_token.__wrapped__, donate_argnums=1)

    def python_loop():
        tok, cache = prefill(variables, prompts)
        toks = [tok]
        for i in range(1, n):
            pos = jnp.full((b,), p + i - 1, jnp.int32)
            tok, cache = one_token(variables, cache, tok, pos)
            toks.append(tok)
        return jax.block_until_ready(jnp.stack(toks, 1))

    first, med, out_loop = _time(python_loop, args.repeats)
    tps_loop = b * n / med
    _emit(impl="python_loop_jitted_step", first_call_s=first, median_s=med, tokens_per_s=tps_loop)
    agree_loop = float(np.mean(np.asarray(out_loop) == np.asarray(out_graph)))
    result = dict(ratio_in_graph_vs_python_loop=tps_graph / tps_loop,
                  greedy_agreement_python_loop=agree_loop)

    # (b) Hugging Face transformers generate() on the same weights.
    if not args.skip_hf:
        import torch
        import transformers

        from model import hf

        with tempfile.TemporaryDirectory() as d:
            hf.save(d, cfg, variables)
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        hf_model.eval()
        hf_model.generation_config.eos_token_id = None
        ids = torch.from_numpy(prompts.astype(np.int64))
        mask = torch.ones_like(ids)

        def hf_generate():
            with torch.inference_mode():
                return hf_model.generate(ids, attention_mask=mask, max_new_tokens=n,
                                         min_new_tokens=n, do_sample=False, pad_token_id=0,
                                         use_cache=True)[:, p:]

        first, med, out_hf = _time(hf_generate, args.repeats)
        tps_hf = b * n / med
        _emit(impl="hf_generate", first_call_s=first, median_s=med, tokens_per_s=tps_hf,
              transformers=transformers.__version__, torch=torch.__version__,
              model_class=type(hf_model).__name__, torch_threads=torch.get_num_threads())
        result.update(ratio_in_graph_vs_hf=tps_graph / tps_hf,
                      greedy_agreement_hf=float(np.mean(out_hf.numpy() == np.asarray(out_graph))))
    _emit(**result)


if __name__ == "__main__":
    main()

"""Decode speed of the in-graph sampler (`rl.sampling.sample`: prefill + `lax.while_loop` in
one jitted program), with prefill and decode timed separately, against the weight-read floor,
(a) a Python loop calling a jitted one-token decode step with the same KV cache and (b)
Hugging Face transformers `generate()` (PyTorch) on the same Llama-architecture model with
the same random weights (exported with `model.hf.save`, loaded from a temporary directory:
no downloads).

Prints one JSON object per line: the setup (parameter bytes, the weight-read floor = bytes /
`--hbm-gbps`, the time one decode step needs at least to read every weight once); per
implementation the compile time (first call minus a timed call), the median wall time of a
full generation, of the prefill alone (a `max_new_tokens=1` call: prefill + first token),
the per-decode-step time `(full - prefill) / (new_tokens - 1)` from the fastest of the
`--repeats` calls of each (the least disturbed by other work) and its ratio to the floor,
tokens/s = batch x new tokens / full time; then the ratios and whether the greedy outputs
agree (same weights, greedy decoding; near-ties may differ, bf16 more often).

Implementations (`--impls`, comma-separated): `scanned` (the sampler's default: layers
scanned, the per-layer parameters stacked once per call), `unrolled` (`scan_layers=False`:
one compiled block per layer), `python_loop` (tiny default only; a jitted one-token step
called from Python) and `hf` (transformers `generate()`, on CUDA in bfloat16 with a static
cache when torch sees a GPU, else on the CPU in the model's dtype).

    python bench/bench_decode.py                      # tiny: d=128, 3 layers, B=8, 128 tokens
    python bench/bench_decode.py --batch 1 --new-tokens 256 --repeats 5
    python bench/bench_decode.py --preset 1b --dry-run   # shapes, bytes, floor; traces only
    python bench/bench_decode.py --preset 1b             # on a GPU (H200: --hbm-gbps 4800)

`--preset 1b` is the Llama-3.2-1B shape (vocab 128256, d_model 2048, 16 layers, 32 heads,
8 KV heads of 64, SwiGLU 8192, tied embeddings, bfloat16 weights and compute), batch 32,
prompt 128, 128 new tokens, greedy; any flag given explicitly overrides it. Every
implementation decodes greedily for exactly `--new-tokens` tokens (no stop token).
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

TINY = dict(vocab=320, d_model=128, layers=3, heads=4, kv_heads=None, head_dim=None, ffn=384,
            batch=8, prompt_len=16, new_tokens=128, dtype="float32", tie=False,
            impls="scanned,unrolled,python_loop,hf")
PRESETS = {
    "1b": dict(vocab=128256, d_model=2048, layers=16, heads=32, kv_heads=8, head_dim=64,
               ffn=8192, batch=32, prompt_len=128, new_tokens=128, dtype="bfloat16", tie=True,
               rope_theta=500000.0, impls="scanned,unrolled,hf"),
}


def _emit(**row):
    print(json.dumps(row), flush=True)


def _time(fn, repeats: int) -> tuple[float, float, object, float]:
    """(first-call seconds, median seconds of `repeats` further calls, last output, the
    fastest of those calls)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out, min(times)


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None)
    for name, typ in [("d-model", int), ("layers", int), ("heads", int), ("kv-heads", int),
                      ("head-dim", int), ("ffn", int), ("vocab", int), ("batch", int),
                      ("prompt-len", int), ("new-tokens", int), ("dtype", str), ("impls", str)]:
        ap.add_argument(f"--{name}", type=typ, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hbm-gbps", type=float, default=4800.0,
                    help="memory bandwidth for the weight-read floor, GB/s (H200: 4800)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--dry-run", action="store_true",
                    help="shapes, bytes and the floor, and trace the samplers; run nothing")
    args = ap.parse_args(argv)
    base = {**TINY, **(PRESETS[args.preset] if args.preset else {})}
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.rope_theta = base.get("rope_theta", 10000.0)
    return args


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    b, p, n = args.batch, args.prompt_len, args.new_tokens
    impls = [x for x in args.impls.split(",") if x and not (x == "hf" and args.skip_hf)]
    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                      n_heads=args.heads, n_kv_heads=args.kv_heads, head_dim=args.head_dim,
                      ffn_dim=args.ffn, max_seq_len=p + n, scale_embeddings=False,
                      init_std=0.05 if args.preset is None else 0.02,
                      tie_embeddings=args.tie, dtype=args.dtype, param_dtype=args.dtype,
                      rope_theta=args.rope_theta)
    model = Transformer(cfg)
    init = lambda: nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))  # noqa: E731
    abstract = jax.eval_shape(init)
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract["params"]))
    cache_bytes = sum(x.size * x.dtype.itemsize
                      for x in jax.tree.leaves(jax.eval_shape(lambda v: init_cache(model, v, b), abstract)))
    floor = param_bytes / (args.hbm_gbps * 1e9)
    platform = jax.devices()[0].platform
    _emit(bench="decode", preset=args.preset, device=platform,
          device_kind=jax.devices()[0].device_kind, jax=jax.__version__,
          params=cfg.param_counts()["total"], param_bytes=param_bytes, cache_bytes=cache_bytes,
          dtype=cfg.dtype, d_model=cfg.d_model, layers=cfg.n_layers, batch=b, prompt_len=p,
          new_tokens=n, hbm_gbps=args.hbm_gbps, weight_read_floor_ms=floor * 1e3,
          cpu_count=os.cpu_count(), impls=impls)

    def sampler(scan: bool, steps: int):
        return jax.jit(lambda v, prompts, lens: sample(
            model, v, prompts, lens, jax.random.PRNGKey(0), max_new_tokens=steps, greedy=True,
            eos_id=-1, pad_id=0, scan_layers=scan)["completion"])

    prompts_np = np.random.default_rng(0).integers(0, min(cfg.vocab_size, 32000), (b, p))
    prompts = jnp.asarray(prompts_np, jnp.int32)
    lens = jnp.full((b,), p, jnp.int32)
    if args.dry_run:
        for impl in [x for x in impls if x in ("scanned", "unrolled")]:
            for steps in (1, n):
                t0 = time.perf_counter()
                sampler(impl == "scanned", steps).lower(abstract, prompts, lens)
                _emit(impl=impl, dry_run=True, max_new_tokens=steps,
                      trace_s=time.perf_counter() - t0)
        return
    variables = jax.jit(init)()
    results, outs = {}, {}

    for impl in [x for x in impls if x in ("scanned", "unrolled")]:
        full, prefill = sampler(impl == "scanned", n), sampler(impl == "scanned", 1)
        first, med, out, best = _time(
            lambda f=full: jax.block_until_ready(f(variables, prompts, lens)), args.repeats)
        p_first, p_med, _, p_best = _time(
            lambda f=prefill: jax.block_until_ready(f(variables, prompts, lens)), args.repeats)
        # per decode step from the fastest calls: the least disturbed by other work (medians
        # of tiny, noisy timings can even order the wrong way)
        step = max(best - p_best, 0.0) / max(n - 1, 1)
        results[impl], outs[impl] = b * n / med, np.asarray(out)
        _emit(impl=impl, compile_s=first - med, prefill_compile_s=p_first - p_med,
              median_s=med, prefill_s=p_med, decode_step_ms=step * 1e3,
              decode_step_over_floor=step / floor, tokens_per_s=b * n / med)

    if "python_loop" in impls:  # a jitted one-token step called from Python, same cache
        @jax.jit
        def prefill_step(v, prompts):
            pos = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), prompts.shape)
            (logits, _), upd = model.apply({**v, "cache": init_cache(model, v, b)}, prompts,
                                           pos, decode=True, mutable=["cache"])
            return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), upd["cache"]

        def step_fn(v, cache, tok, pos):
            (logits, _), upd = model.apply({**v, "cache": cache}, tok[:, None], pos[:, None],
                                           decode=True, mutable=["cache"])
            return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), upd["cache"]

        one_token = jax.jit(step_fn, donate_argnums=1)

        def python_loop():
            tok, cache = prefill_step(variables, prompts)
            toks = [tok]
            for i in range(1, n):
                pos = jnp.full((b,), p + i - 1, jnp.int32)
                tok, cache = one_token(variables, cache, tok, pos)
                toks.append(tok)
            return jax.block_until_ready(jnp.stack(toks, 1))

        first, med, out, _ = _time(python_loop, args.repeats)
        results["python_loop"], outs["python_loop"] = b * n / med, np.asarray(out)
        _emit(impl="python_loop_jitted_step", first_call_s=first, median_s=med,
              tokens_per_s=b * n / med)

    if "hf" in impls:  # transformers generate() on the same weights
        import torch
        import transformers

        from model import hf

        cuda = torch.cuda.is_available()
        tdtype = torch.bfloat16 if (cuda or cfg.dtype == "bfloat16") else torch.float32
        with tempfile.TemporaryDirectory() as d:
            hf.save(d, cfg, variables)
            hf_model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=tdtype)
        device = torch.device("cuda" if cuda else "cpu")
        hf_model = hf_model.to(device).eval()
        hf_model.generation_config.eos_token_id = None
        ids = torch.from_numpy(prompts_np.astype(np.int64)).to(device)
        mask = torch.ones_like(ids)
        extra = {"cache_implementation": "static"} if cuda else {}

        def hf_generate():
            with torch.inference_mode():
                out = hf_model.generate(ids, attention_mask=mask, max_new_tokens=n,
                                        min_new_tokens=n, do_sample=False, pad_token_id=0,
                                        use_cache=True, **extra)[:, p:]
            if cuda:
                torch.cuda.synchronize()
            return out

        first, med, out, _ = _time(hf_generate, args.repeats)
        results["hf"], outs["hf"] = b * n / med, out.cpu().numpy()
        _emit(impl="hf_generate", device=str(device), dtype=str(tdtype), first_call_s=first,
              median_s=med, tokens_per_s=b * n / med, transformers=transformers.__version__,
              torch=torch.__version__, model_class=type(hf_model).__name__,
              cache=extra.get("cache_implementation", "dynamic"),
              torch_threads=torch.get_num_threads())

    summary = {}
    ref = "scanned" if "scanned" in results else next(iter(results), None)
    for impl in results:
        if impl != ref:
            summary[f"ratio_{ref}_vs_{impl}"] = results[ref] / results[impl]
            summary[f"greedy_agreement_{impl}"] = float(np.mean(outs[impl] == outs[ref]))
    _emit(**summary)


if __name__ == "__main__":
    main()

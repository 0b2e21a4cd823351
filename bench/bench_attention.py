"""Training attention backends alone: forward + backward of causal attention per backend and
sequence length, with the choice `auto` makes.

Each backend runs `jax.grad` (with the value) of a weighted sum of the attention output,
`sum(out * w)` with a fixed random `w [same shape]`, with respect to q, k and v:

  explicit          `model.attention.attend` with `attn_impl="explicit"` ([T, T] scores).
  flash/B           `model.flash_attention.flash_attention` with block B (what `attend`
                    runs for "flash", where B is `default_block()`: 128 on a CPU, 512 else).
  cudnn             `attend` with `attn_impl="cudnn"`, no max-logit statistic.
  cudnn+max_logits  the same with `attn_max_logits=True` (the blockwise side pass QK-clip
                    needs); both only where cuDNN can run the case (an NVIDIA GPU, bf16).

Prints one JSON object per line:

- `env`: backend, device, cores, load average, shapes, dtype.
- `attention` (per length and backend): median seconds over `--rounds` calls after one
  warm-up call, compile seconds, the compiled call's temp bytes
  (`memory_analysis().temp_size_in_bytes`), and the max abs difference from explicit of
  the output, of the gradients (dq, dk, dv) and of the per-head max logits (null above
  `--max-explicit-len`, where explicit is not run). A case that cannot run here has
  `skipped` (the reason); one that runs out of memory has `error: "out of memory ..."`.
- `auto` (per length): `choose_backend(cfg, T).describe()` for `attn_impl="auto"`.
- `end`: load average.

    python bench/bench_attention.py                  # CPU: T 256..4096, batch 2, 8 / 2 heads, d 64, f32
    python bench/bench_attention.py --preset 1b      # GPU: batch 8, 32 / 8 heads, d 64, T 2048..8192, bf16
    python bench/bench_attention.py --lengths 512,1024 --blocks 64,128 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_train import emit, is_oom, oom_line  # noqa: E402

from model import ModelConfig  # noqa: E402
from model.attention import attend, choose_backend  # noqa: E402
from model.flash_attention import default_block, flash_attention  # noqa: E402

# name: (batch, heads, kv_heads, head_dim, lengths, dtype, max explicit length)
SHAPES: dict[str, tuple[int, int, int, int, tuple[int, ...], str, int]] = {
    "cpu": (2, 8, 2, 64, (256, 512, 1024, 2048, 4096), "float32", 4096),
    "1b": (8, 32, 8, 64, (2048, 4096, 8192), "bfloat16", 4096),  # Llama-3.2-1B attention
}


def make_inputs(b: int, t: int, heads: int, kv: int, d: int, dtype: str, seed: int = 0):
    """q `[b, t, kv, heads/kv, d]`, k, v `[b, t, kv, d]` and the output weights `w`."""
    rng = np.random.default_rng(seed)
    g = heads // kv
    arr = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    return arr(b, t, kv, g, d), arr(b, t, kv, d), arr(b, t, kv, d), arr(b, t, kv, g, d)


def fwd_bwd(attn: Callable, w: jax.Array):
    """`(q, k, v) -> ((loss, (out, max_logits)), (dq, dk, dv))`, loss = sum(out * w)."""

    def loss(q, k, v):
        out, ml = attn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * w.astype(jnp.float32)), (out, ml)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def host(res) -> dict[str, Any]:
    (_, (out, ml)), grads = res
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    return {"out": f32(out), "ml": f32(ml).reshape(-1), "grads": [f32(g) for g in grads]}


def diffs(got: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    """Max abs differences from the explicit reference (None without one)."""
    if ref is None:
        return dict(max_abs_diff_out=None, max_abs_diff_grad=None, max_abs_diff_max_logits=None)
    ml = None
    if np.all(np.isfinite(got["ml"])):
        ml = float(np.max(np.abs(got["ml"] - ref["ml"])))
    return dict(
        max_abs_diff_out=float(np.max(np.abs(got["out"] - ref["out"]))),
        max_abs_diff_grad=max(float(np.max(np.abs(a - b)))
                              for a, b in zip(got["grads"], ref["grads"], strict=True)),
        max_abs_diff_max_logits=ml,
    )


def run_case(fn, inputs, rounds: int) -> tuple[dict[str, Any], Any]:
    """Compiles, runs once, times `rounds` calls: (figures, the last result)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*inputs).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    res = jax.block_until_ready(compiled(*inputs))
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        res = jax.block_until_ready(compiled(*inputs))
        ts.append(time.perf_counter() - t0)
    return dict(
        s_median=round(statistics.median(ts), 4), s=[round(x, 4) for x in ts],
        compile_s=round(compile_s, 2),
        temp_bytes=None if mem is None else int(mem.temp_size_in_bytes),
    ), res


def backends(cfg: ModelConfig, t: int, blocks: list[int], max_explicit: int):
    """`(name, block, attention fn or the reason it is skipped)` for length `t`."""
    scale = cfg.attn_head_dim ** -0.5
    out: list[tuple[str, int | None, Any]] = []
    if t <= max_explicit:
        e = cfg.replace(attn_impl="explicit")
        out.append(("explicit", None, lambda q, k, v: attend(e, q, k, v, None, scale)))
    else:
        out.append(("explicit", None, f"T={t} > --max-explicit-len {max_explicit}"))
    for blk in blocks:
        out.append((f"flash/{blk}", blk,
                    lambda q, k, v, blk=blk: flash_attention(q, k, v, None, scale, block=blk)))
    for name, want in (("cudnn", False), ("cudnn+max_logits", True)):
        c = cfg.replace(attn_impl="cudnn", attn_max_logits=want)
        try:
            choose_backend(c, t)
        except ValueError as err:
            out.append((name, None, str(err)))
            continue
        out.append((name, None, lambda q, k, v, c=c: attend(c, q, k, v, None, scale)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(SHAPES), default="cpu",
                        help="shapes: cpu (default) or 1b (the Llama-3.2-1B attention, for a GPU)")
    parser.add_argument("--lengths", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--blocks", default=None,
                        help="flash block sizes (default: this platform's default_block(), 128, 512)")
    parser.add_argument("--max-explicit-len", type=int, default=None,
                        help="run explicit (the reference) only up to this length")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per case")
    args = parser.parse_args()
    b, heads, kv, d, lengths, dtype, max_explicit = SHAPES[args.preset]
    b = args.batch or b
    dtype = args.dtype or dtype
    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else list(lengths)
    max_explicit = args.max_explicit_len or max_explicit
    blocks = ([int(x) for x in args.blocks.split(",")] if args.blocks
              else list(dict.fromkeys([default_block(), 128, 512])))
    cfg = ModelConfig(d_model=heads * d, n_heads=heads, n_kv_heads=kv, head_dim=d,
                      max_seq_len=max(lengths), dtype=dtype)
    dev = jax.devices()[0]
    emit(bench="env", backend=jax.default_backend(), device=dev.device_kind,
         cpu_count=os.cpu_count(), loadavg=list(os.getloadavg()), jax=jax.__version__,
         preset=args.preset, batch=b, heads=heads, kv_heads=kv, head_dim=d, dtype=dtype,
         lengths=lengths, blocks=blocks, default_block=default_block(), rounds=args.rounds)
    for t in lengths:
        q, k, v, w = make_inputs(b, t, heads, kv, d, dtype)
        ref = None
        for name, block, fn in backends(cfg, t, blocks, max_explicit):
            head = dict(bench="attention", T=t, impl=name, block=block)
            if isinstance(fn, str):
                emit(**head, skipped=fn)
                continue
            try:
                figs, res = run_case(fwd_bwd(fn, w), (q, k, v), args.rounds)
            except Exception as e:
                if not is_oom(e):
                    raise
                emit(**head, error=oom_line(e))
                continue
            got = host(res)
            if name == "explicit":
                ref = got
            emit(**head, **figs, **diffs(got, None if name == "explicit" else ref))
            del res, got
        emit(bench="auto", T=t, choice=choose_backend(cfg, t).describe())
    emit(bench="end", loadavg=list(os.getloadavg()))


if __name__ == "__main__":
    main()

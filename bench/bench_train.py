"""Train-step throughput and MFU: ours (JAX) vs Hugging Face transformers (PyTorch) on the
same configuration, in the same run, on the same machine.

Prints one JSON object per line:

- `env`: backend, device, core count, load average, library versions.
- `train_step` (one per config and implementation): median step time over interleaved
  rounds, tokens/s, model FLOPs/token (`train.flops.flops_per_token`, the documented
  6N + attention formula), MFU = tokens/s * FLOPs/token / the dense matmul peak (`--dtype`)
  (the kernel of `train.flops.measure_peak`) measured right before each round (the
  per-round MFUs' median); `mfu_cpu_time`, the same ratio per process CPU second (less
  sensitive to other processes' load, but blind to idle cores), peak memory (JAX: the
  compiled step's argument + output + temp bytes; both: the process's peak RSS growth
  over build + first steps, from /proc VmHWM).
- `train_ratio`: ours / transformers tokens per second (rounds interleaved, so a change
  in the machine's load hits both sides alike).
- `moe_dispatch`: the MLA+MoE train step with each `ModelConfig.moe_dispatch`
  (`capacity`: the capacity buffer; `dense`: every token through every expert, one-hot
  gates; `dropless`: sort by expert + grouped matmul over row blocks), where supported.
- `cross_entropy`: full-logits vs chunked cross-entropy (value and gradient) for a large
  vocabulary: time and compiled temp memory.

    python bench/bench_train.py            # dense ~35M + MLA/MoE ~90M, a few minutes on 2 cores
    python bench/bench_train.py --quick    # tiny configs, a smoke run (seconds)
    python bench/bench_train.py --only dense --rounds 5 --no-hf
    python bench/bench_train.py --dtype bfloat16   # mixed precision on both sides

Every JAX line names the attention backend (`model.attention.choose_backend(cfg,
seq).describe()`); `--attn-impl` forces one (`ModelConfig.attn_impl`, default auto) and
`--remat` sets `ModelConfig.remat` for every JAX run.

Accelerator presets (`--preset`; bf16 compute, float32 parameters and AdamW state,
`scan_layers=True`, batch 8 x 2048 tokens, one device):

- `1b`: the Llama-3.2-1B dense shape (d_model 2048, 16 layers, 32 heads, 8 KV heads,
  SwiGLU 8192, vocab 128256, tied embeddings, rope_theta 5e5, no embedding scaling).
- `moe-1b`: MLA + MoE (d_model 1024, 12 layers, the first dense with ffn 4096; 16 heads,
  kv_lora_rank 256, qk_nope 64, qk_rope 32, v 64, q_lora_rank 0; 64 routed experts top-6 +
  1 shared, expert ffn 512, dropless dispatch; vocab 32000).

Each runs the transformers peer first (CUDA when torch sees a GPU: sdpa attention, bf16
autocast, `torch.optim.AdamW(fused=True)`; else the CPU), then our step without and with
QK-clip (`attn_max_logits=True` and `train.qkclip.make_qk_clip_hook(cfg, tau=100)` as the
post-update hook), each built, timed and freed in turn. Per line: `mfu` against a matmul of
the compute dtype measured before each round (`--peak-n`, 8192 on an accelerator),
`mfu_table` against the device's table peak (`train.flops.peak_flops`: H100/H200 989
TFLOP/s bf16 dense; null on a CPU), `compile_s`, `compiled_bytes`, `device_peak_bytes`
(JAX: `memory_stats()['peak_bytes_in_use']`, the process's high-water mark so far, so the
QK-clip line covers both variants; transformers: `torch.cuda.max_memory_allocated`), the
attention backend. A variant that runs out of memory is a line with `"error": "out of
memory ..."` and the run goes on. JAX's GPU memory is not preallocated in this mode
(`XLA_PYTHON_CLIENT_PREALLOCATE=false`) so that the two frameworks share the device.

    python bench/bench_train.py --preset 1b                 # on an H200: the dense 1B, QK-clip off/on
    python bench/bench_train.py --preset moe-1b             # on an H200: MLA + MoE, QK-clip off/on
    python bench/bench_train.py --preset 1b --qk-clip off   # only one variant (off | on)
    python bench/bench_train.py --preset 1b --remat full    # if the no-remat step does not fit
    python bench/bench_train.py --preset 1b --attn-impl flash   # force a backend (auto: cuDNN)
    python bench/bench_train.py --preset moe-1b --quick     # shrunk, a CPU smoke run (seconds)

`--dtype bfloat16` computes in bfloat16 with float32 parameters and optimizer state on
both sides (ours: `ModelConfig.dtype`; transformers: `torch.autocast("cpu", bfloat16)`),
and the peak probe becomes a bfloat16 x bfloat16 -> float32 matmul.

The JAX step is `train.step.make_train_step` with `optax.adamw` (the trainer's step);
the transformers step is `model(input_ids).logits` -> `F.cross_entropy` -> backward ->
`torch.optim.AdamW.step()`, on `LlamaForCausalLM` / `DeepseekV3ForCausalLM` built from
`model.hf.convert.config_to_hf` of the same `ModelConfig` (random init, float32).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from model import ModelConfig, Transformer  # noqa: E402
from model.attention import choose_backend  # noqa: E402
from train.flops import flops_per_token, matmul_probe, peak_flops, time_probe  # noqa: E402
from train.qkclip import make_qk_clip_hook  # noqa: E402
from train.step import StepOptions, TrainState, make_train_step  # noqa: E402

LR, BETAS, WD = 1e-4, (0.9, 0.95), 0.1

# Llama-style dense (~35M parameters) and DeepSeek-V3-style MLA + MoE (~90M total, ~30M
# active; dropless dispatch, see `--dispatch` for the others). scale_embeddings is off:
# Llama and DeepseekV3 do not scale the embeddings.
CONFIGS: dict[str, ModelConfig] = {
    "dense": ModelConfig(
        vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, ffn_dim=1536,
        max_seq_len=256, scale_embeddings=False,
    ),
    "mla_moe": ModelConfig(
        vocab_size=8192, d_model=512, n_layers=8, n_heads=8, max_seq_len=256,
        attention="mla", q_lora_rank=0, kv_lora_rank=128, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, ffn_dim=1536, first_k_dense=1,
        n_routed_experts=16, n_shared_experts=1, top_k=2, moe_ffn_dim=384,
        scale_embeddings=False, moe_dispatch="dropless",
    ),
}
QUICK: dict[str, ModelConfig] = {
    "dense": ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_dim=128, max_seq_len=32, scale_embeddings=False),
    "mla_moe": ModelConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=32, attention="mla",
        q_lora_rank=0, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, ffn_dim=128, first_k_dense=1, n_routed_experts=4, n_shared_experts=1,
        top_k=2, moe_ffn_dim=32, scale_embeddings=False, moe_dispatch="dropless",
    ),
}

# Accelerator presets (`--preset`): bf16 compute, float32 parameters and AdamW state,
# scanned layers, batch 8 x 2048 tokens.
PRESETS: dict[str, ModelConfig] = {
    # The Llama-3.2-1B dense shape (its RoPE scaling left out: it does not change the cost).
    "1b": ModelConfig(
        vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
        max_seq_len=2048, tie_embeddings=True, rope_theta=5e5, scale_embeddings=False,
        norm_eps=1e-5, scan_layers=True, dtype="bfloat16", param_dtype="float32",
    ),
    # DeepSeek-V3-style MLA + MoE, ~1B total parameters.
    "moe-1b": ModelConfig(
        vocab_size=32000, d_model=1024, n_layers=12, n_heads=16, max_seq_len=2048,
        attention="mla", q_lora_rank=0, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, ffn_dim=4096, first_k_dense=1,
        n_routed_experts=64, n_shared_experts=1, top_k=6, moe_ffn_dim=512,
        scale_embeddings=False, moe_dispatch="dropless", scan_layers=True,
        dtype="bfloat16", param_dtype="float32",
    ),
}
PRESET_BATCH, PRESET_SEQ = 8, 2048
# `--preset X --quick`: the same structure (scan, tied head / MLA + MoE with a dense first
# layer, bf16 compute), shrunk for a CPU smoke run.
QUICK_PRESETS: dict[str, ModelConfig] = {
    "1b": PRESETS["1b"].replace(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                                n_kv_heads=2, ffn_dim=128, max_seq_len=32),
    "moe-1b": PRESETS["moe-1b"].replace(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, ffn_dim=128,
        n_routed_experts=4, top_k=2, moe_ffn_dim=32),
}
QUICK_PRESET_BATCH, QUICK_PRESET_SEQ = 2, 32
QK_CLIP_TAU = 100.0


# --quick: XLA's backend optimizations off (compiles about twice as fast; a smoke run).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def emit(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


# ---------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakRSS:
    """Peak resident-set growth of this process over a `with` block (Linux: resets the
    high-water mark through /proc/self/clear_refs, then reads VmHWM). None elsewhere."""

    def __enter__(self) -> PeakRSS:
        self.bytes: int | None = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = _status_kb("VmRSS")
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.start is not None:
            self.bytes = max(0, _status_kb("VmHWM") - self.start) * 1024


def is_oom(e: BaseException) -> bool:
    """Whether `e` is an out-of-memory error (XLA's RESOURCE_EXHAUSTED, torch's CUDA OOM)."""
    text = f"{type(e).__name__}: {e}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OutOfMemory" in text


def oom_line(e: BaseException) -> str:
    """`"out of memory: <the error's first line>"` for the JSON `error` field."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"out of memory: {first[:300]}"


def jax_device_peak() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------------------- JAX step


def make_batch(cfg: ModelConfig, batch: int, seq: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, size=(batch, seq + 1)).astype(np.int32)


class JaxRunner:
    """Our train step (AdamW) on `cfg`; `step()` runs one step to completion."""

    name = "jax"

    def __init__(
        self, cfg: ModelConfig, tokens: np.ndarray, options: StepOptions, fast_compile: bool = False,
        post_update: Callable[[Any, dict[str, jax.Array]], tuple[Any, dict]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.backend = choose_backend(cfg, tokens.shape[1] - 1)
        model = Transformer(cfg)
        tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], weight_decay=WD)
        b, t1 = tokens.shape
        opts = FAST_COMPILE if fast_compile else None
        init = jax.jit(lambda k: nn.unbox(model.init(k, jnp.zeros((1, t1 - 1), jnp.int32))),
                       compiler_options=opts)
        v = init(jax.random.key(0))
        params = v["params"]
        self.state = TrainState(
            step=jnp.zeros((), jnp.int32), params=params,
            opt_state=jax.jit(tx.init, compiler_options=opts)(params),
            router_bias=v.get("router_bias", {}), rng=jax.random.key(1),
            bad_steps=jnp.zeros((), jnp.int32),
        )
        self.batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
        self.n_params = sum(x.size for x in jax.tree.leaves(params))
        t0 = time.perf_counter()
        self.fn = jax.jit(make_train_step(model, tx, options=options, post_update=post_update),
                          donate_argnums=0,
                          compiler_options=opts)
        compiled = self.fn.lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        self.compiled_bytes = None
        if mem is not None:
            self.compiled_bytes = int(
                mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes
            )
        self.loss = None

    def step(self) -> None:
        self.state, m = self.fn(self.state, self.batch)
        self.loss = float(m["loss"])  # blocks until the step is done


# ---------------------------------------------------------------------------- torch step


class TorchRunner:
    """The transformers model of the same config: forward, cross-entropy, backward, AdamW.
    On CUDA when torch sees a GPU (sdpa attention, `torch.optim.AdamW(fused=True)`), else
    on the CPU."""

    name = "transformers"

    def __init__(
        self, cfg: ModelConfig, tokens: np.ndarray, threads: int | None, dtype: str = "float32"
    ) -> None:
        import torch
        import transformers

        from model.hf.convert import config_to_hf

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        cuda = self.device == "cuda"
        # Mixed precision as torch users run it: float32 weights, bfloat16 autocast compute.
        self.autocast = (
            (lambda: torch.autocast(self.device, dtype=torch.bfloat16)) if dtype == "bfloat16"
            else contextlib.nullcontext
        )
        hf = config_to_hf(cfg, "float32")
        hf.pop("torch_dtype", None)
        hf.pop("architectures", None)
        hf_cfg = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
        torch.manual_seed(0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        extra = {"attn_implementation": "sdpa"} if cuda else {}
        self.model = transformers.AutoModelForCausalLM.from_config(
            hf_cfg, dtype=torch.float32, **extra).to(self.device)
        self.model.train()
        self.arch = type(self.model).__name__
        self.attn_impl = getattr(self.model.config, "_attn_implementation", None)
        self.experts_impl = getattr(self.model.config, "_experts_implementation", None)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=BETAS, weight_decay=WD,
                                     **({"fused": True} if cuda else {}))
        t = torch.from_numpy(tokens.astype(np.int64)).to(self.device)
        self.inputs, self.targets = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        self.loss = None

    def step(self) -> None:
        torch = self.torch
        with self.autocast():
            logits = self.model(input_ids=self.inputs, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), self.targets.reshape(-1)
            )
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = float(loss.detach())  # blocks until the step is done (CUDA too)

    def device_peak(self) -> int | None:
        """CUDA: the peak bytes torch allocated since the runner was built."""
        return int(self.torch.cuda.max_memory_allocated()) if self.device == "cuda" else None

    def close(self) -> None:
        """Frees the model and optimizer (CUDA: returns the cached blocks to the device)."""
        del self.model, self.opt, self.inputs, self.targets
        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


# ---------------------------------------------------------------------------- timing


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of `fn()`."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


_PROBES: dict[tuple[int, str], Callable[[], None]] = {}


def probe_peak(n: int, seconds: float, dtype: str = "float32") -> tuple[float, float]:
    """`train.flops.measure_peak` (a jitted `n x n` matmul in `dtype`, float32 result,
    repeated for `seconds`) compiled once per size, as (FLOP per wall second, FLOP per
    process CPU second)."""
    if (n, dtype) not in _PROBES:
        _PROBES[n, dtype] = matmul_probe(n, dtype)
    return time_probe(_PROBES[n, dtype], n, seconds)


def run_config(
    name: str, cfg: ModelConfig, args: argparse.Namespace, options: StepOptions,
    with_hf: bool, variants: dict[str, ModelConfig] | None = None,
) -> dict[str, float]:
    """Builds the runners (ours on `cfg`, or on each of `variants`; transformers if
    `with_hf`), runs each once (compile, allocations) and `args.warmup` more times
    (untimed), then `args.rounds` interleaved rounds
    of (peak probe, one step of each runner). Emits one `train_step` line per runner and
    returns tokens/s per runner."""
    variants = variants or {"jax": cfg}
    tokens = make_batch(cfg, args.batch, args.seq, seed=0)
    fpt = flops_per_token(cfg, args.seq)
    n_tok = args.batch * args.seq
    runners: dict[str, Any] = {}
    memory: dict[str, int | None] = {}
    first: dict[str, float] = {}
    for impl, vcfg in variants.items():
        gc.collect()
        with PeakRSS() as pk:
            runners[impl] = JaxRunner(vcfg, tokens, options, fast_compile=args.quick)
            first[impl] = timed(runners[impl].step)[0]  # first run after compile
        memory[impl] = pk.bytes
    if with_hf:
        gc.collect()
        with PeakRSS() as pk:
            runners["transformers"] = TorchRunner(cfg, tokens, args.torch_threads, args.dtype)
            first["transformers"] = timed(runners["transformers"].step)[0]
        memory["transformers"] = pk.bytes
    times: dict[str, list[float]] = {k: [] for k in runners}
    mfus: dict[str, list[float]] = {k: [] for k in runners}
    mfus_cpu: dict[str, list[float]] = {k: [] for k in runners}
    peaks: list[float] = []
    for _ in range(args.warmup):  # untimed: the first steps after compile run slower
        for k in runners:
            runners[k].step()
    for i in range(args.rounds):
        peak, peak_cpu = probe_peak(args.peak_n, args.peak_s, args.dtype)
        peaks.append(peak)
        order = list(runners) if i % 2 == 0 else list(runners)[::-1]
        for k in order:
            dt, cpu = timed(runners[k].step)
            times[k].append(dt)
            mfus[k].append(n_tok * fpt / dt / peak)
            mfus_cpu[k].append(n_tok * fpt / max(cpu, 1e-9) / peak_cpu)
    tps: dict[str, float] = {}
    for k, r in runners.items():
        med = statistics.median(times[k])
        tps[k] = n_tok / med
        line: dict[str, Any] = dict(
            bench="train_step", config=name, impl=r.name, params=int(r.n_params),
            params_active=cfg.param_counts()["active"], batch=args.batch, seq=args.seq,
            tokens_per_step=n_tok, step_s_median=round(med, 4),
            step_s=[round(x, 4) for x in times[k]], first_step_s=round(first[k], 3),
            tokens_per_s=round(tps[k], 1), model_flops_per_token=fpt,
            model_tflops_per_s=round(tps[k] * fpt / 1e12, 5),
            mfu=round(statistics.median(mfus[k]), 4),
            mfu_rounds=[round(x, 3) for x in mfus[k]],
            mfu_cpu_time=round(statistics.median(mfus_cpu[k]), 4),
            peak_flops_median=round(statistics.median(peaks), 1),
            peak_rss_growth_bytes=memory[k], loss=r.loss, dtype=args.dtype,
        )
        if r.name == "jax":
            line.update(compile_s=round(r.compile_s, 2), compiled_bytes=r.compiled_bytes,
                        device_peak_bytes=jax_device_peak(), attention=r.cfg.attention,
                        attention_backend=r.backend.describe(),
                        moe_dispatch=getattr(r.cfg, "moe_dispatch", "capacity") if r.cfg.is_moe else None)
        else:
            line.update(arch=r.arch, device=r.device, attn_implementation=r.attn_impl,
                        experts_implementation=r.experts_impl,
                        torch_threads=r.torch.get_num_threads())
        emit(**line)
    del runners
    gc.collect()
    return tps


def dispatch_compare(cfg: ModelConfig, args: argparse.Namespace, options: StepOptions) -> None:
    """Our MLA+MoE step with each dispatch, interleaved in the same rounds."""
    modes = [cfg.moe_dispatch] + [m for m in args.dispatch.split(",") if m != cfg.moe_dispatch]
    tps = run_config("mla_moe", cfg, args, options, with_hf=False,
                     variants={m: cfg.replace(moe_dispatch=m) for m in modes})
    emit(bench="moe_dispatch", config="mla_moe", tokens_per_s={m: round(v, 1) for m, v in tps.items()},
         reference=modes[0],
         reference_speedup={m: round(tps[modes[0]] / v, 3) for m, v in tps.items()})


def cross_entropy_compare(args: argparse.Namespace) -> None:
    """Loss + gradient w.r.t. hidden states and head weights, full logits vs chunked."""
    try:
        from train.step import chunked_cross_entropy, cross_entropy
    except ImportError:
        emit(bench="cross_entropy", skipped="train.step has no chunked_cross_entropy")
        return
    n, d, v = args.ce_tokens, args.ce_d, args.ce_vocab
    rows = args.batch
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((rows, n // rows, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, v)) * 0.02, jnp.float32)
    tgt = jnp.asarray(rng.integers(0, v, (rows, n // rows)), jnp.int32)

    def full(h, w):
        return cross_entropy(jnp.einsum("btd,dv->btv", h, w), tgt)[0]

    variants = [("full", full)]
    for c in args.ce_chunks:
        variants.append((f"chunked/{c}",
                         lambda h, w, c=c: chunked_cross_entropy(h, w, tgt, chunk_tokens=c)[0]))
    out = {}
    for name, f in variants:
        g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
        c = g.lower(h, w).compile()
        mem = c.memory_analysis()
        jax.block_until_ready(c(h, w))
        ts = []
        for _ in range(args.rounds):
            ts.append(timed(lambda c=c: jax.block_until_ready(c(h, w)))[0])
        out[name] = float(c(h, w)[0])
        emit(bench="cross_entropy", impl=name, tokens=n, d_model=d, vocab=v,
             s_median=round(statistics.median(ts), 4),
             temp_bytes=None if mem is None else int(mem.temp_size_in_bytes),
             full_logits_bytes=n * v * 4, loss=out[name])


# ---------------------------------------------------------------------------- presets


def table_peak() -> tuple[float | None, str]:
    """The dense bf16 peak FLOP/s of one device from `train.flops.peak_flops`' table (the
    step runs on one device); None on a CPU, which has no table entry (the measured matmul
    is then the only reference)."""
    if jax.devices()[0].platform == "cpu":
        return None, "no table peak for a CPU"
    total, how = peak_flops("bfloat16")
    if "table" in how:
        return total / jax.device_count(), f"{jax.devices()[0].device_kind} table bf16 peak"
    return total, how


def time_runner(runner: Any, args: argparse.Namespace, n_tok: int, fpt: float,
                dtype: str) -> dict[str, Any]:
    """One step (compile, allocations), `args.warmup` untimed steps, then `args.rounds`
    rounds of (a `dtype` matmul peak probe, one timed step). Step time, tokens/s and MFU
    against the probe (the per-round MFUs' median)."""
    first = timed(runner.step)[0]
    for _ in range(args.warmup):
        runner.step()
    times, mfus, peaks = [], [], []
    for _ in range(args.rounds):
        peak = probe_peak(args.peak_n, args.peak_s, dtype)[0]
        dt = timed(runner.step)[0]
        times.append(dt)
        peaks.append(peak)
        mfus.append(n_tok * fpt / dt / peak)
    med = statistics.median(times)
    return dict(
        step_s_median=round(med, 4), step_s=[round(x, 4) for x in times],
        first_step_s=round(first, 3), tokens_per_s=round(n_tok / med, 1),
        model_tflops_per_s=round(n_tok / med * fpt / 1e12, 4),
        mfu=round(statistics.median(mfus), 4), mfu_rounds=[round(x, 3) for x in mfus],
        peak_flops_median=round(statistics.median(peaks), 1), loss=runner.loss,
    )


def preset_config(args: argparse.Namespace) -> ModelConfig:
    """`--preset` (shrunk with `--quick`) with `--attn-impl`, `--remat` and `--dtype`."""
    cfg = (QUICK_PRESETS if args.quick else PRESETS)[args.preset]
    return tune(cfg, args).replace(dtype=args.dtype or cfg.dtype)


def tune(cfg: ModelConfig, args: argparse.Namespace) -> ModelConfig:
    """`--attn-impl` and `--remat` applied to a config."""
    cfg = cfg.replace(attn_impl=args.attn_impl)
    return cfg.replace(remat=args.remat) if args.remat else cfg


def run_preset(args: argparse.Namespace, options: StepOptions) -> None:
    """`--preset`: the transformers peer (first, so that on a GPU its memory is handed
    back before JAX's allocator grows), then our step without and with QK-clip, each
    built, timed and freed in turn. An out-of-memory variant is a line with an `error`."""
    cfg = preset_config(args)
    tokens = make_batch(cfg, args.batch, args.seq, seed=0)
    fpt = flops_per_token(cfg, args.seq)
    n_tok = args.batch * args.seq
    peak_tab, peak_src = table_peak()
    common = dict(bench="train_step", config=f"preset:{args.preset}", quick=args.quick,
                  batch=args.batch, seq=args.seq, tokens_per_step=n_tok,
                  model_flops_per_token=fpt, params_active=cfg.param_counts()["active"],
                  dtype=cfg.dtype, peak_table=peak_tab, peak_table_source=peak_src)

    def mfu_table(res: dict[str, Any]) -> float | None:
        return None if peak_tab is None else round(res["tokens_per_s"] * fpt / peak_tab, 4)

    if not args.no_hf:
        runner = None
        try:
            with PeakRSS() as pk:
                runner = TorchRunner(cfg, tokens, args.torch_threads, cfg.dtype)
                res = time_runner(runner, args, n_tok, fpt, cfg.dtype)
            emit(**common, impl="transformers", params=int(runner.n_params), **res,
                 mfu_table=mfu_table(res), arch=runner.arch, device=runner.device,
                 attn_implementation=runner.attn_impl,
                 experts_implementation=runner.experts_impl,
                 device_peak_bytes=runner.device_peak(), peak_rss_growth_bytes=pk.bytes)
        except Exception as e:
            if not is_oom(e):
                raise
            emit(**common, impl="transformers", error=oom_line(e))
        finally:
            if runner is not None:
                runner.close()
            runner = None
    for qk_clip in args.qk_clip_variants:
        vcfg = cfg.replace(attn_max_logits=True) if qk_clip else cfg
        hook = make_qk_clip_hook(vcfg, QK_CLIP_TAU) if qk_clip else None
        head = dict(common, impl="jax", qk_clip=qk_clip, qk_clip_tau=QK_CLIP_TAU if qk_clip else None,
                    attention_backend=choose_backend(vcfg, args.seq).describe(),
                    remat=vcfg.remat, scan_layers=vcfg.scan_layers)
        runner = None
        try:
            gc.collect()
            with PeakRSS() as pk:
                runner = JaxRunner(vcfg, tokens, options, fast_compile=args.quick, post_update=hook)
                res = time_runner(runner, args, n_tok, fpt, cfg.dtype)
            emit(**head, params=int(runner.n_params), **res, mfu_table=mfu_table(res),
                 compile_s=round(runner.compile_s, 2), compiled_bytes=runner.compiled_bytes,
                 device_peak_bytes=jax_device_peak(), peak_rss_growth_bytes=pk.bytes)
        except Exception as e:
            if not is_oom(e):
                raise
            emit(**head, error=oom_line(e))
        finally:
            runner = None
            gc.collect()
            jax.clear_caches()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny configs, fast compilation, 2 rounds: a smoke run")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="an accelerator preset (1b dense, moe-1b MLA+MoE), without and with "
                        "QK-clip; with --quick shrunk for a CPU smoke run")
    parser.add_argument("--qk-clip", choices=("both", "off", "on"), default="both",
                        help="--preset: the QK-clip variants run")
    parser.add_argument("--attn-impl", default="auto",
                        choices=("auto", "explicit", "flash", "cudnn", "dot_product"),
                        help="ModelConfig.attn_impl of every JAX run (default auto)")
    parser.add_argument("--remat", choices=("none", "full", "dots"), default=None,
                        help="ModelConfig.remat of every JAX run (default: the config's)")
    parser.add_argument("--only", default="dense,mla_moe", help="configs to run")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per runner")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per runner after the first (default 2; 0 with --quick)")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--no-dispatch", action="store_true", help="skip the dispatch comparison")
    parser.add_argument("--no-ce", action="store_true", help="skip the cross-entropy comparison")
    parser.add_argument("--dispatch", default="dense,capacity",
                        help="dispatches compared with the dropless mla_moe run")
    parser.add_argument("--ce-chunk-tokens", default="256,1024",
                        help="chunk sizes of the cross-entropy comparison")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype of both steps (parameters and optimizer state stay "
                        "float32) and of the peak probe (default float32; a preset's own: bfloat16)")
    parser.add_argument("--peak-n", type=int, default=None,
                        help="matmul size of the peak probe (default 1024; 8192 on an accelerator "
                        "with --preset; 256 with --quick)")
    parser.add_argument("--peak-s", type=float, default=0.5, help="seconds per peak probe")
    args = parser.parse_args()
    if args.preset:
        # Grow JAX's GPU pool on demand instead of taking 75% of the memory at start: the
        # transformers peer shares the device. Read when the backend starts (below).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    configs = {k: tune(c, args) for k, c in (QUICK if args.quick else CONFIGS).items()}
    if args.preset:
        small = args.quick
        args.batch = args.batch or (QUICK_PRESET_BATCH if small else PRESET_BATCH)
        args.seq = args.seq or (QUICK_PRESET_SEQ if small else PRESET_SEQ)
        args.dtype = preset_config(args).dtype
        args.qk_clip_variants = {"both": [False, True], "off": [False], "on": [True]}[args.qk_clip]
    else:
        args.dtype = args.dtype or "float32"
        configs = {k: c.replace(dtype=args.dtype) for k, c in configs.items()}
        args.batch = args.batch or (2 if args.quick else 4)
        args.seq = args.seq or (32 if args.quick else 256)
    args.rounds = args.rounds or (2 if args.quick else 3)
    if args.warmup is None:
        args.warmup = 0 if args.quick else 2
    on_accelerator = jax.default_backend() != "cpu"
    if args.peak_n is None:
        args.peak_n = 8192 if args.preset and on_accelerator else 1024
    if args.quick:
        args.peak_n, args.peak_s = 256, 0.05
    args.ce_tokens, args.ce_d, args.ce_vocab = (64, 32, 512) if args.quick else (1024, 512, 32768)
    args.ce_chunks = [int(c) for c in args.ce_chunk_tokens.split(",")]
    only = [n for n in args.only.split(",") if n]
    try:  # a backend forced with --attn-impl that cannot run here: one line, exit 2
        for c in [preset_config(args)] if args.preset else [configs[n] for n in only]:
            choose_backend(c, args.seq)
    except ValueError as e:
        parser.error(f"--attn-impl {args.attn_impl}: {e}")
    options = StepOptions()
    dev = jax.devices()[0]
    env: dict[str, Any] = dict(
        bench="env", backend=jax.default_backend(), device=dev.device_kind,
        num_devices=jax.device_count(), cpu_count=os.cpu_count(),
        loadavg=list(os.getloadavg()), jax=jax.__version__, quick=args.quick,
        dtype=args.dtype, preset=args.preset, attn_impl=args.attn_impl, remat=args.remat,
    )
    if not args.no_hf:
        import torch
        import transformers

        env.update(torch=torch.__version__, transformers=transformers.__version__,
                   torch_threads=torch.get_num_threads(), torch_cuda=torch.cuda.is_available())
    emit(**env)
    if args.preset:
        run_preset(args, options)
        emit(bench="end", loadavg=list(os.getloadavg()))
        return
    for name in only:
        tps = run_config(name, configs[name], args, options, with_hf=not args.no_hf)
        if "transformers" in tps:
            emit(bench="train_ratio", config=name,
                 jax_over_transformers=round(tps["jax"] / tps["transformers"], 3))
    if not args.no_dispatch and "mla_moe" in only:
        dispatch_compare(configs["mla_moe"], args, options)
    if not args.no_ce:
        cross_entropy_compare(args)
    emit(bench="end", loadavg=list(os.getloadavg()))


if __name__ == "__main__":
    main()

"""Model FLOPs per token and the hardware peak, for MFU = model FLOP/s / peak FLOP/s.

FLOP formula (training, per token; Kaplan et al. 2020 / PaLM App. B convention):

    6 * N_matmul + 6 * n_layers * seq_len * n_heads * (d_qk + d_v)

N_matmul is the number of parameters a token multiplies with in its forward pass: every
projection of the attention and FFN, for MoE only the `top_k` routed and the shared
experts plus the router, and the LM head; the embedding lookup is not a matmul. The
second term is QK^T and PV (2 FLOPs per multiply-add, x3 for forward + backward), counted
over the full sequence as in PaLM (causal masking is not subtracted), d_qk = d_v = head_dim
for MHA/GQA and d_qk = qk_nope + qk_rope, d_v = v_head_dim for MLA.

Peak: the dense bf16 matmul peak of the accelerator from `PEAK_FLOPS` (per chip) times the
device count; on CPU a matmul in the model's compute dtype measured at start-up on the whole
host (`measure_peak`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from model import ModelConfig

# Dense bf16 peak FLOP/s per chip (vendor data sheets, without sparsity).
PEAK_FLOPS: dict[str, float] = {
    "h100": 989e12,
    "h200": 989e12,
    "h800": 989e12,
    "gh200": 989e12,
    "b200": 2250e12,
    "a100": 312e12,
    "a800": 312e12,
    "l40s": 362e12,
    "v100": 125e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """N_matmul of the module docstring."""
    counts = cfg.param_counts()
    n = counts["active"] - counts["embedding"]
    if cfg.tie_embeddings:
        n += cfg.vocab_size * cfg.d_model  # the tied head is a matmul
    # norm gains are not matmuls
    n -= cfg.d_model * (2 * cfg.n_layers + 1)
    return int(n)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), see the module docstring."""
    if cfg.attention == "mla":
        dqk, dv = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        dqk = dv = cfg.attn_head_dim
    attn = 6 * cfg.n_layers * seq_len * cfg.n_heads * (dqk + dv)
    return float(6 * matmul_params_per_token(cfg) + attn)


def matmul_probe(n: int = 1024, dtype: str = "float32") -> Callable[[], None]:
    """A compiled `n x n x n` matmul (2 n^3 FLOPs) of `dtype` operands with a float32 result,
    the form `model.matmul.matmul` gives the model's dots; calling it runs one to completion."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    return lambda: f(a).block_until_ready()


def time_probe(probe: Callable[[], None], n: int, seconds: float) -> tuple[float, float]:
    """Runs `matmul_probe(n, ...)` for `seconds`: (FLOP per wall second, FLOP per process
    CPU second)."""
    reps, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        probe()
        reps += 1
    flops = 2 * n**3 * reps
    return flops / (time.perf_counter() - t0), flops / max(time.process_time() - c0, 1e-9)


def measure_peak(n: int = 1024, seconds: float = 0.5, dtype: str = "float32") -> float:
    """FLOP/s of a jitted `n x n` matmul in `dtype` on the default device (CPU peak proxy)."""
    return time_probe(matmul_probe(n, dtype), n, seconds)[0]


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """(total peak FLOP/s of all devices, how it was obtained); on CPU measured for the
    compute `dtype` (a bfloat16 matmul runs about twice as fast as a float32 one there)."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return measure_peak(dtype=dtype), f"measured {dtype} matmul on the CPU host"
    kind = dev.device_kind.lower()
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return peak * jax.device_count(), f"{dev.device_kind} table bf16 peak x {jax.device_count()}"
    return measure_peak(4096), f"measured matmul on {dev.device_kind} (not in the table)"

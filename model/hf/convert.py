"""Hugging Face `config.json` + safetensors <-> (`ModelConfig`, variables).

Architectures (`architectures[0]`, else `model_type`):

| HF architecture          | model_type               | here                                        |
|--------------------------|--------------------------|---------------------------------------------|
| `DeepseekV3ForCausalLM`  | deepseek_v3, kimi_k2     | MLA + shared/routed sigmoid MoE (V3, R1,    |
|                          |                          | Kimi-K2, Moonlight)                         |
| `Qwen3MoeForCausalLM`    | qwen3_moe                | GQA + QK-norm + softmax-routed MoE          |
| `Qwen3ForCausalLM`       | qwen3                    | GQA + QK-norm                               |
| `Qwen2ForCausalLM`       | qwen2                    | GQA + q/k/v biases                          |
| `LlamaForCausalLM`       | llama                    | MHA/GQA                                     |

Weights: a torch `Linear` weight `[out, in]` is our kernel `[in, out]` (transposed); routed
experts `mlp.experts.{e}.{gate,up,down}_proj.weight` stack into `moe/experts/w_*`
`[E, in, out]`; `mlp.gate.e_score_correction_bias` is the `router_bias` collection's
`layers_{i}/moe/bias`. DeepSeek checkpoints with `rope_interleave` (the default) store the
RoPE part of each q head and of the shared key interleaved (pairs (x0, x1), (x2, x3), ...);
this model rotates halves (Llama style), so those columns are permuted to
[x0, x2, ..., x1, x3, ...] on load and back on save, which leaves every logit unchanged.
Block-quantized FP8 weights (DeepSeek-V3 / Kimi-K2 releases: `weight_scale_inv` per
128x128 block) are dequantized on load. DeepSeek's multi-token-prediction layers
(`model.layers.{n_layers + j}`) are skipped.

Loaded configs set `scale_embeddings=False` (HF models do not scale embeddings) and, for
MoE, `capacity_factor = n_routed_experts / top_k`, which makes the expert capacity equal
to the token count: no token is ever dropped and the outputs match the checkpoint's own
implementation exactly. Lower it for training throughput. Qwen3-MoE has no balancing bias,
so it loads with `bias_update_rate=0`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.config import ModelConfig
from model.hf.safetensors_io import SafetensorsReader, write_safetensors
from model.sharding import logical_to_sharding
from model.transformer import Transformer

ARCHITECTURES = {
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}
MODEL_TYPES = {
    "deepseek_v3": "deepseek_v3",
    "kimi_k2": "deepseek_v3",
    "qwen3_moe": "qwen3_moe",
    "qwen3": "qwen3",
    "qwen2": "qwen2",
    "llama": "llama",
}
_ARCH_OF = {family: arch for arch, family in ARCHITECTURES.items()}
_DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a checkpoint stores what `ModelConfig` does not describe."""

    family: str  # a value of ARCHITECTURES
    rope_interleave: bool = False  # DeepSeek: RoPE columns stored in interleaved pairs
    fp8_block: tuple[int, int] | None = None  # block-quantized FP8 weights (block shape)
    n_extra_layers: int = 0  # DeepSeek multi-token-prediction layers to skip


# ----------------------------------------------------------------------------------------
# config.json <-> ModelConfig


def family_of(hf: dict[str, Any]) -> str:
    """The supported family of an HF config, or `ValueError` naming what it is."""
    archs = hf.get("architectures") or []
    mtype = hf.get("model_type")
    family = ARCHITECTURES.get(archs[0]) if archs else MODEL_TYPES.get(mtype)
    if family is None or (mtype is not None and MODEL_TYPES.get(mtype) != family):
        raise ValueError(
            f"unsupported checkpoint: architectures={archs} model_type={mtype!r}; supported "
            f"architectures: {sorted(ARCHITECTURES)} (model_type {sorted(MODEL_TYPES)})"
        )
    return family


def _rope_from_hf(hf: dict[str, Any], family: str, problems: list[str]) -> dict[str, Any]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        problems.append(f"per-layer-type RoPE parameters {sorted(params)}")
        return {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) not in (1, 1.0, None):
        problems.append("partial_rotary_factor != 1")
    orig = (params.get("original_max_position_embeddings")
            or hf.get("original_max_position_embeddings") or hf.get("max_position_embeddings"))
    if kind == "default":
        pass
    elif kind == "linear":
        out.update(rope_scaling="linear", rope_factor=float(params["factor"]))
    elif kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=float(params["factor"]),
                   rope_original_max_len=int(orig),
                   rope_low_freq_factor=float(params["low_freq_factor"]),
                   rope_high_freq_factor=float(params["high_freq_factor"]))
    elif kind == "yarn":
        factor = params.get("factor") or hf["max_position_embeddings"] / orig
        out.update(rope_scaling="yarn", rope_factor=float(factor), rope_original_max_len=int(orig),
                   rope_beta_fast=float(params.get("beta_fast") or 32),
                   rope_beta_slow=float(params.get("beta_slow") or 1),
                   rope_mscale=float(params.get("mscale") or 0),
                   rope_mscale_all_dim=float(params.get("mscale_all_dim") or 0))
        if params.get("attention_factor") is not None:
            problems.append("an explicit YaRN attention_factor")
        if params.get("truncate", True) is False:
            problems.append("YaRN with truncate=False")
        if family != "deepseek_v3" and params.get("mscale_all_dim"):
            problems.append("YaRN mscale_all_dim outside DeepSeek models")
    else:
        problems.append(f"rope type {kind!r}")
    return out


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> tuple[ModelConfig, Layout]:
    """Translates an HF `config.json` dict.

    Args:
      dtype: parameter and compute dtype; None: the checkpoint's (`dtype`/`torch_dtype`),
        bfloat16 for FP8 checkpoints, else float32.
    Raises:
      ValueError: an unsupported architecture, or every feature of it this model lacks.
    """
    family = family_of(hf)
    problems: list[str] = []
    g = hf.get
    quant = g("quantization_config") or {}
    fp8_block = None
    if quant:
        if quant.get("quant_method") != "fp8" or not quant.get("weight_block_size"):
            problems.append(f"quantization {quant.get('quant_method')!r} (only block FP8 is read)")
        else:
            fp8_block = tuple(int(b) for b in quant["weight_block_size"])
    if dtype is None:
        dtype = g("dtype") or g("torch_dtype")
        dtype = "bfloat16" if fp8_block else (dtype if dtype in _DTYPE_NAMES else "float32")
    if g("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={g('hidden_act')!r} (only silu)")
    n_heads = g("num_attention_heads")
    kw: dict[str, Any] = dict(
        vocab_size=g("vocab_size"),
        d_model=g("hidden_size"),
        n_layers=g("num_hidden_layers"),
        n_heads=n_heads,
        max_seq_len=g("max_position_embeddings", 4096),
        ffn_dim=g("intermediate_size"),
        norm_eps=float(g("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(g("tie_word_embeddings", False)),
        scale_embeddings=False,
        init_std=float(g("initializer_range", 0.02)),
        dtype=dtype,
        param_dtype=dtype,
    )
    kw.update(_rope_from_hf(hf, family, problems))
    layout = Layout(family, fp8_block=fp8_block)

    if family == "deepseek_v3":
        if g("attention_bias"):
            problems.append("attention_bias=True")
        if g("scoring_func", "sigmoid") != "sigmoid":
            problems.append(f"scoring_func={g('scoring_func')!r}")
        if g("moe_layer_freq", 1) != 1:
            problems.append(f"moe_layer_freq={g('moe_layer_freq')}")
        kw.update(attention="mla", q_lora_rank=g("q_lora_rank") or 0, kv_lora_rank=g("kv_lora_rank"),
                  qk_nope_head_dim=g("qk_nope_head_dim"), qk_rope_head_dim=g("qk_rope_head_dim"),
                  v_head_dim=g("v_head_dim"))
        experts = g("n_routed_experts") or 0
        if experts:
            top_k = g("num_experts_per_tok")
            kw.update(n_routed_experts=experts, n_shared_experts=g("n_shared_experts") or 0,
                      top_k=top_k, moe_ffn_dim=g("moe_intermediate_size"), router_score="sigmoid",
                      norm_topk_prob=bool(g("norm_topk_prob", True)),
                      routed_scaling_factor=float(g("routed_scaling_factor", 1.0)),
                      n_group=g("n_group") or 1, topk_group=g("topk_group") or 1,
                      first_k_dense=min(g("first_k_dense_replace") or 0, kw["n_layers"]),
                      capacity_factor=experts / top_k)
        layout = dataclasses.replace(
            layout, rope_interleave=bool(g("rope_interleave", True)),
            n_extra_layers=int(g("num_nextn_predict_layers", g("num_mtp_layers", 0)) or 0))
    else:
        head_dim = g("head_dim") or (128 if family == "qwen3" else kw["d_model"] // n_heads)
        kw.update(attention="mha", n_kv_heads=g("num_key_value_heads") or n_heads, head_dim=head_dim,
                  attn_bias=family == "qwen2", qk_norm=family in ("qwen3", "qwen3_moe"))
        if family != "qwen2" and g("attention_bias"):
            problems.append("attention_bias=True (a bias on o_proj)")
        if g("mlp_bias"):
            problems.append("mlp_bias=True")
        if g("use_sliding_window") or "sliding_attention" in (g("layer_types") or []):
            problems.append("sliding-window attention")
        if family == "qwen3_moe":
            experts = g("num_experts") or g("num_local_experts")
            top_k, n = g("num_experts_per_tok"), kw["n_layers"]
            dense = sorted(g("mlp_only_layers") or [])
            first_k = len(dense)
            if dense != list(range(first_k)) or g("decoder_sparse_step", 1) != 1:
                problems.append(f"dense layers {dense} with decoder_sparse_step="
                                f"{g('decoder_sparse_step', 1)} (only a leading block of dense layers)")
            kw.update(n_routed_experts=experts, top_k=top_k, moe_ffn_dim=g("moe_intermediate_size"),
                      router_score="softmax", norm_topk_prob=bool(g("norm_topk_prob", False)),
                      first_k_dense=min(first_k, n), bias_update_rate=0.0,
                      capacity_factor=experts / top_k)
    if problems:
        raise ValueError(f"unsupported {_ARCH_OF[family]} checkpoint features: " + "; ".join(problems))
    return ModelConfig(**kw), layout


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any] | None:
    if cfg.rope_scaling == "none":
        return None
    out: dict[str, Any] = {"rope_type": cfg.rope_scaling, "type": cfg.rope_scaling,
                           "factor": cfg.rope_factor}
    if cfg.rope_scaling == "llama3":
        out.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_len)
    elif cfg.rope_scaling == "yarn":
        out.update(original_max_position_embeddings=cfg.rope_original_max_len,
                   beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow)
        if cfg.rope_mscale:
            out["mscale"] = cfg.rope_mscale
        if cfg.rope_mscale_all_dim:
            out["mscale_all_dim"] = cfg.rope_mscale_all_dim
    return out


def export_family(cfg: ModelConfig) -> str:
    """The HF family `cfg` is saved as, or `ValueError` listing why it has none."""
    problems = []
    if cfg.attn_logit_scale != "sqrt":
        problems.append("attn_logit_scale='inverse'")
    if cfg.tie_embeddings and cfg.scale_embeddings:
        problems.append("scale_embeddings=True with tied embeddings (cannot be folded)")
    if cfg.tie_embeddings and cfg.mup_base_d_model:
        problems.append("muP output multiplier with tied embeddings (cannot be folded)")
    if cfg.rope_scaling == "yarn" and cfg.rope_mscale_all_dim and cfg.attention != "mla":
        problems.append("YaRN mscale_all_dim outside MLA (DeepSeek)")
    if cfg.attention == "mla":
        family = "deepseek_v3"
        if cfg.n_moe_layers:
            if cfg.router_score != "sigmoid":
                problems.append("MLA with a softmax router (DeepseekV3 routes with sigmoid)")
            if cfg.n_shared_experts == 0:
                problems.append("MLA MoE without shared experts")
    elif cfg.n_moe_layers:
        family = "qwen3_moe"
        for bad, msg in [
            (not cfg.qk_norm, "qk_norm=False"), (cfg.attn_bias, "attn_bias=True"),
            (cfg.router_score != "softmax", "a sigmoid router"),
            (cfg.n_shared_experts > 0, "shared experts"), (cfg.n_group > 1, "group-limited routing"),
            (cfg.routed_scaling_factor != 1.0, "routed_scaling_factor != 1"),
        ]:
            if bad:
                problems.append(f"{msg} (a MoE with MHA/GQA is saved as Qwen3-MoE)")
    elif cfg.qk_norm:
        family = "qwen3"
        if cfg.attn_bias:
            problems.append("qk_norm=True with attn_bias=True")
    else:
        family = "qwen2" if cfg.attn_bias else "llama"
    if problems:
        raise ValueError("this ModelConfig has no Hugging Face equivalent: " + "; ".join(problems))
    return family


def config_to_hf(cfg: ModelConfig, dtype: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF `config.json` dict of `cfg` (see `export_family`); `extra` entries are kept
    where this does not set them (token ids, for instance)."""
    family = export_family(cfg)
    hf: dict[str, Any] = {
        "architectures": [_ARCH_OF[family]],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_to_hf(cfg),
        "attention_bias": False,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if family == "deepseek_v3":
        moe = cfg.n_moe_layers > 0
        hf.update(
            num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None,
            kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
            n_routed_experts=cfg.n_routed_experts if moe else 1,
            n_shared_experts=cfg.n_shared_experts if moe else 1,
            num_experts_per_tok=cfg.top_k if moe else 1,
            moe_intermediate_size=cfg.moe_ffn_dim, routed_scaling_factor=cfg.routed_scaling_factor,
            n_group=cfg.n_group if moe else 1, topk_group=cfg.topk_group if moe else 1,
            norm_topk_prob=cfg.norm_topk_prob, first_k_dense_replace=cfg.n_dense_layers,
            rope_interleave=True, scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1,
            num_nextn_predict_layers=0,
        )
    else:
        hf.update(num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.attn_head_dim,
                  mlp_bias=False, use_sliding_window=False)
    if family == "qwen3_moe":
        hf.update(num_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.top_k,
                  moe_intermediate_size=cfg.moe_ffn_dim, norm_topk_prob=cfg.norm_topk_prob,
                  decoder_sparse_step=1, mlp_only_layers=list(range(cfg.n_dense_layers)))
    for key, value in (extra or {}).items():
        hf.setdefault(key, value)
    return hf


# ----------------------------------------------------------------------------------------
# the tensor mapping (one list, used in both directions)


@dataclasses.dataclass(frozen=True, eq=False)
class TensorMap:
    """HF tensor `hf` <-> the leaf at `ours` (non-scanned path, collection first), optionally
    one slice `expert` of a stacked leaf; `transpose`d, then the last axis permuted by
    `perm` (our column j = HF column perm[j])."""

    hf: str
    ours: tuple[str, ...]
    expert: int | None = None
    transpose: bool = False
    perm: np.ndarray | None = None


def _rope_perm(n: int) -> np.ndarray:
    """Interleaved pairs -> halves: [0, 2, 4, ..., 1, 3, 5, ...]."""
    return np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])


def tensor_maps(cfg: ModelConfig, layout: Layout) -> list[TensorMap]:
    """Every HF tensor of a `layout.family` checkpoint of `cfg`, in file order."""
    P = "params"
    maps = [TensorMap("model.embed_tokens.weight", (P, "embed", "embedding"))]
    q_perm = kv_perm = None
    if cfg.attention == "mla" and layout.rope_interleave:
        nope, rope, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        cols = np.arange(cfg.n_heads * (nope + rope)).reshape(cfg.n_heads, nope + rope)
        cols[:, nope:] = cols[:, nope:][:, _rope_perm(rope)]
        q_perm = cols.reshape(-1)
        kv_perm = np.concatenate([np.arange(r), r + _rope_perm(rope)])
    for i in range(cfg.n_layers):
        hp, lp = f"model.layers.{i}.", (P, f"layers_{i}")

        def lin(h, o, perm=None, hp=hp, lp=lp):
            return TensorMap(f"{hp}{h}.weight", lp + o + ("kernel",), transpose=True, perm=perm)

        def norm(h, o, hp=hp, lp=lp):
            return TensorMap(f"{hp}{h}.weight", lp + o + ("scale",))

        maps += [norm("input_layernorm", ("attn_norm",))]
        a = "self_attn."
        if cfg.attention == "mla":
            if cfg.q_lora_rank:
                maps += [lin(a + "q_a_proj", ("attn", "q_a_proj")),
                         norm(a + "q_a_layernorm", ("attn", "q_a_norm")),
                         lin(a + "q_b_proj", ("attn", "q_b_proj"), q_perm)]
            else:
                maps += [lin(a + "q_proj", ("attn", "q_proj"), q_perm)]
            maps += [lin(a + "kv_a_proj_with_mqa", ("attn", "kv_a_proj"), kv_perm),
                     norm(a + "kv_a_layernorm", ("attn", "kv_a_norm")),
                     lin(a + "kv_b_proj", ("attn", "kv_b_proj"))]
        else:
            for x in "qkv":
                maps.append(lin(f"{a}{x}_proj", ("attn", f"{x}_proj")))
                if cfg.attn_bias:
                    maps.append(TensorMap(f"{hp}{a}{x}_proj.bias", lp + ("attn", f"{x}_proj", "bias")))
            if cfg.qk_norm:
                maps += [norm(a + "q_norm", ("attn", "q_norm")), norm(a + "k_norm", ("attn", "k_norm"))]
        maps += [lin(a + "o_proj", ("attn", "o_proj")), norm("post_attention_layernorm", ("ffn_norm",))]
        if i < cfg.n_dense_layers:
            maps += [lin(f"mlp.{x}_proj", ("mlp", f"{x}_proj")) for x in ("gate", "up", "down")]
            continue
        maps.append(lin("mlp.gate", ("moe", "router")))
        if layout.family == "deepseek_v3":
            maps.append(TensorMap(f"{hp}mlp.gate.e_score_correction_bias",
                                  ("router_bias", f"layers_{i}", "moe", "bias")))
        for e in range(cfg.n_routed_experts):
            maps += [TensorMap(f"{hp}mlp.experts.{e}.{x}_proj.weight", lp + ("moe", "experts", f"w_{x}"),
                               expert=e, transpose=True) for x in ("gate", "up", "down")]
        if cfg.n_shared_experts:
            maps += [lin(f"mlp.shared_experts.{x}_proj", ("moe", "shared", f"{x}_proj"))
                     for x in ("gate", "up", "down")]
    maps.append(TensorMap("model.norm.weight", (P, "final_norm", "scale")))
    if not cfg.tie_embeddings:
        maps.append(TensorMap("lm_head.weight", (P, "lm_head", "kernel"), transpose=True))
    return maps


def _ignorable(name: str, cfg: ModelConfig, layout: Layout) -> bool:
    """Tensors a checkpoint may hold that this model does not use."""
    if name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight"):
        return True
    m = re.match(r"model\.layers\.(\d+)\.", name)  # DeepSeek multi-token-prediction layers
    return bool(m) and cfg.n_layers <= int(m.group(1)) < cfg.n_layers + layout.n_extra_layers


def _stack_of(path: tuple[str, ...], cfg: ModelConfig) -> tuple[tuple[str, ...], int] | None:
    """(scanned path, index on the layer axis) of a non-scanned `layers_{i}` path, when
    `cfg.scan_layers`."""
    if not cfg.scan_layers or not path[1].startswith("layers_"):
        return None
    i = int(path[1].split("_")[1])
    if i < cfg.n_dense_layers:
        return (path[0], "dense_stack") + path[2:], i
    return (path[0], "moe_stack") + path[2:], i - cfg.n_dense_layers


# ----------------------------------------------------------------------------------------
# load


class _Leaf:
    """One HF tensor, converted lazily: `read(index)` reads only what `index` selects (a
    permuted or FP8 tensor is converted whole, one tensor at a time)."""

    def __init__(self, reader: SafetensorsReader, tm: TensorMap, fp8_block: tuple[int, int] | None):
        self.reader, self.tm, self.fp8_block = reader, tm, fp8_block
        shape = reader.shape(tm.hf)
        self.shape = shape[::-1] if tm.transpose else shape

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        tm, arr = self.tm, self.reader.get(self.tm.hf)
        scale = tm.hf + "_scale_inv"
        if self.fp8_block and arr.dtype.itemsize == 1 and scale in self.reader:
            arr = dequantize_fp8(arr, self.reader.get(scale), self.fp8_block)
        if tm.transpose:
            arr = arr.T
        if tm.perm is not None:
            index = tuple(index[:-1]) + (tm.perm[index[-1]],)
        return np.asarray(arr[tuple(index)])


class _Stack:
    """Sources stacked on a new leading axis (experts, or scanned layers)."""

    def __init__(self, items: list[Any]):
        self.items = items
        self.shape = (len(items),) + tuple(items[0].shape)

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        return np.stack([s.read(tuple(index[1:])) for s in self.items[index[0]]])


class _Zeros:
    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        return np.zeros(self.shape, np.float32)[tuple(index)]


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """Block FP8 -> float32: `w[i, j] * scale_inv[i // block[0], j // block[1]]` (the
    DeepSeek-V3 release format)."""
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], 0), block[1], 1)
    return w.astype(np.float32) * s[: w.shape[0], : w.shape[1]]


def _name(kp) -> str:
    """A leaf's key path as `params/layers_0/attn/q_proj/kernel`."""
    return jax.tree_util.keystr(kp, simple=True, separator="/")


def _path(kp) -> tuple[str, ...]:
    """A leaf's key path as the tuple of its keys (the `TensorMap.ours` form)."""
    return tuple(_name(kp).split("/"))


def abstract_variables(cfg: ModelConfig, mesh: Mesh | None = None) -> tuple[Any, Any]:
    """(`jax.ShapeDtypeStruct` tree of the unboxed variables, matching `NamedSharding` tree or
    None): params sharded by their logical axes, router biases replicated (as the trainer)."""
    boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    abstract = jax.eval_shape(nn.unbox, boxed)  # traced: no eager sharding constraint under a mesh
    if mesh is None:
        return abstract, None
    shardings = {"params": logical_to_sharding(nn.get_partition_spec(boxed["params"]), mesh)}
    if "router_bias" in abstract:
        rep = NamedSharding(mesh, PartitionSpec())
        shardings["router_bias"] = jax.tree.map(lambda _: rep, abstract["router_bias"])
    return abstract, shardings


def read_hf_config(path: str) -> dict[str, Any]:
    fname = os.path.join(path, "config.json")
    if not os.path.exists(fname):
        raise ValueError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    with open(fname) as f:
        return json.load(f)


def load(
    path: str, mesh: Mesh | None = None, dtype: str | None = None, **overrides: Any
) -> tuple[ModelConfig, dict[str, Any]]:
    """Loads an HF checkpoint directory into `(ModelConfig, variables)`.

    Tensors are read one at a time from memory-mapped safetensors, converted, and placed
    straight into their sharding on `mesh` (each device reads only its own slice), in
    `dtype`; no host copy of the whole model is ever made.

    Args:
      path: directory with `config.json` and `*.safetensors` (one file or sharded + index).
      mesh: place each parameter on this mesh by its logical axes (router biases
        replicated); None: the default device.
      dtype: parameter (and compute) dtype; None: the checkpoint's.
      **overrides: `ModelConfig` fields to change before loading, e.g. `scan_layers=True`
        (loads into the stacked layout), `max_seq_len`, `remat`, `capacity_factor`.
    Returns:
      `(cfg, {"params": ..., "router_bias": ...})` (`router_bias` only for MoE models), the
      structure `nn.unbox(Transformer(cfg).init(...))` has.
    Raises:
      ValueError: unsupported architecture or features, or missing / unexpected tensors (all
        listed).
    """
    hf = read_hf_config(path)
    cfg, layout = config_from_hf(hf, dtype)
    cfg = cfg.replace(**overrides)
    reader = SafetensorsReader(path)
    maps = tensor_maps(cfg, layout)
    present = set(reader.keys())
    needed = {tm.hf for tm in maps}
    scales = {n + "_scale_inv" for n in needed} if layout.fp8_block else set()
    missing = sorted(needed - present)
    unexpected = sorted(n for n in present - needed - scales if not _ignorable(n, cfg, layout))
    if missing or unexpected:
        raise ValueError(
            f"{path}: the tensors do not match a {_ARCH_OF[layout.family]} of this config "
            f"({len(missing)} missing, {len(unexpected)} unexpected). "
            f"missing: {missing[:50]}{' ...' if len(missing) > 50 else ''}; "
            f"unexpected: {unexpected[:50]}{' ...' if len(unexpected) > 50 else ''}"
        )

    by_leaf: dict[tuple[str, ...], list[TensorMap]] = {}
    for tm in maps:
        by_leaf.setdefault(tm.ours, []).append(tm)
    sources: dict[tuple[str, ...], Any] = {}
    for leaf, tms in by_leaf.items():
        leaves = [_Leaf(reader, tm, layout.fp8_block) for tm in tms]
        sources[leaf] = _Stack(leaves) if tms[0].expert is not None else leaves[0]
    if layout.family != "deepseek_v3":  # no balancing bias in the checkpoint: zeros
        for i in range(cfg.n_dense_layers, cfg.n_layers):
            sources[("router_bias", f"layers_{i}", "moe", "bias")] = _Zeros((cfg.n_routed_experts,))

    abstract, shardings = abstract_variables(cfg, mesh)
    paths = [_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    targets = {}
    for path in paths:
        if path[1] in ("dense_stack", "moe_stack"):
            start, stop = ((0, cfg.n_dense_layers) if path[1] == "dense_stack"
                           else (cfg.n_dense_layers, cfg.n_layers))
            parts = [(path[0], f"layers_{i}") + path[2:] for i in range(start, stop)]
            if all(p in sources for p in parts):
                targets[path] = _Stack([sources.pop(p) for p in parts])
        elif path in sources:
            targets[path] = sources.pop(path)
    unmapped = sorted("/".join(p) for p in paths if p not in targets)
    if unmapped or sources:
        raise ValueError(f"the config does not match the checkpoint's tensors: model leaves "
                         f"without a tensor {unmapped}, tensors without a leaf "
                         f"{sorted('/'.join(p) for p in sources)}")

    def put(kp, leaf, sharding=None):
        src = targets[_path(kp)]
        if tuple(src.shape) != tuple(leaf.shape):
            raise ValueError(f"{_name(kp)}: checkpoint shape {tuple(src.shape)} != "
                             f"model shape {tuple(leaf.shape)}")
        if sharding is None:
            full = tuple(slice(None) for _ in leaf.shape)
            return jnp.asarray(src.read(full).astype(leaf.dtype))
        return jax.make_array_from_callback(
            leaf.shape, sharding, lambda index: src.read(index).astype(leaf.dtype)
        )

    if shardings is None:
        variables = jax.tree_util.tree_map_with_path(put, abstract)
    else:
        variables = jax.tree_util.tree_map_with_path(put, abstract, shardings)
    return cfg, variables


# ----------------------------------------------------------------------------------------
# save


def save(
    path: str,
    config: ModelConfig,
    variables: dict[str, Any],
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
    extra_config: dict[str, Any] | None = None,
) -> None:
    """Writes `variables` of a `config` model as an HF checkpoint directory (`config.json`
    + safetensors) that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    One tensor is fetched from the devices at a time. Embedding scaling and the muP output
    multiplier are folded into the (untied) embedding / LM head, since HF models have
    neither. Single-process only (each array must be fully addressable).

    Args:
      dtype: dtype of the written weights; None: `config.param_dtype` (router biases are
        always float32).
      max_shard_bytes: files larger than this are split, with `model.safetensors.index.json`.
      extra_config: `config.json` entries to keep where this does not set them (e.g. the
        original checkpoint's `bos_token_id`, `eos_token_id`).
    Raises:
      ValueError: `config` has no HF equivalent (listing why), or a Qwen3-MoE model has
        nonzero router biases (Qwen3-MoE has none).
    """
    cfg = config
    variables = nn.unbox(variables)
    dtype = dtype or cfg.param_dtype
    family = export_family(cfg)
    layout = Layout(family, rope_interleave=family == "deepseek_v3")
    maps = tensor_maps(cfg, layout)
    if family == "qwen3_moe":
        biases = [np.abs(np.asarray(x)).max() for x in jax.tree.leaves(variables.get("router_bias", {}))]
        if biases and max(biases) > 0:
            raise ValueError("Qwen3-MoE has no router bias, but this model's router biases are "
                             f"nonzero (max |b| = {max(biases):.3g}); train with bias_update_rate=0")
    multiplier = {}
    if cfg.scale_embeddings:
        multiplier["model.embed_tokens.weight"] = math.sqrt(cfg.d_model)
    if cfg.mup_base_d_model:
        multiplier["lm_head.weight"] = 1.0 / cfg.width_multiplier

    def leaf_of(tm: TensorMap) -> tuple[Any, tuple[int, ...]]:
        path, index = tm.ours, ()
        stacked = _stack_of(path, cfg)
        if stacked is not None:
            path, layer = stacked
            index = (layer,)
        node = variables
        for key in path:
            if key not in node:
                raise ValueError(f"variables lack {'/'.join(path)}")
            node = node[key]
        if tm.expert is not None:
            index += (tm.expert,)
        return node, index

    by_name: dict[str, tuple[TensorMap, np.dtype]] = {}
    specs = []
    for tm in maps:
        node, index = leaf_of(tm)
        shape = tuple(node.shape[len(index):])
        shape = shape[::-1] if tm.transpose else shape
        out = np.dtype(jnp.dtype("float32" if tm.ours[0] == "router_bias" else dtype))
        by_name[tm.hf] = (tm, out)
        specs.append((tm.hf, shape, out))

    def produce(name: str) -> np.ndarray:
        tm, out = by_name[name]
        node, index = leaf_of(tm)
        arr = np.asarray(jax.device_get(node[index] if index else node)).astype(np.float32)
        if tm.perm is not None:
            arr = arr[..., np.argsort(tm.perm)]
        if tm.transpose:
            arr = arr.T
        if name in multiplier:
            arr = arr * np.float32(multiplier[name])
        return arr.astype(out)

    os.makedirs(path, exist_ok=True)
    for old in os.listdir(path):  # stale shards of an earlier save would shadow the index
        if old.endswith(".safetensors") or old == "model.safetensors.index.json":
            os.remove(os.path.join(path, old))
    write_safetensors(path, specs, produce, max_shard_bytes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, dtype, extra_config), f, indent=2)

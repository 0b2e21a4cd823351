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
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import lora
from model.config import ModelConfig
from model.hf.safetensors_io import SafetensorsReader, read_json_object, write_safetensors
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
    archs = archs if isinstance(archs, list) else [archs]
    mtype = hf.get("model_type")
    mtype = mtype if isinstance(mtype, str) or mtype is None else repr(mtype)
    arch = archs[0] if archs and isinstance(archs[0], str) else None
    family = ARCHITECTURES.get(arch) if archs else MODEL_TYPES.get(mtype)
    if family is None or (mtype is not None and MODEL_TYPES.get(mtype) != family):
        raise ValueError(
            f"unsupported checkpoint: architectures={archs} model_type={mtype!r}; supported "
            f"architectures: {sorted(ARCHITECTURES)} (model_type {sorted(MODEL_TYPES)})"
        )
    return family


_REQUIRED = object()


class _Fields:
    """Typed reads of `config.json` entries. A missing required field or a value of the wrong
    type is recorded in `errors`, naming the field, and a placeholder (1) stands in for it so
    that the translation goes on and every problem is reported at once."""

    def __init__(self, d: dict[str, Any], errors: list[str], prefix: str = ""):
        self.d, self.errors, self.prefix = d, errors, prefix

    def bad(self, key: str, msg: str) -> int:
        self.errors.append(msg.format(f"'{self.prefix}{key}'"))
        return 1

    def integer(self, key: str, default: Any = _REQUIRED, lo: int = 1) -> Any:
        """`d[key]`, an integer >= `lo`; `default` when absent or null."""
        v = self.d.get(key)
        if v is None:
            return self.bad(key, "missing required field {}") if default is _REQUIRED else default
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            return self.bad(key, f"field {{}} must be an integer >= {lo}, got {v!r}")
        return v

    def number(self, key: str, default: Any = _REQUIRED, positive: bool = False) -> Any:
        """`d[key]`, a finite number (> 0 if `positive`); `default` when absent or null."""
        v = self.d.get(key)
        if v is None:
            return self.bad(key, "missing required field {}") if default is _REQUIRED else default
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                or (positive and v <= 0)):
            what = "a number > 0" if positive else "a finite number"
            return self.bad(key, f"field {{}} must be {what}, got {v!r}")
        return float(v)

    def mapping(self, key: str) -> dict[str, Any]:
        """`d[key]`, an object; {} when absent or null."""
        v = self.d.get(key) or {}
        if not isinstance(v, dict):
            self.bad(key, f"field {{}} must be an object, got {v!r}")
            return {}
        return v


def _rope_from_hf(hf: dict[str, Any], family: str, problems: list[str], errors: list[str]) -> dict[str, Any]:
    f = _Fields(hf, errors)
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = f.mapping(key)
    if any(isinstance(v, dict) for v in params.values()):
        problems.append(f"per-layer-type RoPE parameters {sorted(params)}")
        return {}
    p = _Fields(params, errors, prefix=key + ".")
    theta = p.number("rope_theta", None, positive=True) or f.number("rope_theta", 10000.0, positive=True)
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": theta}
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) not in (1, 1.0, None):
        problems.append("partial_rotary_factor != 1")

    def orig() -> int:
        n = (p.integer("original_max_position_embeddings", None)
             or f.integer("original_max_position_embeddings", None)
             or f.integer("max_position_embeddings", None))
        return n if n is not None else p.integer("original_max_position_embeddings")

    if kind == "default":
        pass
    elif kind == "linear":
        out.update(rope_scaling="linear", rope_factor=p.number("factor", positive=True))
    elif kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=p.number("factor", positive=True),
                   rope_original_max_len=orig(),
                   rope_low_freq_factor=p.number("low_freq_factor"),
                   rope_high_freq_factor=p.number("high_freq_factor"))
    elif kind == "yarn":
        original = orig()
        factor = p.number("factor", None, positive=True) or f.integer("max_position_embeddings") / original
        out.update(rope_scaling="yarn", rope_factor=float(factor), rope_original_max_len=original,
                   rope_beta_fast=p.number("beta_fast", None) or 32.0,
                   rope_beta_slow=p.number("beta_slow", None) or 1.0,
                   rope_mscale=p.number("mscale", None) or 0.0,
                   rope_mscale_all_dim=p.number("mscale_all_dim", None) or 0.0)
        if params.get("attention_factor") is not None:
            problems.append("an explicit YaRN attention_factor")
        if params.get("truncate", True) is False:
            problems.append("YaRN with truncate=False")
        if family != "deepseek_v3" and params.get("mscale_all_dim"):
            problems.append("YaRN mscale_all_dim outside DeepSeek models")
    else:
        problems.append(f"rope type {kind!r}")
    return out


def config_from_hf(
    hf: dict[str, Any], dtype: str | None = None, source: str | None = None
) -> tuple[ModelConfig, Layout]:
    """Translates an HF `config.json` dict.

    Args:
      dtype: parameter and compute dtype; None: the checkpoint's (`dtype`/`torch_dtype`),
        bfloat16 for FP8 checkpoints, else float32.
      source: where `hf` was read from (`.../config.json`), named in the errors.
    Raises:
      ValueError: an unsupported architecture, or every feature of it this model lacks;
        missing required fields or values of the wrong type (every one named).
    """
    where = f"{source}: " if source else ""
    if not isinstance(hf, dict):
        raise ValueError(f"{where}not a Hugging Face config (not a JSON object)")
    try:
        family = family_of(hf)
        errors: list[str] = []
        problems: list[str] = []
        kw, layout = _config_kwargs(hf, family, dtype, problems, errors)
    except (TypeError, AttributeError, KeyError) as e:  # a malformed value no check above names
        raise ValueError(f"{where}malformed config ({type(e).__name__}: {e})") from e
    except ValueError as e:
        raise ValueError(f"{where}{e}") from e
    if errors:
        raise ValueError(where + "; ".join(dict.fromkeys(errors)))
    if problems:
        raise ValueError(f"{where}unsupported {_ARCH_OF[family]} checkpoint features: "
                         + "; ".join(problems))
    try:
        return ModelConfig(**kw), layout
    except ValueError as e:
        raise ValueError(f"{where}{e}") from e


def _config_kwargs(
    hf: dict[str, Any], family: str, dtype: str | None, problems: list[str], errors: list[str]
) -> tuple[dict[str, Any], Layout]:
    """`ModelConfig` keyword arguments and the `Layout` of `hf` (see `config_from_hf`)."""
    g = hf.get
    f = _Fields(hf, errors)
    quant = f.mapping("quantization_config")
    fp8_block = None
    if quant:
        block = quant.get("weight_block_size")
        if quant.get("quant_method") != "fp8" or not block:
            problems.append(f"quantization {quant.get('quant_method')!r} (only block FP8 is read)")
        elif (isinstance(block, list) and len(block) == 2
              and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            fp8_block = (block[0], block[1])
        else:
            errors.append("field 'quantization_config.weight_block_size' must be [rows, columns] "
                          f"(positive integers), got {block!r}")
    if dtype is None:
        dtype = g("dtype") or g("torch_dtype")
        dtype = "bfloat16" if fp8_block else (dtype if dtype in _DTYPE_NAMES else "float32")
    if g("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={g('hidden_act')!r} (only silu)")
    n_heads = f.integer("num_attention_heads")
    kw: dict[str, Any] = dict(
        vocab_size=f.integer("vocab_size"),
        d_model=f.integer("hidden_size"),
        n_layers=f.integer("num_hidden_layers"),
        n_heads=n_heads,
        max_seq_len=f.integer("max_position_embeddings", 4096),
        ffn_dim=f.integer("intermediate_size"),
        norm_eps=f.number("rms_norm_eps", 1e-6, positive=True),
        tie_embeddings=bool(g("tie_word_embeddings", False)),
        scale_embeddings=False,
        init_std=f.number("initializer_range", 0.02),
        dtype=dtype,
        param_dtype=dtype,
    )
    kw.update(_rope_from_hf(hf, family, problems, errors))
    layout = Layout(family, fp8_block=fp8_block)

    if family == "deepseek_v3":
        if g("attention_bias"):
            problems.append("attention_bias=True")
        if g("scoring_func", "sigmoid") != "sigmoid":
            problems.append(f"scoring_func={g('scoring_func')!r}")
        if g("moe_layer_freq", 1) != 1:
            problems.append(f"moe_layer_freq={g('moe_layer_freq')}")
        kw.update(attention="mla", q_lora_rank=f.integer("q_lora_rank", 0, lo=0),
                  kv_lora_rank=f.integer("kv_lora_rank"), qk_nope_head_dim=f.integer("qk_nope_head_dim"),
                  qk_rope_head_dim=f.integer("qk_rope_head_dim"), v_head_dim=f.integer("v_head_dim"))
        experts = f.integer("n_routed_experts", 0, lo=0)
        if experts:
            top_k = f.integer("num_experts_per_tok")
            kw.update(n_routed_experts=experts, n_shared_experts=f.integer("n_shared_experts", 0, lo=0),
                      top_k=top_k, moe_ffn_dim=f.integer("moe_intermediate_size"), router_score="sigmoid",
                      norm_topk_prob=bool(g("norm_topk_prob", True)),
                      routed_scaling_factor=f.number("routed_scaling_factor", 1.0),
                      n_group=f.integer("n_group", 0, lo=0) or 1,
                      topk_group=f.integer("topk_group", 0, lo=0) or 1,
                      first_k_dense=min(f.integer("first_k_dense_replace", 0, lo=0), kw["n_layers"]),
                      capacity_factor=experts / top_k)
        mtp = f.integer("num_nextn_predict_layers", None, lo=0)
        layout = dataclasses.replace(
            layout, rope_interleave=bool(g("rope_interleave", True)),
            n_extra_layers=mtp if mtp is not None else f.integer("num_mtp_layers", 0, lo=0))
    else:
        head_dim = f.integer("head_dim", None) or (128 if family == "qwen3" else kw["d_model"] // n_heads)
        kw.update(attention="mha", n_kv_heads=f.integer("num_key_value_heads", None) or n_heads,
                  head_dim=head_dim, attn_bias=family == "qwen2",
                  qk_norm=family in ("qwen3", "qwen3_moe"))
        if family != "qwen2" and g("attention_bias"):
            problems.append("attention_bias=True (a bias on o_proj)")
        if g("mlp_bias"):
            problems.append("mlp_bias=True")
        layer_types = g("layer_types")
        if g("use_sliding_window") or (isinstance(layer_types, list) and "sliding_attention" in layer_types):
            problems.append("sliding-window attention")
        if family == "qwen3_moe":
            experts = f.integer("num_experts", None) or f.integer("num_local_experts", None)
            if experts is None:
                experts = f.bad("num_experts", "missing required field {} (or 'num_local_experts')")
            top_k, n = f.integer("num_experts_per_tok"), kw["n_layers"]
            dense = g("mlp_only_layers") or []
            if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
                f.bad("mlp_only_layers", f"field {{}} must be a list of layer indices, got {dense!r}")
                dense = []
            dense = sorted(dense)
            first_k = len(dense)
            if dense != list(range(first_k)) or g("decoder_sparse_step", 1) != 1:
                problems.append(f"dense layers {dense} with decoder_sparse_step="
                                f"{g('decoder_sparse_step', 1)} (only a leading block of dense layers)")
            kw.update(n_routed_experts=experts, top_k=top_k, moe_ffn_dim=f.integer("moe_intermediate_size"),
                      router_score="softmax", norm_topk_prob=bool(g("norm_topk_prob", False)),
                      first_k_dense=min(first_k, n), bias_update_rate=0.0,
                      capacity_factor=experts / top_k)
    return kw, layout


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
        self.name = f"tensor {tm.hf} {shape}"

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
        self.name = items[0].name + (" ..." if len(items) > 1 else "")
        for s in items[1:]:
            if tuple(s.shape) != tuple(items[0].shape):
                raise ValueError(f"{s.name} does not match the shape of {items[0].name}, "
                                 "which it is stacked with")

    def read(self, index: tuple[slice, ...]) -> np.ndarray:
        return np.stack([s.read(tuple(index[1:])) for s in self.items[index[0]]])


class _Zeros:
    def __init__(self, shape: tuple[int, ...]):
        self.shape = shape
        self.name = "zeros"

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
    """`path/config.json` as a dict (`ValueError` naming the file if it is missing, not
    JSON or not a JSON object)."""
    fname = os.path.join(path, "config.json")
    if not os.path.isfile(fname):
        raise ValueError(f"{path} is not a Hugging Face checkpoint directory (no config.json)")
    return read_json_object(fname, "a Hugging Face config")


_FLOATS = tuple(np.dtype(t) for t in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16))
_FP8 = tuple(np.dtype(t) for t in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2))


def _dtype_problems(reader: SafetensorsReader, maps: list[TensorMap], layout: Layout) -> list[str]:
    """The tensors whose dtype does not fit their role, each named with its file: every
    tensor read is a float weight (or bias), so it must be floating point; float8 only
    2-D, in a block-FP8 checkpoint, with its `_scale_inv` of one float per block."""
    bad = []
    for tm in maps:
        name, dt = tm.hf, reader.dtype(tm.hf)
        where = f"{name} ({os.path.basename(reader.file(name))}, {dt})"
        if dt in _FLOATS:
            continue
        if dt not in _FP8:
            bad.append(f"{where}: not a floating-point dtype")
            continue
        scale = name + "_scale_inv"
        shape = reader.shape(name)
        if not layout.fp8_block:
            bad.append(f"{where}: float8 without a block-FP8 quantization_config in config.json")
        elif scale not in reader:
            bad.append(f"{where}: float8 without its {scale}")
        elif len(shape) != 2:
            bad.append(f"{where}: float8 with shape {shape} (only matrices are block-quantized)")
        elif reader.dtype(scale) not in _FLOATS:
            bad.append(f"{scale} ({reader.dtype(scale)}): not a floating-point dtype")
        else:
            want = tuple(-(-n // b) for n, b in zip(shape, layout.fp8_block, strict=True))
            if reader.shape(scale) != want:
                bad.append(f"{scale}: shape {reader.shape(scale)}, but {shape} in blocks of "
                           f"{layout.fp8_block} needs {want}")
    return bad


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
      ValueError: naming the file (and field or tensor): a missing, non-JSON or malformed
        `config.json` (missing required fields, wrong types), an unsupported architecture or
        features, missing / unexpected tensors (all listed), a truncated or malformed
        safetensors file, a tensor whose dtype does not fit its role (a weight that is not
        floating point, float8 without its block scale) or whose shape does not fit the config.
    """
    hf = read_hf_config(path)
    cfg, layout = config_from_hf(hf, dtype, source=os.path.join(path, "config.json"))
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
    bad = _dtype_problems(reader, maps, layout)
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensor(s) with a dtype that does not fit their role: "
                         + "; ".join(bad[:20]) + (" ..." if len(bad) > 20 else ""))

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
            raise ValueError(f"{_name(kp)}: checkpoint shape {tuple(src.shape)} ({src.name}) != "
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

    LoRA adapters (`model.lora`) are merged into their kernels (`W + alpha/r * A @ B`).
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
    if cfg.lora_rank:  # HF models have no adapters: write the adapted model's weights
        variables = dict(variables, params=lora.merge_lora(cfg, variables["params"]))
        cfg = lora.base_config(cfg)
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

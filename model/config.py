"""`ModelConfig`: the frozen, validated description of a decoder-only transformer.

One config describes dense Llama-style models (MHA/GQA + SwiGLU), DeepSeek-V3 style models
(MLA + shared/routed MoE with loss-free balancing) and everything between. Invalid
combinations raise `ValueError` naming the offending fields, at construction time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

_DTYPES = ("float32", "bfloat16", "float16")
#: `ModelConfig.lora_targets` default: every attention projection and dense SwiGLU matrix.
LORA_DEFAULT_TARGETS = r"layers/(attn|mlp)/\w+"


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of `model.Transformer`.

    Attention is `"mha"` (MHA when `n_kv_heads == n_heads`, GQA/MQA otherwise) or `"mla"`
    (DeepSeek-V2/V3 Multi-head Latent Attention). The FFN of layer `i` is a dense SwiGLU
    when `n_routed_experts == 0` or `i < first_k_dense`, else a DeepSeek-V3 MoE.
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 256

    # --- attention ---
    attention: Literal["mha", "mla"] = "mha"
    n_kv_heads: int | None = None  # MHA/GQA; None -> n_heads
    head_dim: int | None = None  # MHA/GQA; None -> d_model // n_heads
    attn_bias: bool = False  # biases on q/k/v projections (Qwen2-style)
    qk_norm: bool = False  # RMSNorm on q and k per head (Qwen3 / OLMo-2 style), MHA only
    # MLA (DeepSeek-V2 Sec. 2.1): q = W_uq RMSNorm(W_dq x); c_kv = RMSNorm(W_dkv x)
    q_lora_rank: int = 0  # 0 -> q projected directly from x
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    # RoPE context extension (HF `rope_scaling`), as in `transformers.modeling_rope_utils`:
    # "linear" (position interpolation, Chen et al. 2023), "llama3" (Llama 3.1), "yarn"
    # (Peng et al. 2023, with DeepSeek-V3's mscale on the softmax scale).
    rope_scaling: Literal["none", "linear", "llama3", "yarn"] = "none"
    rope_factor: float = 1.0
    rope_original_max_len: int = 0  # llama3 / yarn: context length before the extension
    rope_beta_fast: float = 32.0  # yarn: correction range, in rotations
    rope_beta_slow: float = 1.0
    rope_mscale: float = 0.0  # yarn: see `rope_attention_factor` (0 = unset)
    rope_mscale_all_dim: float = 0.0  # yarn: softmax scale x mscale(factor, this)^2 (0 = unset)
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    attn_logit_scale: Literal["sqrt", "inverse"] = "sqrt"  # 1/sqrt(d) or muP's 1/d
    # Training/eval attention backend (model/attention.py): "auto" (per device and shape:
    # cuDNN on a GPU where it can run the case, else blockwise "flash" for long sequences,
    # else "explicit"), "explicit" (einsum + masked softmax, [T, T] scores), "flash"
    # (blockwise, O(T) memory, any device), "cudnn" (NVIDIA GPUs; "dot_product" is its old
    # name). Cached decoding always uses the explicit path.
    attn_impl: Literal["auto", "explicit", "flash", "cudnn", "dot_product"] = "auto"
    # The per-head max logit (QK-clip's statistic): None -> reported where it is free
    # (explicit, flash); True -> always, exactly (cuDNN adds a blockwise side pass);
    # False -> not needed. The trainer sets True when QK-clip is on.
    attn_max_logits: bool | None = None

    # --- FFN / MoE (DeepSeek-V3 Sec. 2.1.2) ---
    ffn_dim: int = 256  # dense SwiGLU hidden size
    n_routed_experts: int = 0  # 0 -> dense model
    n_shared_experts: int = 0
    moe_ffn_dim: int = 64  # hidden size of each routed / shared expert
    top_k: int = 2
    router_score: Literal["sigmoid", "softmax"] = "sigmoid"
    norm_topk_prob: bool = True  # renormalize gates over the selected experts
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited routing: experts split into n_group groups ...
    topk_group: int = 1  # ... of which topk_group are eligible per token
    first_k_dense: int = 0
    aux_loss_alpha: float = 0.0  # sequence-wise balance loss weight (V3 uses 1e-4)
    bias_update_rate: float = 1e-3  # u of the loss-free balancing update
    capacity_factor: float = 2.0  # expert capacity = ceil(cf * tokens * top_k / experts)
    # Token dispatch to the routed experts (model/moe.py, `choose_moe`): "auto" (per device:
    # dropless on CPU and TPU and on Hopper GPUs with the Pallas grouped GEMM, capacity on
    # other GPUs), "capacity" (per-expert buffers of the size above, overflow dropped),
    # "dropless" (sorted by expert, a grouped GEMM, nothing dropped), "dense" (every token
    # through every expert, one-hot gates).
    moe_dispatch: Literal["auto", "capacity", "dropless", "dense"] = "auto"
    # The grouped GEMM of the dropless dispatch (model/grouped_matmul.py): "auto", "blocks"
    # (a loop over row blocks: CPU), "ragged_dot" (jax.lax.ragged_dot), "megablox" (TPU
    # Pallas; interpret mode on CPU), "pallas_gpu" (Hopper Pallas).
    moe_gemm: Literal["auto", "blocks", "ragged_dot", "megablox", "pallas_gpu"] = "auto"

    # --- embeddings / head / norms ---
    tie_embeddings: bool = False
    scale_embeddings: bool = True  # x sqrt(d_model) (Vaswani et al. 3.4; Takase et al.)
    norm_eps: float = 1e-6
    init_std: float = 0.02
    mup_base_d_model: int = 0  # muP (Tensor Programs V): base width; 0 -> standard param.

    # --- numerics / memory ---
    dtype: str = "float32"  # activation / compute dtype
    param_dtype: str = "float32"
    remat: Literal["none", "full", "dots"] = "none"
    scan_layers: bool = False

    # --- LoRA adapters (Hu et al. 2021; see model/lora.py) ---
    # y = x W + (lora_alpha / lora_rank) * dropout(x) A B on every dense projection whose
    # module path (`layers/attn/q_proj`, `layers/mlp/up_proj`, `layers/moe/shared/down_proj`;
    # `model.lora.projection_paths(cfg)` lists them) fully matches the regex `lora_targets`.
    lora_rank: int = 0  # r; 0 -> no adapters
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0  # on the adapter's input; only with a "dropout" rng (model/lora.py)
    lora_targets: str = LORA_DEFAULT_TARGETS

    def __post_init__(self) -> None:
        errors: list[str] = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                errors.append(msg)

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "ffn_dim"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be > 0")
        need(self.attention in ("mha", "mla"), f"attention={self.attention!r} must be 'mha' or 'mla'")
        need(self.dtype in _DTYPES, f"dtype={self.dtype!r} must be one of {_DTYPES}")
        need(self.param_dtype in _DTYPES, f"param_dtype={self.param_dtype!r} must be one of {_DTYPES}")
        need(self.remat in ("none", "full", "dots"), f"remat={self.remat!r} must be none|full|dots")
        need(
            self.attn_logit_scale in ("sqrt", "inverse"),
            f"attn_logit_scale={self.attn_logit_scale!r} must be 'sqrt' or 'inverse'",
        )
        impls = ("auto", "explicit", "flash", "cudnn", "dot_product")
        need(self.attn_impl in impls, f"attn_impl={self.attn_impl!r} must be one of {impls}")
        need(self.attn_max_logits in (None, True, False),
             f"attn_max_logits={self.attn_max_logits!r} must be None, True or False")
        need(
            self.rope_scaling in ("none", "linear", "llama3", "yarn"),
            f"rope_scaling={self.rope_scaling!r} must be none|linear|llama3|yarn",
        )
        if self.rope_scaling != "none":
            need(self.rope_factor > 0, f"rope_factor={self.rope_factor} must be > 0")
        if self.rope_scaling in ("llama3", "yarn"):
            need(self.rope_original_max_len > 0,
                 f"rope_original_max_len={self.rope_original_max_len} must be > 0 for "
                 f"rope_scaling={self.rope_scaling!r}")
        if self.rope_scaling == "llama3":
            need(self.rope_high_freq_factor > self.rope_low_freq_factor,
                 "rope_high_freq_factor must be > rope_low_freq_factor")
        if self.attention == "mha":
            kv = self.num_kv_heads
            need(kv > 0, f"n_kv_heads={kv} must be > 0")
            if kv > 0:
                need(
                    self.n_heads % kv == 0,
                    f"n_heads={self.n_heads} must be divisible by n_kv_heads={kv}",
                )
            if self.head_dim is None:
                need(
                    self.d_model % self.n_heads == 0,
                    f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                    "(or set head_dim)",
                )
            need(self.attn_head_dim % 2 == 0, f"head_dim={self.attn_head_dim} must be even (RoPE)")
        else:
            need(self.qk_rope_head_dim % 2 == 0,
                 f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE)")
            for name in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be > 0 for MLA")
            need(self.q_lora_rank >= 0, f"q_lora_rank={self.q_lora_rank} must be >= 0")
            need(not self.qk_norm, "qk_norm=True is only supported with attention='mha'")
            need(not self.attn_bias, "attn_bias=True is only supported with attention='mha'")
        if self.n_routed_experts != 0:
            need(self.n_routed_experts > 0, f"n_routed_experts={self.n_routed_experts} must be >= 0")
            need(
                0 < self.top_k <= self.n_routed_experts,
                f"top_k={self.top_k} must be in [1, n_routed_experts={self.n_routed_experts}]",
            )
            need(self.moe_ffn_dim > 0, f"moe_ffn_dim={self.moe_ffn_dim} must be > 0")
            need(self.n_shared_experts >= 0, f"n_shared_experts={self.n_shared_experts} must be >= 0")
            need(
                self.router_score in ("sigmoid", "softmax"),
                f"router_score={self.router_score!r} must be 'sigmoid' or 'softmax'",
            )
            need(self.n_group >= 1, f"n_group={self.n_group} must be >= 1")
            if self.n_group >= 1:
                need(
                    self.n_routed_experts % self.n_group == 0,
                    f"n_routed_experts={self.n_routed_experts} must be divisible by "
                    f"n_group={self.n_group}",
                )
                need(
                    1 <= self.topk_group <= self.n_group,
                    f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]",
                )
                per_group = self.n_routed_experts // max(self.n_group, 1)
                need(
                    self.top_k <= self.topk_group * per_group,
                    f"top_k={self.top_k} exceeds the experts eligible under group routing "
                    f"(topk_group={self.topk_group} x {per_group} experts per group)",
                )
                if self.n_group > 1:
                    need(per_group >= 2,
                         f"group-limited routing needs >= 2 experts per group "
                         f"(n_routed_experts={self.n_routed_experts}, n_group={self.n_group})")
            need(
                0 <= self.first_k_dense <= self.n_layers,
                f"first_k_dense={self.first_k_dense} must be in [0, n_layers={self.n_layers}]",
            )
            need(self.capacity_factor > 0, f"capacity_factor={self.capacity_factor} must be > 0")
            need(self.moe_dispatch in ("auto", "capacity", "dropless", "dense"),
                 f"moe_dispatch={self.moe_dispatch!r} must be auto|capacity|dropless|dense")
            gemms = ("auto", "blocks", "ragged_dot", "megablox", "pallas_gpu")
            need(self.moe_gemm in gemms, f"moe_gemm={self.moe_gemm!r} must be one of {gemms}")
        need(self.mup_base_d_model >= 0, f"mup_base_d_model={self.mup_base_d_model} must be >= 0")
        need(self.norm_eps > 0, f"norm_eps={self.norm_eps} must be > 0")
        errors.extend(self._lora_errors())
        if errors:
            raise ValueError("invalid ModelConfig: " + "; ".join(errors))

    def _lora_errors(self) -> list[str]:
        """What is wrong with the LoRA fields (`model.lora` checks the targets' matches)."""
        errors = []
        if not isinstance(self.lora_rank, int) or isinstance(self.lora_rank, bool):
            return [f"lora_rank={self.lora_rank!r} must be an int (0: no adapters)"]
        if self.lora_rank < 0:
            errors.append(f"lora_rank={self.lora_rank} must be >= 0 (0: no adapters)")
        if not self.lora_alpha > 0:
            errors.append(f"lora_alpha={self.lora_alpha} must be > 0")
        if not 0 <= self.lora_dropout < 1:
            errors.append(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.lora_rank > 0 and not errors:
            from model.lora import target_errors  # model.lora imports this module

            errors.extend(target_errors(self))
        return errors

    # ---- derived quantities -------------------------------------------------------------
    @property
    def num_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def attn_head_dim(self) -> int:
        """Per-head q/k/v size for MHA/GQA."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def qk_head_dim(self) -> int:
        """Size of the q.k dot product per head (sets the softmax scale)."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.attn_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d) (or muP's 1/d); with YaRN and `rope_mscale_all_dim`, times
        mscale(factor, mscale_all_dim)^2 (DeepSeek-V3; `yarn_apply_mscale` in transformers)."""
        d = self.qk_head_dim
        scale = 1.0 / math.sqrt(d) if self.attn_logit_scale == "sqrt" else 1.0 / d
        if self.rope_scaling == "yarn" and self.rope_mscale_all_dim:
            scale *= yarn_mscale(self.rope_factor, self.rope_mscale_all_dim) ** 2
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """Multiplier on the rotated q and k (HF's YaRN `attention_factor`):
        mscale(f, rope_mscale) / mscale(f, rope_mscale_all_dim) when both are set, else
        mscale(f) = 0.1 ln f + 1; 1 without YaRN."""
        if self.rope_scaling != "yarn":
            return 1.0
        f = self.rope_factor
        if self.rope_mscale and self.rope_mscale_all_dim:
            return yarn_mscale(f, self.rope_mscale) / yarn_mscale(f, self.rope_mscale_all_dim)
        return yarn_mscale(f)

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def n_dense_layers(self) -> int:
        return self.first_k_dense if self.is_moe else self.n_layers

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def width_multiplier(self) -> float:
        """muP width multiplier m = d_model / base d_model (1 when muP is off)."""
        return self.d_model / self.mup_base_d_model if self.mup_base_d_model else 1.0

    @property
    def cache_values_per_token(self) -> int:
        """Values cached per token per layer for decoding (MLA: kv_lora_rank + rope dim)."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.attn_head_dim

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Builds a config from a mapping; an unknown key is a `ValueError` naming it."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**dict(d))

    def param_counts(self) -> dict[str, int]:
        """Total and active (per token) parameter counts, from the shapes alone."""
        d, v = self.d_model, self.vocab_size
        if self.attention == "mla":
            h = self.n_heads
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = (d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * qk
                 if self.q_lora_rank else d * h * qk)
            kv = (d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
                  + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim))
            attn = q + kv + h * self.v_head_dim * d
        else:
            hd, h, kvh = self.attn_head_dim, self.n_heads, self.num_kv_heads
            attn = d * h * hd + 2 * d * kvh * hd + h * hd * d
            if self.attn_bias:
                attn += h * hd + 2 * kvh * hd
            if self.qk_norm:
                attn += 2 * hd
        dense_ffn = 3 * d * self.ffn_dim
        expert = 3 * d * self.moe_ffn_dim
        moe_total = (self.n_routed_experts + self.n_shared_experts) * expert + d * self.n_routed_experts
        moe_active = (self.top_k + self.n_shared_experts) * expert + d * self.n_routed_experts
        norms = 2 * d
        embed = v * d
        head = 0 if self.tie_embeddings else d * v
        base = embed + head + d + self.n_layers * (attn + norms)
        total = base + self.n_dense_layers * dense_ffn + self.n_moe_layers * moe_total
        active = base + self.n_dense_layers * dense_ffn + self.n_moe_layers * moe_active
        return {"total": total, "active": active, "embedding": embed}

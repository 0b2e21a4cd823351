"""Small building blocks: RMSNorm, rotary embeddings, projections, the SwiGLU FFN."""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from model import lora
from model.config import ModelConfig
from model.matmul import matmul


class Linear(nn.Module):
    """`y = x W (+ b)` with an `[in, out]` kernel that carries logical axis names; the product
    is `model.matmul.matmul` (which holds the backend-specific kernel workarounds).

    With `lora_rank > 0` and its module path matching `lora_targets` (`model.lora`), it also
    holds LoRA factors `lora_a [in, r]` ~ N(0, 1/in) and `lora_b [r, out]` = 0 and computes
    `y = x W + (lora_alpha / r) * dropout(x) A B (+ b)` (Hu et al., 2021); the dropout
    (`lora_dropout`) only when the caller passes a `"dropout"` rng.

    Defined with `setup` so that the kernel itself can be read (`module.kernel`), which
    MLA's absorbed decoding needs: it is the effective kernel, `W + (alpha / r) A B` with
    adapters.
    """

    in_features: int
    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = False
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ""

    def setup(self) -> None:
        pd = jnp.dtype(self.param_dtype)
        self.weight = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
            (self.in_features, self.features),
            pd,
        )
        if self.use_bias:
            self.bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                (self.features,),
                pd,
            )
        self.adapted = self.lora_rank > 0 and lora.is_target(
            self.lora_targets, lora.module_key(self.path))
        if self.adapted:
            r = self.lora_rank
            self.lora_a = self.param(
                "lora_a",
                nn.with_logical_partitioning(
                    nn.initializers.normal(1.0 / math.sqrt(self.in_features)), (self.axes[0], None)),
                (self.in_features, r),
                pd,
            )
            self.lora_b = self.param(
                "lora_b",
                nn.with_logical_partitioning(nn.initializers.zeros, (None, self.axes[1])),
                (r, self.features),
                pd,
            )

    @property
    def kernel(self) -> jax.Array:
        """The effective `[in, out]` kernel: `W`, or `W + (alpha / r) A B` with adapters."""
        if not self.adapted:
            return self.weight
        return lora.merged_kernel(self.weight, self.lora_a, self.lora_b,
                                  self.lora_alpha / self.lora_rank)

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.dtype)
        y = matmul(x.astype(dt), self.weight.astype(dt))
        if self.adapted:
            h = x.astype(dt)
            p = self.lora_dropout
            if p > 0 and self.has_rng("dropout"):
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - p, h.shape)
                h = jnp.where(keep, h / jnp.asarray(1.0 - p, dt), jnp.zeros((), dt))
            delta = matmul(matmul(h, self.lora_a.astype(dt)), self.lora_b.astype(dt))
            y = y + delta * jnp.asarray(self.lora_alpha / self.lora_rank, dt)
        if self.use_bias:
            y = y + self.bias.astype(dt)
        return y


def hidden_std(cfg: ModelConfig) -> float:
    """Init std of hidden matrices: init_std / sqrt(m) for muP width multiplier m
    (Tensor Programs V, Table 3: hidden weights' variance scales as 1/fan_in)."""
    return cfg.init_std / cfg.width_multiplier**0.5


def dense(
    cfg: ModelConfig,
    in_features: int,
    features: int,
    axes: tuple[str | None, str | None],
    name: str,
    use_bias: bool = False,
    std: float | None = None,
) -> Linear:
    """A `Linear` with the config's dtypes, muP-aware init and LoRA settings (adapters when
    `cfg.lora_rank > 0` and its path matches `cfg.lora_targets`)."""
    return Linear(
        in_features=in_features,
        features=features,
        axes=axes,
        use_bias=use_bias,
        init_std=hidden_std(cfg) if std is None else std,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        lora_rank=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        lora_targets=cfg.lora_targets,
        name=name,
    )


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich, 2019): x / sqrt(mean(x^2) + eps) * g, computed in float32."""

    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(dim: int, theta: float, cfg: ModelConfig | None = None) -> jax.Array:
    """Inverse frequencies theta^(-2i/dim), i = 0..dim/2-1 (Su et al., RoFormer).

    With `cfg.rope_scaling` (as `transformers.modeling_rope_utils` computes them): "linear"
    divides every frequency by the factor (Chen et al., 2023); "llama3" divides the
    frequencies whose wavelength exceeds original_len / low_freq_factor and interpolates
    smoothly up to original_len / high_freq_factor (Llama 3.1); "yarn" blends the divided and
    the original frequencies with a linear ramp over the dimensions between the beta_fast and
    beta_slow correction bounds (Peng et al., 2023, "YaRN", Sec. 3.2).
    """
    inv = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    kind = "none" if cfg is None else cfg.rope_scaling
    if kind == "linear":
        inv = inv / cfg.rope_factor
    elif kind == "llama3":
        f, old = cfg.rope_factor, cfg.rope_original_max_len
        lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = jnp.where(medium, smoothed, scaled)
    elif kind == "yarn":
        f, old = cfg.rope_factor, cfg.rope_original_max_len

        def correction_dim(rotations: float) -> float:
            return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
        high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
        high = high + 0.001 if low == high else high
        ramp = jnp.clip((jnp.arange(dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp  # 1: keep the original frequency, 0: divide by the factor
        inv = inv / f * (1 - extrapolation) + inv * extrapolation
    return inv


def apply_rope(
    x: jax.Array, positions: jax.Array, theta: float, cfg: ModelConfig | None = None
) -> jax.Array:
    """Rotary position embedding, rotate-half layout (as Llama in HF transformers).

    Args:
      x: `[batch, length, heads, dim]`.
      positions: `[batch, length]` integer positions.
      cfg: supplies the optional RoPE scaling (`rope_frequencies`) and YaRN's multiplier
        `cfg.rope_attention_factor` on the result; None: plain RoPE.
    Returns:
      `x` rotated, same shape and dtype.
    """
    dim = x.shape[-1]
    inv = rope_frequencies(dim, theta, cfg)
    ang = positions.astype(jnp.float32)[..., None] * inv  # [b, l, dim/2]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : dim // 2], xf[..., dim // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    if cfg is not None and cfg.rope_attention_factor != 1.0:
        out = out * cfg.rope_attention_factor
    return out.astype(x.dtype)


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN (Shazeer, 2020): W_down(silu(W_gate x) * W_up x)."""

    cfg: ModelConfig
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        d = cfg.d_model
        g = dense(cfg, d, self.hidden, ("embed", "mlp"), "gate_proj")(x)
        u = dense(cfg, d, self.hidden, ("embed", "mlp"), "up_proj")(x)
        h = constrain(nn.silu(g) * u, ("batch", "length", "act_mlp"))
        return dense(cfg, self.hidden, d, ("mlp", "embed"), "down_proj")(h)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint by logical names (no-op outside a mesh context)."""
    return nn.with_logical_constraint(x, tuple(axes))

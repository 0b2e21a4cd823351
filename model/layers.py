"""Small building blocks: RMSNorm, rotary embeddings, projections, the SwiGLU FFN."""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def transposed_dot(a: jax.Array, b: jax.Array, preferred_element_type=None) -> jax.Array:
    """`a^T b` for `a [n, p]`, `b [n, q]` -> `[p, q]`: a weight gradient (inputs^T @ output
    gradients, summed over the `n` tokens).

    On the CPU backend `a^T` is materialized behind an optimization barrier first, so that
    XLA gets the canonical `[p, n] @ [n, q]` product. Left to itself, XLA:CPU folds the
    transpose into the dot and, when `b` has other consumers, lays `b` out transposed
    instead, producing a `dot(a: contract 0, b^T: contract 1)` that no fast kernel
    (YNNPACK/XNNPACK) accepts: the Eigen fallback ran it at ~40% of the canonical form's
    rate (1024 x 512 x 1536: 180 vs 460 GFLOP/s on 2 Zen 5 cores), and the weight
    gradients are a third of a transformer's matmul FLOPs. Other backends get the plain
    `einsum` (their GEMMs take transposed operands natively).
    """
    if jax.default_backend() == "cpu":
        a = jax.lax.optimization_barrier(a.T)
        return jnp.dot(a, b, preferred_element_type=preferred_element_type)
    return jnp.einsum("np,nq->pq", a, b, preferred_element_type=preferred_element_type)


def _accum_dtype(dtype) -> jnp.dtype:
    """float32 for floating dtypes narrower than 32 bits (bfloat16, float16), else `dtype`."""
    dtype = jnp.dtype(dtype)
    narrow = jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32
    return jnp.dtype(jnp.float32) if narrow else dtype


def _dot_f32_acc(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b` in the inputs' dtype; on the CPU backend a narrow float dot is accumulated
    into a float32 result first and cast after. XLA:CPU runs a bfloat16 -> bfloat16 dot at
    about half the rate of the same dot with a float32 result (1024 x 512 x 1536 on 2 Zen 5
    cores: 400 vs 890 GFLOP/s); GPU and TPU GEMMs accumulate in float32 and write bfloat16
    natively."""
    out = jnp.result_type(a, b)
    acc = _accum_dtype(out)
    if jax.default_backend() == "cpu" and acc != out:
        return jnp.dot(a, b, preferred_element_type=acc).astype(out)
    return jnp.dot(a, b)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` for `x [..., in]`, `w [in, out]` -> `[..., out]`, whose weight gradient is
    formed by `transposed_dot` (the `x [tokens, in]` flattened over its leading axes)."""
    return _dot_f32_acc(x, w)


def _matmul_fwd(x: jax.Array, w: jax.Array):
    return _dot_f32_acc(x, w), (x, w)


def _matmul_bwd(res, dy: jax.Array):
    x, w = res
    dx = _dot_f32_acc(dy, w.T)
    dw = transposed_dot(x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]),
                        preferred_element_type=_accum_dtype(w.dtype)).astype(w.dtype)
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nn.Module):
    """`y = x W (+ b)` with an `[in, out]` kernel that carries logical axis names.

    Defined with `setup` so that the kernel itself can be read (`module.kernel`), which
    MLA's absorbed decoding needs.
    """

    in_features: int
    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = False
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"

    def setup(self) -> None:
        pd = jnp.dtype(self.param_dtype)
        self.kernel = self.param(
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

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.dtype)
        y = matmul(x.astype(dt), self.kernel.astype(dt))
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
    """A `Linear` with the config's dtypes and muP-aware init."""
    return Linear(
        in_features=in_features,
        features=features,
        axes=axes,
        use_bias=use_bias,
        init_std=hidden_std(cfg) if std is None else std,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
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

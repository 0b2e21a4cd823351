"""Attention: MHA/GQA and Multi-head Latent Attention (MLA), each with a decoding cache.

Both modules map `x [batch, length, d_model]` to `(y [batch, length, d_model],
max_logits [heads])`, where `max_logits[h]` is the largest scaled logit `q.k * scale`
of head `h` over the whole (global) batch and all unmasked query/key pairs: the
statistic QK-clip (Kimi K2) needs. With `cfg.attn_impl == "dot_product"` the training
forward goes through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU, XLA's
elsewhere and where cuDNN cannot run the case, with a warning; `fused_attention`) and
`max_logits` is NaN (not computed).

Masks. Training/eval (`decode=False`): causal within the row and, when `segment_ids`
are given (packed documents), only between tokens of the same segment. Decoding
(`decode=True`): the new keys are written into the cache at their `positions`, and a
query at position p attends to cache slots 0..p of its own row, so rows may sit at
different positions.
"""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import RMSNorm, apply_rope, constrain, dense


def causal_mask(length: int, segment_ids: jax.Array | None, batch: int) -> jax.Array:
    """`[batch, length, length]` mask: key index <= query index, same segment."""
    idx = jnp.arange(length)
    mask = jnp.broadcast_to(idx[None, :, None] >= idx[None, None, :], (batch, length, length))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask


def decode_mask(positions: jax.Array, cache_len: int) -> jax.Array:
    """`[batch, length, cache_len]` mask: cache slot <= query position."""
    return jnp.arange(cache_len)[None, None, :] <= positions[:, :, None]


def write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Writes `new [batch, length, ...]` into `cache [batch, cache_len, ...]` at `positions`
    (per row; positions past the end are dropped)."""
    return jax.vmap(lambda c, n, p: c.at[p].set(n.astype(c.dtype), mode="drop"))(
        cache, new, positions
    )


def masked_exp(logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax of float32 `logits [batch, heads..., q, k]` under `mask [batch, q, k]`, left
    unnormalized: returns `(exp(logit - row max)` (0 where masked), the row sums
    `denom [batch, heads..., q]`, the per-head max logit over batch, q, k`). The caller
    divides the attention output by `denom` after the PV product, a pass over `[q, d_v]`
    instead of `[q, k]`; the row max is the softmax's own shift (its gradient cancels, so it
    is a stop_gradient) and also gives the max-logit statistic at no extra pass."""
    extra = logits.ndim - 3  # number of head axes
    m = mask.reshape(mask.shape[:1] + (1,) * extra + mask.shape[1:])
    masked = jnp.where(m, logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
    max_logits = jnp.max(row_max[..., 0], axis=(0,) + tuple(range(1 + extra, logits.ndim - 1)))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # a row with no visible key
    e = jnp.exp(masked - row_max)
    denom = jnp.sum(e, axis=-1)
    return e, jnp.where(denom > 0, denom, 1.0), max_logits


# Exceptions with which `jax.nn.dot_product_attention(implementation="cudnn")` says, at trace
# time, that cuDNN cannot run this case here: RuntimeError ("cuDNN is not detected"),
# NotImplementedError (dtype, head dim, GPU generation or cuDNN version unsupported),
# ValueError (layout, mask or sharding it does not take).
_CUDNN_UNSUPPORTED = (RuntimeError, NotImplementedError, ValueError)


def _auto_implementation() -> str:
    """The kernel `fused_attention(implementation=None)` tries first: cuDNN on GPU, else XLA."""
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def fused_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, scale: float,
    implementation: str | None = None,
) -> jax.Array:
    """Causal (and same-segment) attention through `jax.nn.dot_product_attention`: `q [b, t,
    h, d]`, `k, v [b, t, kv_heads, d]` -> `[b, t, h, d]`. No max-logit statistic comes out of
    it.

    Args:
      implementation: `"cudnn"` (cuDNN flash attention; raises with cuDNN's reason when it
        cannot run the case), `"xla"`, or None (what `attn_impl="dot_product"` uses): cuDNN
        on GPU, else XLA; when cuDNN cannot run the case it falls back to XLA and says so
        with a `UserWarning` naming cuDNN's reason (Python shows it once per reason).
    """
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    call = lambda impl: jax.nn.dot_product_attention(  # noqa: E731
        q, k, v, mask=mask, scale=scale, is_causal=True, implementation=impl)
    if implementation is not None:
        return call(implementation)
    impl = _auto_implementation()
    if impl == "cudnn":
        try:
            return call("cudnn")
        except _CUDNN_UNSUPPORTED as e:
            warnings.warn(
                f"attn_impl='dot_product': cuDNN flash attention cannot run here "
                f"({type(e).__name__}: {e}); using XLA's attention instead", stacklevel=2)
            impl = "xla"
    return call(impl)


def _no_max_logits(n_heads: int) -> jax.Array:
    """The max-logit statistic of a fused kernel, which does not produce it: NaN."""
    return jnp.full((n_heads,), jnp.nan, jnp.float32)


def _heads_last(denom: jax.Array) -> jax.Array:
    """`[batch, heads..., q] -> [batch, q, heads..., 1]`, to divide an attention output."""
    return jnp.moveaxis(denom, -1, 1)[..., None]


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (MHA when n_kv_heads == n_heads, GQA
    otherwise; Ainslie et al., 2023), RoPE and optional per-head QK RMSNorm."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        decode: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        b, t, d = x.shape
        h, kv, hd = cfg.n_heads, cfg.num_kv_heads, cfg.attn_head_dim
        q = dense(cfg, d, h * hd, ("embed", "heads"), "q_proj", cfg.attn_bias)(x)
        k = dense(cfg, d, kv * hd, ("embed", "kv_heads"), "k_proj", cfg.attn_bias)(x)
        v = dense(cfg, d, kv * hd, ("embed", "kv_heads"), "v_proj", cfg.attn_bias)(x)
        q = q.reshape(b, t, h, hd)
        k = k.reshape(b, t, kv, hd)
        v = v.reshape(b, t, kv, hd)
        if cfg.qk_norm:
            norm = lambda name: RMSNorm(cfg.norm_eps, q.dtype, jnp.dtype(cfg.param_dtype), name=name)
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        q = apply_rope(q, positions, cfg.rope_theta, cfg)
        k = apply_rope(k, positions, cfg.rope_theta, cfg)
        q = constrain(q, ("batch", "length", "act_heads", None))

        if not decode and cfg.attn_impl == "dot_product":
            o = fused_attention(q, k, v, segment_ids, cfg.softmax_scale).reshape(b, t, h * hd)
            y = dense(cfg, h * hd, d, ("heads", "embed"), "o_proj")(o)
            return y, _no_max_logits(h)

        if decode:
            shape = (b, cfg.max_seq_len, kv, hd)
            ck = self.variable("cache", "key", jnp.zeros, shape, q.dtype)
            cv = self.variable("cache", "value", jnp.zeros, shape, q.dtype)
            ck.value = write_cache(ck.value, k, positions)
            cv.value = write_cache(cv.value, v, positions)
            k, v = ck.value, cv.value
            mask = decode_mask(positions, cfg.max_seq_len)
        else:
            mask = causal_mask(t, segment_ids, b)

        g = h // kv
        qg = q.reshape(b, t, kv, g, hd)
        logits = jnp.einsum(
            "btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32
        ) * cfg.softmax_scale
        e, denom, max_logits = masked_exp(logits, mask)
        o = jnp.einsum("bkgts,bskd->btkgd", e.astype(v.dtype), v)
        o = (o / _heads_last(denom).astype(o.dtype)).reshape(b, t, h * hd)
        y = dense(cfg, h * hd, d, ("heads", "embed"), "o_proj")(o)
        return y, max_logits.reshape(h)


class MLAttention(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2 Sec. 2.1; DeepSeek-V3 Sec. 2.1.1).

    q = W_uq RMSNorm(W_dq x) (or W_q x when q_lora_rank = 0), split per head into a
    no-position part and a RoPE part; the latent c_kv = RMSNorm(W_dkv x) and one RoPE key
    shared by all heads come from the same down-projection; k_nope = W_uk c_kv and
    v = W_uv c_kv. The softmax scale is 1/sqrt(qk_nope + qk_rope).

    Decoding caches only c_kv and the rotated shared key (kv_lora_rank + qk_rope_head_dim
    values per token) and uses the absorbed form: W_uk is folded into the query and W_uv
    is applied after attending over the latents.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        decode: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        b, t, d = x.shape
        h, nope, rope, vd = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        r = cfg.kv_lora_rank
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

        if cfg.q_lora_rank:
            cq = dense(cfg, d, cfg.q_lora_rank, ("embed", "q_lora"), "q_a_proj")(x)
            cq = RMSNorm(cfg.norm_eps, dt, pdt, name="q_a_norm")(cq)
            q = dense(cfg, cfg.q_lora_rank, h * (nope + rope), ("q_lora", "heads"), "q_b_proj")(cq)
        else:
            q = dense(cfg, d, h * (nope + rope), ("embed", "heads"), "q_proj")(x)
        q = q.reshape(b, t, h, nope + rope)
        q_nope, q_rope = q[..., :nope], q[..., nope:]
        q_rope = apply_rope(q_rope, positions, cfg.rope_theta, cfg)

        ckv = dense(cfg, d, r + rope, ("embed", "kv_lora"), "kv_a_proj")(x)
        c_kv = RMSNorm(cfg.norm_eps, dt, pdt, name="kv_a_norm")(ckv[..., :r])
        k_rope = apply_rope(ckv[..., None, r:], positions, cfg.rope_theta, cfg)[:, :, 0]  # [b,t,rope]
        kv_b = dense(cfg, r, h * (nope + vd), ("kv_lora", "heads"), "kv_b_proj")
        o_proj = dense(cfg, h * vd, d, ("heads", "embed"), "o_proj")
        scale = cfg.softmax_scale

        if not decode:
            kvh = kv_b(c_kv).reshape(b, t, h, nope + vd)
            k_nope, v = kvh[..., :nope], kvh[..., nope:]
            # One q.k over [nope, rope] (the rope key shared by all heads).
            qf = jnp.concatenate([q_nope, q_rope], axis=-1)
            kf = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None], q_rope.shape)], -1)
            if cfg.attn_impl == "dot_product":
                # The kernel wants q, k, v of one head size: zero-pad (the logits do not
                # change; the scale is passed), then drop v's padding from the output.
                size = max(nope + rope, vd)
                pad = lambda a: jnp.pad(a, ((0, 0),) * 3 + ((0, size - a.shape[-1]),))  # noqa: E731
                o = fused_attention(pad(qf), pad(kf), pad(v), segment_ids, scale)[..., :vd]
                return o_proj(o.reshape(b, t, h * vd)), _no_max_logits(h)
            logits = jnp.einsum("bthd,bshd->bhts", qf, kf, preferred_element_type=jnp.float32) * scale
            e, denom, max_logits = masked_exp(logits, causal_mask(t, segment_ids, b))
            o = jnp.einsum("bhts,bshv->bthv", e.astype(v.dtype), v)
            o = o / _heads_last(denom).astype(o.dtype)
            return o_proj(o.reshape(b, t, h * vd)), max_logits

        # Absorbed decoding over the latent cache.
        s = cfg.max_seq_len
        cc = self.variable("cache", "c_kv", jnp.zeros, (b, s, r), dt)
        cr = self.variable("cache", "k_rope", jnp.zeros, (b, s, rope), dt)
        cc.value = write_cache(cc.value, c_kv, positions)
        cr.value = write_cache(cr.value, k_rope, positions)
        w = kv_b.kernel.astype(dt).reshape(r, h, nope + vd)
        w_uk, w_uv = w[..., :nope], w[..., nope:]
        q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk)
        logits = (
            jnp.einsum("bthr,bsr->bhts", q_lat, cc.value, preferred_element_type=jnp.float32)
            + jnp.einsum("bthp,bsp->bhts", q_rope, cr.value, preferred_element_type=jnp.float32)
        ) * scale
        e, denom, max_logits = masked_exp(logits, decode_mask(positions, s))
        o_lat = jnp.einsum("bhts,bsr->bthr", e.astype(dt), cc.value)
        o_lat = o_lat / _heads_last(denom).astype(o_lat.dtype)
        o = jnp.einsum("bthr,rhv->bthv", o_lat, w_uv)
        return o_proj(o.reshape(b, t, h * vd)), max_logits

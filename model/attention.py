"""Attention: MHA/GQA and Multi-head Latent Attention (MLA), each with a decoding cache.

Both modules map `x [batch, length, d_model]` to `(y [batch, length, d_model],
max_logits [heads])`, where `max_logits[h]` is the largest scaled logit `q.k * scale`
of head `h` over the whole (global) batch and all unmasked query/key pairs: the
statistic QK-clip (Kimi K2) needs.

Training/eval attention has backends, one contract (`attend`): `(output, max_logits)`,
where the max is exact whenever `choose_backend(...).max_logits` (else NaN):

  "explicit"  einsum + masked softmax over `[batch, heads, T, T]` scores: small shapes,
              and the reference the others are tested against.
  "flash"     blockwise attention in plain JAX (`model.flash_attention`): O(T) memory, a
              custom VJP, the exact max from its running row max; CPU, GPU and TPU.
  "cudnn"     cuDNN flash attention through `jax.nn.dot_product_attention` (NVIDIA GPUs,
              bf16/fp16); when the max is needed it comes from a blockwise side pass
              (`model.flash_attention.max_logits`). "dot_product" is its old name.
  "auto"      (default) per device and shape, the fastest that gives what the run needs:
              cuDNN on a GPU where it can run the case, else "flash" above
              `EXPLICIT_MAX_LEN` tokens, else "explicit". The trainer prints the choice.

A requested backend that cannot run a case raises a `ValueError` naming the case; nothing
falls back silently.

Masks. Training/eval (`decode=False`): causal within the row and, when `segment_ids`
are given (packed documents), only between tokens of the same segment. Decoding
(`decode=True`): the new keys are written into the cache at their `positions`, and a
query at position p attends to cache slots 0..p of its own row, so rows may sit at
different positions.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.flash_attention import default_block, flash_attention, max_logits
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


def write_cache(
    cache: jax.Array, new: jax.Array, positions: jax.Array, *, slot_axis: int = 1,
    layer: jax.Array | None = None,
) -> jax.Array:
    """Writes `new [batch, length, heads..., dim]` into `cache` at `positions [batch,
    length]` (per row; positions past the end are dropped): one scatter that XLA performs
    in place (the cache buffer is updated, not copied), so a decode step writes only its
    new entries.

    `cache` is `[batch, ...]` with the slot (position) axis at `slot_axis` and the other
    axes in `new`'s order (`new`'s `heads..., dim` with the slot axis taken out), e.g.
    `[batch, slot, dim]` (`slot_axis=1`) or `[batch, kv_heads, slot, head_dim]`
    (`slot_axis=2`). With `layer` (an int32 scalar, may be traced) `cache` has a leading
    `layers` axis (the stacked cache of a scanned stack) and row `layer` is written.
    """
    rows = jnp.arange(new.shape[0])[:, None]
    idx = (rows,) + (slice(None),) * (slot_axis - 1) + (positions,)
    if layer is not None:
        idx = (layer,) + idx
    return cache.at[idx].set(new.astype(cache.dtype), mode="drop", unique_indices=True)


def cache_layer(cache: jax.Array, layer: jax.Array | None) -> jax.Array:
    """The cache of one layer: `cache` itself, or with `layer` row `layer` of a stacked
    `[layers, ...]` cache."""
    return cache if layer is None else jax.lax.dynamic_index_in_dim(cache, layer, 0, False)


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

BACKENDS = ("auto", "explicit", "flash", "cudnn", "dot_product")
# "auto" uses the explicit path up to this many tokens: its [T, T] scores are small there,
# and it is then at least as fast as the blockwise path on a CPU (bench/bench_attention.py).
EXPLICIT_MAX_LEN = 256


@dataclasses.dataclass(frozen=True)
class Backend:
    """The attention backend a run uses: `name` (explicit | flash | cudnn), whether the
    returned per-head max logit is exact (`max_logits`; NaN otherwise) and why it was
    chosen."""

    name: str
    max_logits: bool
    reason: str

    def describe(self) -> str:
        stat = "exact per-head max logits" if self.max_logits else "no max-logit statistic"
        return f"attention: {self.name} ({self.reason}; {stat})"


def _platform() -> str:
    return jax.default_backend()


def _cuda_shapes(cfg: ModelConfig, length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The `[1, T, heads, head_dim]` shapes of q and k/v that `attend` hands to cuDNN."""
    if cfg.attention == "mla":
        size = max(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim)
        return (1, length, cfg.n_heads, size), (1, length, cfg.n_heads, size)
    return ((1, length, cfg.n_heads, cfg.attn_head_dim),
            (1, length, cfg.num_kv_heads, cfg.attn_head_dim))


@functools.lru_cache(maxsize=64)
def _cudnn_problem(platform: str, dtype: str, q_shape, kv_shape) -> str | None:
    """Why cuDNN cannot run this case here (None: it can). Asks cuDNN itself by tracing
    the call on abstract shapes (nothing runs)."""
    if platform != "gpu":
        return f"cuDNN flash attention needs an NVIDIA GPU; this process runs on {platform}"
    if dtype not in ("bfloat16", "float16"):
        return f"cuDNN flash attention runs bfloat16/float16, not dtype={dtype}"
    q = jax.ShapeDtypeStruct(q_shape, jnp.dtype(dtype))
    kv = jax.ShapeDtypeStruct(kv_shape, jnp.dtype(dtype))
    try:
        jax.eval_shape(lambda a, b: jax.nn.dot_product_attention(
            a, b, b, is_causal=True, implementation="cudnn"), q, kv)
    except _CUDNN_UNSUPPORTED as e:
        return f"cuDNN cannot run q {q_shape} / kv {kv_shape} {dtype}: {type(e).__name__}: {e}"
    return None


def choose_backend(cfg: ModelConfig, length: int, platform: str | None = None) -> Backend:
    """The training attention backend for `cfg` at sequence length `length` on `platform`
    (default: this process's JAX backend). Raises `ValueError` naming the case when the
    requested `cfg.attn_impl` cannot run it."""
    platform = platform or _platform()
    want_max = cfg.attn_max_logits is True
    impl = "cudnn" if cfg.attn_impl == "dot_product" else cfg.attn_impl
    if impl == "explicit":
        return Backend("explicit", True, "requested")
    if impl == "flash":
        return Backend("flash", True, "requested")
    q_shape, kv_shape = _cuda_shapes(cfg, length)
    problem = _cudnn_problem(platform, cfg.dtype, q_shape, kv_shape)
    if impl == "cudnn":
        if problem:
            raise ValueError(f"attn_impl={cfg.attn_impl!r} cannot run this case: {problem}")
        return Backend("cudnn", want_max, "requested" + (" + max-logit side pass" * want_max))
    if problem is None:
        side = "; max logits from a blockwise side pass" if want_max else ""
        return Backend("cudnn", want_max, f"auto: cuDNN flash attention on this GPU{side}")
    if length > EXPLICIT_MAX_LEN:
        return Backend("flash", True, f"auto: {length} tokens > {EXPLICIT_MAX_LEN}")
    return Backend("explicit", True, f"auto: {length} tokens <= {EXPLICIT_MAX_LEN}")


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, scale: float,
) -> jax.Array:
    """Causal (and same-segment) attention through cuDNN (`jax.nn.dot_product_attention`):
    `q [b, t, h, d]`, `k, v [b, t, kv_heads, d]` -> `[b, t, h, d]`. Raises `ValueError` with
    cuDNN's reason when it cannot run the case."""
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    try:
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=scale, is_causal=True, implementation="cudnn")
    except _CUDNN_UNSUPPORTED as e:
        raise ValueError(f"attn_impl='cudnn' cannot run q {tuple(q.shape)} {q.dtype}, kv "
                         f"{tuple(k.shape)}{' with segment_ids' if mask is not None else ''}: "
                         f"{type(e).__name__}: {e}") from e


def attend(
    cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array,
    segment_ids: jax.Array | None, scale: float,
) -> tuple[jax.Array, jax.Array]:
    """Causal (and same-segment) training attention with the backend of `choose_backend`.

    Args:
      q: `[batch, T, kv_heads, group, d_qk]` (group = query heads per KV head).
      k: `[batch, T, kv_heads, d_qk]`.
      v: `[batch, T, kv_heads, d_v]`.

    Returns:
      `(out [batch, T, kv_heads, group, d_v], max_logits [kv_heads * group])`: the largest
      `q.k * scale` per head over batch and visible pairs (NaN when the backend does not
      provide it).
    """
    b, t, kv, g, dq = q.shape
    backend = choose_backend(cfg, t)
    if backend.name == "flash":
        out, ml = flash_attention(q, k, v, segment_ids, scale, block=default_block())
        return out, ml.reshape(kv * g)
    if backend.name == "cudnn":
        size = max(dq, v.shape[-1])  # cuDNN wants one head size: zero-pad (logits unchanged)
        pad = lambda a: jnp.pad(a, ((0, 0),) * (a.ndim - 1) + ((0, size - a.shape[-1]),))  # noqa: E731
        out = cudnn_attention(pad(q.reshape(b, t, kv * g, dq)), pad(k), pad(v), segment_ids,
                              scale)[..., : v.shape[-1]].reshape(b, t, kv, g, v.shape[-1])
        if backend.max_logits:
            ml = max_logits(q, k, segment_ids, scale, block=default_block()).reshape(kv * g)
        else:
            ml = jnp.full((kv * g,), jnp.nan, jnp.float32)
        return out, ml
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    e, denom, ml = masked_exp(logits, causal_mask(t, segment_ids, b))
    out = jnp.einsum("bkgts,bskd->btkgd", e.astype(v.dtype), v)
    return out / _heads_last(denom).astype(out.dtype), ml.reshape(kv * g)


def _heads_last(denom: jax.Array) -> jax.Array:
    """`[batch, heads..., q] -> [batch, q, heads..., 1]`, to divide an attention output."""
    return jnp.moveaxis(denom, -1, 1)[..., None]


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (MHA when n_kv_heads == n_heads, GQA
    otherwise; Ainslie et al., 2023), RoPE and optional per-head QK RMSNorm.

    Decoding cache: `key [batch, kv_heads, max_seq_len, head_dim]` and `value [batch,
    kv_heads, head_dim, max_seq_len]`, the layouts the two attention products read without
    a transpose. `stack=n > 0`: the module is the body of a scanned stack of n layers that
    share one cache with a leading `layers` axis, carried through the scan, and `layer`
    says which row is this layer's (see `Transformer`).
    """

    cfg: ModelConfig
    stack: int = 0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        decode: bool = False,
        layer: jax.Array | None = None,
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

        g = h // kv
        if not decode:
            o, ml = attend(cfg, q.reshape(b, t, kv, g, hd), k, v, segment_ids, cfg.softmax_scale)
            y = dense(cfg, h * hd, d, ("heads", "embed"), "o_proj")(o.reshape(b, t, h * hd))
            return y, ml

        s, lead = cfg.max_seq_len, (self.stack,) if self.stack else ()
        ck = self.variable("cache", "key", jnp.zeros, lead + (b, kv, s, hd), q.dtype)
        cv = self.variable("cache", "value", jnp.zeros, lead + (b, kv, hd, s), q.dtype)
        ck.value = write_cache(ck.value, k, positions, slot_axis=2, layer=layer)
        cv.value = write_cache(cv.value, v, positions, slot_axis=3, layer=layer)
        k, v = cache_layer(ck.value, layer), cache_layer(cv.value, layer)
        qg = q.reshape(b, t, kv, g, hd)
        logits = jnp.einsum(
            "btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32
        ) * cfg.softmax_scale
        e, denom, max_logits = masked_exp(logits, decode_mask(positions, s))
        o = jnp.einsum("bkgts,bkds->btkgd", e.astype(v.dtype), v)
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
    is applied after attending over the latents. `stack` and `layer`: as in `Attention`.
    """

    cfg: ModelConfig
    stack: int = 0

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        decode: bool = False,
        layer: jax.Array | None = None,
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
            o, ml = attend(cfg, qf[:, :, :, None], kf, v, segment_ids, scale)
            return o_proj(o.reshape(b, t, h * vd)), ml

        # Absorbed decoding over the latent cache.
        s, lead = cfg.max_seq_len, (self.stack,) if self.stack else ()
        cc = self.variable("cache", "c_kv", jnp.zeros, lead + (b, s, r), dt)
        cr = self.variable("cache", "k_rope", jnp.zeros, lead + (b, s, rope), dt)
        cc.value = write_cache(cc.value, c_kv, positions, layer=layer)
        cr.value = write_cache(cr.value, k_rope, positions, layer=layer)
        c_cache, r_cache = cache_layer(cc.value, layer), cache_layer(cr.value, layer)
        w = kv_b.kernel.astype(dt).reshape(r, h, nope + vd)
        w_uk, w_uv = w[..., :nope], w[..., nope:]
        q_lat = jnp.einsum("bthn,rhn->bthr", q_nope, w_uk)
        logits = (
            jnp.einsum("bthr,bsr->bhts", q_lat, c_cache, preferred_element_type=jnp.float32)
            + jnp.einsum("bthp,bsp->bhts", q_rope, r_cache, preferred_element_type=jnp.float32)
        ) * scale
        e, denom, max_logits = masked_exp(logits, decode_mask(positions, s))
        o_lat = jnp.einsum("bhts,bsr->bthr", e.astype(dt), c_cache)
        o_lat = o_lat / _heads_last(denom).astype(o_lat.dtype)
        o = jnp.einsum("bthr,rhv->bthv", o_lat, w_uv)
        return o_proj(o.reshape(b, t, h * vd)), max_logits

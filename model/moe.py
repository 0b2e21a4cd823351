"""DeepSeek-V3 Mixture of Experts: shared + routed SwiGLU experts with auxiliary-loss-free
load balancing (Wang et al., 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts"; DeepSeek-V3 Sec. 2.1.2).

Routing (all in float32): affinities s = sigmoid(x W_r) (or softmax); the top-k experts are
chosen on s + b, where b is a per-expert bias that is *not* a trained parameter (it lives
in the `router_bias` variable collection); the gate of a chosen expert is its raw s,
normalized over the chosen experts, times `routed_scaling_factor`. After each step
`update_router_bias` moves b_i by u * sign(mean_load - load_i).

Dispatch is capacity-based: each expert processes at most
C = ceil(capacity_factor * tokens * top_k / experts) tokens in a `[experts, C, d_model]`
buffer (one batched matmul per projection, sharded on the `expert` axis); assignments past
an expert's capacity are dropped (top-1 choices have priority over top-2, ...) and their
fraction is reported. Compute is O(capacity_factor * tokens * top_k), not O(tokens * experts).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.layers import Linear, SwiGLU, constrain, hidden_std


def router_scores(logits: jax.Array, score: str) -> jax.Array:
    """Affinities from router logits `[..., experts]` (float32)."""
    logits = logits.astype(jnp.float32)
    return jax.nn.sigmoid(logits) if score == "sigmoid" else jax.nn.softmax(logits, axis=-1)


def select_experts(
    scores: jax.Array,
    bias: jax.Array,
    top_k: int,
    *,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    group_score: str = "top2",
) -> tuple[jax.Array, jax.Array]:
    """Top-k expert choice on `scores + bias`, gates from the raw scores.

    Group-limited routing (DeepSeek-V3): experts are split into `n_group` groups, a group's
    score is the sum of its two best biased scores (`group_score="top2"`; `"max"` for the
    softmax/V2 variant), and only the `topk_group` best groups are eligible.

    Args:
      scores: `[tokens, experts]` float32 affinities.
      bias: `[experts]` balancing bias (affects the choice only).
    Returns:
      `(indices [tokens, top_k] int32, gates [tokens, top_k] float32)`.
    """
    n, e = scores.shape
    choice = scores + bias.astype(jnp.float32)[None, :]
    if n_group > 1:
        grouped = choice.reshape(n, n_group, e // n_group)
        if group_score == "top2":
            gs = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
        else:
            gs = jnp.max(grouped, axis=-1)
        _, gidx = jax.lax.top_k(gs, topk_group)
        gmask = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], gidx].set(True)
        emask = jnp.repeat(gmask, e // n_group, axis=1)
        choice = jnp.where(emask, choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, top_k)
    gates = jnp.take_along_axis(scores, idx, axis=-1)
    if norm_topk_prob:
        gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
    return idx.astype(jnp.int32), gates * routed_scaling_factor


def expert_load(indices: jax.Array, n_experts: int, mask: jax.Array | None = None) -> jax.Array:
    """Number of (valid) tokens routed to each expert: `[experts]` float32."""
    oh = jax.nn.one_hot(indices, n_experts, dtype=jnp.float32).sum(axis=-2)  # [tokens, E]
    if mask is not None:
        oh = oh * mask.astype(jnp.float32)[:, None]
    return oh.sum(axis=0)


def update_router_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Loss-free balancing update b_i <- b_i + u * sign(mean_load - load_i) (Wang et al.,
    Alg. 1). `load` must be summed over the whole global batch. Works on stacked
    `[..., experts]` arrays (one row per layer)."""
    load = load.astype(jnp.float32)
    err = jnp.mean(load, axis=-1, keepdims=True) - load
    return (bias + rate * jnp.sign(err)).astype(bias.dtype)


def max_violation(load: jax.Array) -> jax.Array:
    """MaxVio = (max_i load_i - mean load) / mean load (Wang et al., Eq. 5); `[..., E] -> [...]`."""
    mean = jnp.mean(load, axis=-1)
    return (jnp.max(load, axis=-1) - mean) / jnp.maximum(mean, 1e-9)


def sequence_aux_loss(
    scores: jax.Array, indices: jax.Array, n_experts: int, top_k: int, mask: jax.Array | None
) -> jax.Array:
    """Sequence-wise balance loss (DeepSeek-V3 Eqs. 17-20), without alpha, averaged over
    sequences: sum_i f_i P_i with f_i = E/(K T) * #{t: i in topk_t},
    P_i = mean_t s_{i,t} / sum_j s_{j,t}.

    Args:
      scores: `[batch, length, E]`; indices: `[batch, length, K]`; mask: `[batch, length]`.
    """
    m = jnp.ones(scores.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
    t = jnp.maximum(m.sum(axis=1), 1.0)  # [b]
    sel = jax.nn.one_hot(indices, n_experts, dtype=jnp.float32).sum(axis=-2)  # [b, l, E]
    f = n_experts / (top_k * t[:, None]) * jnp.einsum("ble,bl->be", sel, m)
    sn = scores / (jnp.sum(scores, axis=-1, keepdims=True) + 1e-20)
    p = jnp.einsum("ble,bl->be", sn, m) / t[:, None]
    return jnp.mean(jnp.sum(f * p, axis=-1))


def capacity(n_tokens: int, n_experts: int, top_k: int, factor: float) -> int:
    """Per-expert buffer size: ceil(factor * tokens * top_k / experts), at most `tokens`."""
    return max(1, min(n_tokens, math.ceil(factor * n_tokens * top_k / n_experts)))


class Experts(nn.Module):
    """Stacked SwiGLU experts, `[E, d_in, d_out]` weights sharded on `expert`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`x [experts, capacity, d_model] -> [experts, capacity, d_model]`."""
        cfg = self.cfg
        e, d, f = cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_dim
        pd, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        init = nn.initializers.normal(hidden_std(cfg))
        w = lambda name, shape, axes: self.param(
            name, nn.with_logical_partitioning(init, axes), shape, pd
        ).astype(dt)
        w_gate = w("w_gate", (e, d, f), ("expert", "embed", "mlp"))
        w_up = w("w_up", (e, d, f), ("expert", "embed", "mlp"))
        w_down = w("w_down", (e, f, d), ("expert", "mlp", "embed"))
        x = x.astype(dt)
        g = jnp.einsum("ecd,edf->ecf", x, w_gate)
        u = jnp.einsum("ecd,edf->ecf", x, w_up)
        h = constrain(nn.silu(g) * u, ("act_expert", "capacity", "act_mlp"))
        return jnp.einsum("ecf,efd->ecd", h, w_down)


class MoE(nn.Module):
    """Shared + routed experts (DeepSeek-V3 Eq. 12-16) with the loss-free balancing bias."""

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`x [batch, length, d_model]` -> (`y` same shape, aux) with aux holding `load [E]`
        (tokens per expert), `aux_loss` (sequence-wise, times alpha) and `dropped_frac`."""
        cfg = self.cfg
        b, t, d = x.shape
        e, k = cfg.n_routed_experts, cfg.top_k
        n = b * t
        bias = self.variable("router_bias", "bias", jnp.zeros, (e,), jnp.float32)
        router = Linear(d, e, ("embed", None), init_std=hidden_std(cfg), dtype="float32",
                        param_dtype=cfg.param_dtype, name="router")
        scores = router_scores(router(x.astype(jnp.float32)), cfg.router_score)  # [b, t, E]
        idx, gates = select_experts(
            scores.reshape(n, e),
            bias.value,
            k,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
            group_score="top2" if cfg.router_score == "sigmoid" else "max",
        )
        valid = None if segment_ids is None else (segment_ids.reshape(n) != 0)
        load = expert_load(idx, e, valid)

        # Capacity dispatch; assignment order is k-major so top-1 choices win capacity.
        c = capacity(n, e, k, cfg.capacity_factor)
        flat_e = idx.T.reshape(k * n)  # [k*n]
        tok = jnp.tile(jnp.arange(n), k)
        onehot = jax.nn.one_hot(flat_e, e, dtype=jnp.int32)
        pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # slot in expert
        keep = pos < c
        xf = x.reshape(n, d)
        buf = jnp.zeros((e, c, d), x.dtype).at[flat_e, pos].set(xf[tok], mode="drop")
        buf = constrain(buf, ("act_expert", "capacity", "act_embed"))
        out = Experts(cfg, name="experts")(buf)
        y_assign = out[flat_e, jnp.minimum(pos, c - 1)] * keep[:, None].astype(out.dtype)
        w = gates.T.reshape(k * n, 1).astype(out.dtype)
        y = jnp.sum((y_assign * w).reshape(k, n, d), axis=0).reshape(b, t, d)

        if cfg.n_shared_experts:
            y = y + SwiGLU(cfg, cfg.n_shared_experts * cfg.moe_ffn_dim, name="shared")(x)

        vflat = jnp.ones((n,), bool) if valid is None else valid
        vk = jnp.tile(vflat, k)
        dropped = jnp.sum(vk & ~keep) / jnp.maximum(jnp.sum(vk), 1)
        aux_loss = jnp.zeros((), jnp.float32)
        if cfg.aux_loss_alpha > 0:
            aux_loss = cfg.aux_loss_alpha * sequence_aux_loss(
                scores, idx.reshape(b, t, k), e, k,
                None if segment_ids is None else segment_ids != 0,
            )
        return y.astype(x.dtype), {"load": load, "aux_loss": aux_loss, "dropped_frac": dropped}

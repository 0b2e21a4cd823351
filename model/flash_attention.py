"""Blockwise causal attention in plain JAX (FlashAttention-2; Dao, 2023) that also returns
the exact per-head max logit QK-clip needs.

The sequence is cut into `n` blocks of `block` tokens. Causal attention only needs the
pairs (query block i, key block j) with j <= i; they are visited by diagonal, offset
`o = i - j` from 0 to n-1, and at each offset all its n-o pairs are done at once as one
batched product (query blocks `[o:]` against key blocks `[:n-o]`). That is exactly the
triangle's work, with static shapes and no `[T, T]` tensor: the largest intermediate is
`[batch, heads, T, block]`. The forward keeps the online-softmax state per query row
(running max m, running sum l, unnormalised output); the backward (a `jax.custom_vjp`)
recomputes each block's probabilities from the saved log-sum-exp, so the residuals are
q, k, v, the output and one float per row.

The running max m of a row is its largest scaled logit `q.k * scale` over the keys it sees,
so `max(m)` over batch and rows is the per-head max logit (Kimi K2's QK-clip statistic),
exact, at no extra cost. It is a statistic: no gradient flows through it.

Shapes: `q [batch, T, kv_heads, group, d_qk]`, `k [batch, T, kv_heads, d_qk]`, `v [batch,
T, kv_heads, d_v]` (grouped-query attention: `group` query heads share a KV head; MHA and
MLA are `group = 1`, and `d_v` may differ from `d_qk`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK = 512  # tokens per block: temp memory ~ batch x heads x T x block x 4 bytes
CPU_BLOCK = 64  # on a CPU smaller blocks are faster (bench/bench_attention.py, RESULTS.md)


def default_block() -> int:
    """The block size `model.attention` uses on this process's backend."""
    return CPU_BLOCK if jax.default_backend() == "cpu" else DEFAULT_BLOCK


def block_size(length: int, block: int = DEFAULT_BLOCK) -> int:
    """The block used for `length` tokens: `block`, or `length` itself when shorter."""
    return max(1, min(int(block), int(length)))


def _blocks(x: jax.Array, n: int, block: int) -> jax.Array:
    """`[b, T, ...] -> [b, n, block, ...]`, zero-padded at the end to n x block tokens."""
    pad = n * block - x.shape[1]
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape((x.shape[0], n, block) + x.shape[2:])


def _unblock(x: jax.Array, length: int) -> jax.Array:
    """`[b, n, block, ...] -> [b, length, ...]` (drops the padding)."""
    return x.reshape((x.shape[0], -1) + x.shape[3:])[:, :length]


def _schedule(n: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray | None]:
    """The block pairs of the causal triangle off the main diagonal, as `n - 1`... grouped
    into steps of equal size: `(q_index [steps, n], k_index [steps, n])` pairs diagonal `o`
    (`n - o` pairs: query block `i + o` with key block `i`) with diagonal `n - o` (`o`
    pairs), so every step is n pairs, for o = 1..(n-1)//2; plus, when n is even, the middle
    diagonal n/2 alone (`[2, n/2]` indices, or None)."""
    i = np.arange(n)
    steps = range(1, (n - 1) // 2 + 1)
    qi = np.array([np.where(i < n - o, i + o, i) for o in steps], np.int32).reshape(-1, n)
    ki = np.array([np.where(i < n - o, i, i - (n - o)) for o in steps], np.int32).reshape(-1, n)
    middle = None
    if n % 2 == 0 and n > 1:
        middle = np.stack([np.arange(n // 2, n), np.arange(n // 2)]).astype(np.int32)
    return (qi, ki), middle


def _pair_mask(seg_q: jax.Array, seg_k: jax.Array, diagonal: bool) -> jax.Array:
    """`[b, pairs, 1, 1, block_q, block_k]` visibility of block pairs: same segment and, on
    the main diagonal (query block == key block), key index <= query index. Off the main
    diagonal every key block is strictly before its query block."""
    mask = seg_q[..., :, None] == seg_k[..., None, :]
    if diagonal:
        idx = jnp.arange(seg_q.shape[-1])
        mask = mask & (idx[:, None] >= idx[None, :])
    return mask[:, :, None, None]


def _logits(qi: jax.Array, kj: jax.Array, scale: float) -> jax.Array:
    """Scaled float32 logits `[b, pairs, kv, group, block_q, block_k]` of paired blocks."""
    s = jnp.einsum("bnqkgd,bnskd->bnkgqs", qi, kj, preferred_element_type=jnp.float32)
    return s * scale


def _take(x: jax.Array, idx) -> jax.Array:
    return jnp.take(x, idx, axis=1)


def _visit(n: int, state, body):
    """Runs `state = body(state, q_index, k_index, diagonal)` over every block pair of the
    causal triangle: the main diagonal, then the paired off-diagonals (a `lax.scan`, so
    one step's temporaries are freed before the next), then the middle diagonal."""
    state = body(state, np.arange(n, dtype=np.int32), np.arange(n, dtype=np.int32), True)
    (qi, ki), middle = _schedule(n)
    if len(qi):
        state, _ = jax.lax.scan(
            lambda st, idx: (body(st, idx[0], idx[1], False), None), state,
            (jnp.asarray(qi), jnp.asarray(ki)))
    if middle is not None:
        state = body(state, middle[0], middle[1], False)
    return state


def _forward(q, k, v, seg, scale: float, block: int):
    """The online-softmax forward: `(out [b, T, kv, g, dv] in v's dtype, lse [b, n, kv, g,
    block], row max [same])`. With several pairs of one step on the same query block, the
    running state is merged with scatter-max / scatter-add."""
    b, t, kv, g, _ = q.shape
    n = -(-t // block)
    qb, kb, vb, sb = (_blocks(x, n, block) for x in (q, k, v, seg))
    dv = v.shape[-1]

    def body(state, qi, ki, diagonal):
        m, lsum, acc = state
        s = _logits(_take(qb, qi), _take(kb, ki), scale)
        s = jnp.where(_pair_mask(_take(sb, qi), _take(sb, ki), diagonal), s, -jnp.inf)
        m_new = m.at[:, qi].max(jnp.max(s, axis=-1))
        shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row that has seen no key yet
        p = jnp.exp(s - _take(shift, qi)[..., None])
        alpha = jnp.exp(m - shift)
        pv = jnp.einsum("bnkgqs,bnskv->bnqkgv", p.astype(v.dtype), _take(vb, ki),
                        preferred_element_type=jnp.float32)
        lsum = (alpha * lsum).at[:, qi].add(jnp.sum(p, axis=-1))
        acc = (jnp.moveaxis(alpha, -1, 2)[..., None] * acc).at[:, qi].add(pv)
        return m_new, lsum, acc

    m = jnp.full((b, n, kv, g, block), -jnp.inf, jnp.float32)
    zeros = jnp.zeros((b, n, kv, g, block), jnp.float32)
    acc = jnp.zeros((b, n, block, kv, g, dv), jnp.float32)
    m, lsum, acc = _visit(n, (m, zeros, acc), body)
    safe = jnp.where(lsum > 0, lsum, 1.0)
    out = acc / jnp.moveaxis(safe, -1, 2)[..., None]
    return _unblock(out, t).astype(v.dtype), m + jnp.log(safe), m


def _row_max_to_heads(m: jax.Array, length: int) -> jax.Array:
    """Per-head max `[kv, g]` of the row maxima `[b, n, kv, g, block]`, padding rows
    excluded."""
    b, n, kv, g, block = m.shape
    rows = jnp.moveaxis(m, 4, 2).reshape(b, n * block, kv, g)[:, :length]
    return jnp.max(rows, axis=(0, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, seg, scale, block):
    out, _, m = _forward(q, k, v, seg, scale, block)
    return out, _row_max_to_heads(m, q.shape[1])


def _flash_fwd(q, k, v, seg, scale, block):
    out, lse, m = _forward(q, k, v, seg, scale, block)
    return (out, _row_max_to_heads(m, q.shape[1])), (q, k, v, seg, out, lse)


def _flash_bwd(scale, block, res, cotangents):
    """FlashAttention-2's backward (Dao 2023, Alg. 2): per block pair, P = exp(S - lse),
    dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ += dS K, dK += dS^T Q (times
    the softmax scale). The max-logit output is a statistic: its cotangent is ignored."""
    q, k, v, seg, out, lse = res
    d_out = cotangents[0]
    t = q.shape[1]
    n = -(-t // block)
    qb, kb, vb, sb, dob = (_blocks(x, n, block) for x in (q, k, v, seg, d_out))
    delta = jnp.sum(dob.astype(jnp.float32) * _blocks(out, n, block).astype(jnp.float32), -1)
    delta = jnp.moveaxis(delta, 2, -1)  # [b, n, kv, g, block]

    def body(state, qi, ki, diagonal):
        dq, dk, dv = state
        q_i, k_j, v_j, do_i = _take(qb, qi), _take(kb, ki), _take(vb, ki), _take(dob, qi)
        s = _logits(q_i, k_j, scale)
        visible = _pair_mask(_take(sb, qi), _take(sb, ki), diagonal)
        p = jnp.where(visible, jnp.exp(s - _take(lse, qi)[..., None]), 0.0)
        dv = dv.at[:, ki].add(jnp.einsum(
            "bnkgqs,bnqkgv->bnskv", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32))
        dp = jnp.einsum("bnqkgv,bnskv->bnkgqs", do_i, v_j, preferred_element_type=jnp.float32)
        ds = p * (dp - _take(delta, qi)[..., None]) * scale
        dq = dq.at[:, qi].add(jnp.einsum(
            "bnkgqs,bnskd->bnqkgd", ds.astype(k_j.dtype), k_j, preferred_element_type=jnp.float32))
        dk = dk.at[:, ki].add(jnp.einsum(
            "bnkgqs,bnqkgd->bnskd", ds.astype(q_i.dtype), q_i, preferred_element_type=jnp.float32))
        return dq, dk, dv

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)  # noqa: E731
    dq, dk, dv = _visit(n, (zeros(qb), zeros(kb), zeros(vb)), body)
    return (_unblock(dq, t).astype(q.dtype), _unblock(dk, t).astype(k.dtype),
            _unblock(dv, t).astype(v.dtype), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _segments(segment_ids: jax.Array | None, batch: int, length: int) -> jax.Array:
    if segment_ids is None:
        return jnp.zeros((batch, length), jnp.int32)
    return segment_ids.astype(jnp.int32)


def flash_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, scale: float,
    block: int = DEFAULT_BLOCK,
) -> tuple[jax.Array, jax.Array]:
    """Causal (and same-segment) attention, blockwise, with its per-head max logit.

    Args:
      q: `[batch, T, kv_heads, group, d_qk]`.
      k: `[batch, T, kv_heads, d_qk]`.
      v: `[batch, T, kv_heads, d_v]`.
      segment_ids: `[batch, T]` (packed documents attend only within their segment) or None.
      scale: the softmax scale applied to `q.k`.
      block: tokens per block (`block_size(T, block)` is used).

    Returns:
      `(out [batch, T, kv_heads, group, d_v]` in v's dtype, `max_logits [kv_heads, group]`
      float32: the largest `q.k * scale` of each head over batch and visible pairs).
    """
    b, t = q.shape[:2]
    return _flash(q, k, v, _segments(segment_ids, b, t), float(scale), block_size(t, block))


def max_logits(
    q: jax.Array, k: jax.Array, segment_ids: jax.Array | None, scale: float,
    block: int = DEFAULT_BLOCK,
) -> jax.Array:
    """Only the per-head max logit `[kv_heads, group]` of causal attention (same shapes as
    `flash_attention`), blockwise over the causal triangle: the side pass that gives a fused
    kernel without this statistic (cuDNN) the exact value. No gradient."""
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    b, t, kv, g, _ = q.shape
    block = block_size(t, block)
    n = -(-t // block)
    qb, kb, sb = (_blocks(x, n, block) for x in (q, k, _segments(segment_ids, b, t)))
    real = _blocks(jnp.ones((b, t), bool), n, block)  # padding rows do not count

    def body(best, qi, ki, diagonal):
        s = _logits(_take(qb, qi), _take(kb, ki), scale)
        visible = _pair_mask(_take(sb, qi), _take(sb, ki), diagonal)
        visible = visible & _take(real, qi)[:, :, None, None, :, None]
        return jnp.maximum(best, jnp.max(jnp.where(visible, s, -jnp.inf), axis=(0, 1, 4, 5)))

    return _visit(n, jnp.full((kv, g), -jnp.inf, jnp.float32), body)

"""QK-clip on a tiny standalone attention: after clipping, each head's max logit is
min(S_max, tau); heads (groups) under tau are bit-for-bit unchanged; v and k_rope untouched."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optim
from optim.qk_clip import QKClipTarget

B, T, D = 2, 6, 16


def _causal_max(logits):
    """logits [B, H, T, T] -> [H]: max over batch and positions j <= i."""
    mask = np.tril(np.ones((T, T), bool))
    return jnp.max(jnp.where(mask, logits, -jnp.inf), axis=(0, 2, 3))


def mha_max_logits(x, wq, wk, num_heads, num_kv_heads):
    dh = wq.shape[-1] // num_heads
    q = (x @ wq).reshape(B, T, num_heads, dh)
    k = (x @ wk).reshape(B, T, num_kv_heads, dh)
    k = jnp.repeat(k, num_heads // num_kv_heads, axis=2)  # head h uses k head h // group
    logits = jnp.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(dh)
    return _causal_max(logits)


def _rope(x, theta=10000.0):
    """Rotate-half RoPE on [B, T, ..., R] with positions 0..T-1."""
    r = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, r, 2) / r)
    ang = np.arange(T)[:, None] * inv[None, :]  # [T, R/2]
    ang = ang.reshape((1, T) + (1,) * (x.ndim - 3) + (r // 2,))
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    x1, x2 = x[..., : r // 2], x[..., r // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def mla_max_logits(x, w_qa, w_qb, w_kva, w_kvb, h, nope, rope, vd, rkv):
    q = ((x @ w_qa) @ w_qb).reshape(B, T, h, nope + rope)
    q_nope, q_rope = q[..., :nope], _rope(q[..., nope:])
    ckv = x @ w_kva
    c, k_rope = ckv[..., :rkv], _rope(ckv[..., rkv:])  # k_rope: [B, T, rope], shared by heads
    k_nope = (c @ w_kvb).reshape(B, T, h, nope + vd)[..., :nope]
    logits = jnp.einsum("bihd,bjhd->bhij", q_nope, k_nope)
    logits = logits + jnp.einsum("bihd,bjd->bhij", q_rope, k_rope)
    return _causal_max(logits / np.sqrt(nope + rope))


def _tau_between(s, n_clipped):
    """A tau with exactly the `n_clipped` largest heads above it."""
    srt = np.sort(np.asarray(s))[::-1]
    return float(0.5 * (srt[n_clipped - 1] + srt[n_clipped]))


def _cols(w, heads, width):
    w = np.asarray(w)
    return np.concatenate([w[..., :0]] + [w[..., h * width : (h + 1) * width] for h in heads], -1)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_clip_mha_gqa(num_heads, num_kv_heads):
    dh = 4
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (B, T, D))
    wq = jax.random.normal(k[1], (D, num_heads * dh))
    wk = jax.random.normal(k[2], (D, num_kv_heads * dh))
    boost = np.ones(num_heads)
    boost[0] = 8.0  # head 0 clipped; group 0 holds it
    wq = wq * jnp.repeat(jnp.asarray(boost), dh)
    s = mha_max_logits(x, wq, wk, num_heads, num_kv_heads)
    tau = _tau_between(s, 1)
    assert int(np.argmax(s)) == 0
    q2, k2 = optim.clip_mha(wq, wk, s, tau, num_heads=num_heads, num_kv_heads=num_kv_heads)
    s2 = mha_max_logits(x, q2, k2, num_heads, num_kv_heads)
    np.testing.assert_allclose(s2, np.minimum(s, tau), rtol=1e-4)
    group = num_heads // num_kv_heads
    untouched_q = [h for h in range(num_heads) if h // group != 0]
    untouched_k = list(range(1, num_kv_heads))
    np.testing.assert_array_equal(_cols(q2, untouched_q, dh), _cols(wq, untouched_q, dh))
    np.testing.assert_array_equal(_cols(k2, untouched_k, dh), _cols(wk, untouched_k, dh))
    assert not np.array_equal(_cols(q2, [0], dh), _cols(wq, [0], dh))


def test_clip_mha_nothing_above_tau_is_identity():
    wq = jax.random.normal(jax.random.key(1), (D, 8))
    wk = jax.random.normal(jax.random.key(2), (D, 8))
    q2, k2 = optim.clip_mha(wq, wk, jnp.array([1.0, 99.0]), 100.0, num_heads=2)
    np.testing.assert_array_equal(q2, wq)
    np.testing.assert_array_equal(k2, wk)


def test_clip_mha_leading_stack_axis_matches_per_layer():
    k = jax.random.split(jax.random.key(3), 2)
    wq = jax.random.normal(k[0], (3, D, 8)).astype(jnp.bfloat16)
    wk = jax.random.normal(k[1], (3, D, 4)).astype(jnp.bfloat16)
    s = jnp.array([[150.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 400.0, 120.0, 1.0]])
    q2, k2 = optim.clip_mha(wq, wk, s, 100.0, num_heads=4, num_kv_heads=2)
    assert q2.dtype == jnp.bfloat16
    for layer in range(3):
        ql, kl = optim.clip_mha(wq[layer], wk[layer], s[layer], 100.0, num_heads=4, num_kv_heads=2)
        np.testing.assert_array_equal(q2[layer], ql)
        np.testing.assert_array_equal(k2[layer], kl)
    np.testing.assert_array_equal(q2[1], wq[1])


MLA = dict(h=4, nope=4, rope=2, vd=3, rkv=6)


def _mla_weights(key):
    h, nope, rope, vd, rkv = (MLA[k] for k in ("h", "nope", "rope", "vd", "rkv"))
    k = jax.random.split(key, 5)
    rq = 8
    x = jax.random.normal(k[0], (B, T, D))
    w_qa = jax.random.normal(k[1], (D, rq)) / np.sqrt(D)
    w_qb = jax.random.normal(k[2], (rq, h * (nope + rope)))
    w_kva = jax.random.normal(k[3], (D, rkv + rope))
    w_kvb = jax.random.normal(k[4], (rkv, h * (nope + vd)))
    boost = np.ones(h)
    boost[[1, 3]] = 10.0  # heads 1 and 3 get large logits (through both nope and rope)
    w_qb = w_qb * jnp.repeat(jnp.asarray(boost), nope + rope)
    return x, w_qa, w_qb, w_kva, w_kvb


def test_clip_mla():
    h, nope, rope, vd, rkv = (MLA[k] for k in ("h", "nope", "rope", "vd", "rkv"))
    x, w_qa, w_qb, w_kva, w_kvb = _mla_weights(jax.random.key(4))
    s = mla_max_logits(x, w_qa, w_qb, w_kva, w_kvb, **MLA)
    tau = _tau_between(s, 2)
    assert set(np.argsort(np.asarray(s))[-2:]) == {1, 3}
    qb2, kvb2 = optim.clip_mla(
        w_qb, w_kvb, s, tau, num_heads=h, qk_nope_head_dim=nope, qk_rope_head_dim=rope,
        v_head_dim=vd,
    )
    s2 = mla_max_logits(x, w_qa, qb2, w_kva, kvb2, **MLA)
    np.testing.assert_allclose(s2, np.minimum(s, tau), rtol=1e-4)
    # Heads under tau: bit for bit; v columns of every head: bit for bit.
    np.testing.assert_array_equal(_cols(qb2, [0, 2], nope + rope), _cols(w_qb, [0, 2], nope + rope))
    np.testing.assert_array_equal(_cols(kvb2, [0, 2], nope + vd), _cols(w_kvb, [0, 2], nope + vd))
    v_cols = lambda w: np.asarray(w).reshape(rkv, h, nope + vd)[..., nope:]  # noqa: E731
    np.testing.assert_array_equal(v_cols(kvb2), v_cols(w_kvb))
    # q_rope of a clipped head scales by gamma, q_nope and k_nope by sqrt(gamma).
    g = tau / float(s[1])
    q_h = np.asarray(qb2).reshape(-1, h, nope + rope)[:, 1]
    q_h0 = np.asarray(w_qb).reshape(-1, h, nope + rope)[:, 1]
    np.testing.assert_allclose(q_h[:, nope:], g * q_h0[:, nope:], rtol=1e-6)
    np.testing.assert_allclose(q_h[:, :nope], np.sqrt(g) * q_h0[:, :nope], rtol=1e-6)


def _tree(key):
    h, nope, rope, vd = (MLA[k] for k in ("h", "nope", "rope", "vd"))
    x, w_qa, w_qb, w_kva, w_kvb = _mla_weights(key)
    k = jax.random.split(jax.random.fold_in(key, 1), 2)
    wq = jax.random.normal(k[0], (D, 4 * 4)) * jnp.repeat(jnp.array([6.0, 1, 1, 1]), 4)
    wk = jax.random.normal(k[1], (D, 2 * 4))
    params = {
        "layers_0": {"attn": {"q_proj": {"kernel": wq}, "k_proj": {"kernel": wk}}},
        "layers_1": {
            "attn": {
                "q_a_proj": {"kernel": w_qa},
                "q_b_proj": {"kernel": w_qb},
                "kv_a_proj": {"kernel": w_kva},
                "kv_b_proj": {"kernel": w_kvb},
            }
        },
        "lm_head": {"kernel": jnp.ones((D, 8))},
    }
    targets = [
        QKClipTarget("mha", ("layers_0", "attn", "q_proj", "kernel"), "layers_0/attn/k_proj/kernel",
                     "layers_0", num_heads=4, num_kv_heads=2),
        QKClipTarget("mla", ("layers_1", "attn", "q_b_proj", "kernel"),
                     ("layers_1", "attn", "kv_b_proj", "kernel"), "layers_1", num_heads=h,
                     qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=vd),
    ]
    max_logits = {
        "layers_0": mha_max_logits(x, wq, wk, 4, 2),
        "layers_1": mla_max_logits(x, w_qa, w_qb, w_kva, w_kvb, **MLA),
    }
    return x, params, targets, max_logits


def test_qk_clip_tree_and_metrics():
    x, params, targets, max_logits = _tree(jax.random.key(5))
    all_s = np.concatenate([np.asarray(v) for v in max_logits.values()])
    tau = _tau_between(all_s, 3)
    new, metrics = jax.jit(lambda p, m: optim.qk_clip(p, m, tau=tau, targets=targets))(
        params, max_logits
    )
    assert float(metrics["qk_clip/frac_clipped"]) == pytest.approx(3 / 8)
    assert float(metrics["qk_clip/max_logit"]) == pytest.approx(all_s.max(), rel=1e-6)
    a0, a1 = new["layers_0"]["attn"], new["layers_1"]["attn"]
    s0 = mha_max_logits(x, a0["q_proj"]["kernel"], a0["k_proj"]["kernel"], 4, 2)
    s1 = mla_max_logits(x, a1["q_a_proj"]["kernel"], a1["q_b_proj"]["kernel"],
                        a1["kv_a_proj"]["kernel"], a1["kv_b_proj"]["kernel"], **MLA)
    np.testing.assert_allclose(s0, np.minimum(max_logits["layers_0"], tau), rtol=1e-4)
    np.testing.assert_allclose(s1, np.minimum(max_logits["layers_1"], tau), rtol=1e-4)
    # k_rope lives in kv_a_proj: untouched, as is everything off the target paths.
    old1 = params["layers_1"]["attn"]
    np.testing.assert_array_equal(a1["kv_a_proj"]["kernel"], old1["kv_a_proj"]["kernel"])
    np.testing.assert_array_equal(a1["q_a_proj"]["kernel"], old1["q_a_proj"]["kernel"])
    np.testing.assert_array_equal(new["lm_head"]["kernel"], params["lm_head"]["kernel"])


def test_qk_clip_sharded_equals_unsharded():
    _, params, targets, max_logits = _tree(jax.random.key(6))
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    col = NamedSharding(mesh, P(None, "tensor"))
    sharded = jax.tree.map(lambda x: jax.device_put(x, col), params)
    fn = jax.jit(lambda p, m: optim.qk_clip(p, m, tau=20.0, targets=targets)[0])
    jax.tree.map(np.testing.assert_array_equal, fn(sharded, max_logits), fn(params, max_logits))


def test_errors_name_the_problem():
    _, params, targets, max_logits = _tree(jax.random.key(7))
    with pytest.raises(KeyError, match="layers_1"):
        optim.qk_clip(params, {"layers_0": max_logits["layers_0"]}, targets=targets)
    bad = QKClipTarget("mha", ("layers_0", "attn", "nope", "kernel"), ("x",), "layers_0",
                       num_heads=4)
    with pytest.raises(KeyError, match="layers_0/attn/nope/kernel"):
        optim.qk_clip(params, max_logits, targets=[bad])
    with pytest.raises(ValueError, match="num_heads=3"):
        optim.clip_mha(jnp.ones((4, 12)), jnp.ones((4, 12)), jnp.ones(4), num_heads=3)
    with pytest.raises(ValueError, match="kind"):
        QKClipTarget("gqa", ("a",), ("b",), "k", num_heads=2)

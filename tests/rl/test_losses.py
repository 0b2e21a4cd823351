"""rl.losses against the papers' formulas computed by hand (numpy loops over sequences and
tokens), on-policy gradients in closed form, masking == removal, and the advantage / DAPO
helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import losses

# A fixed example: B = 4 sequences, T = 3 tokens, lengths 3, 3, 2, 1. "wide" ratios hit the
# token clip ranges of GRPO/DAPO (0.8/1.2/1.28) and GMPO (e^+-0.4 = 0.670/1.492) on some
# tokens, "narrow" ones (|log r| ~ 1e-4) straddle GSPO's 3e-4/4e-4 range.
MASK = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 0, 0]], np.float32)
ADV = np.array([1.0, -0.5, 2.0, -1.5], np.float32)
OLD = np.log(np.array([[0.5, 0.2, 0.7], [0.3, 0.6, 0.4], [0.9, 0.1, 0.5], [0.25, 0.8, 0.3]]))
RATIOS = {
    "wide": np.array([[1.5, 0.6, 1.1], [1.6, 1.25, 0.5], [1.0, 1.3, 2.0], [0.6, 1.05, 1.4]]),
    "narrow": np.exp(np.array([[1e-4, 3e-4, 5e-4], [-2e-4, -6e-4, 1e-4],
                               [5e-4, 4e-4, 9.0], [-2e-4, 0.0, 0.0]])),
}
REF = OLD + np.array([[0.1, -0.2, 0.05], [0.3, 0.0, -0.1], [-0.4, 0.2, 0.0], [0.15, 0.1, 0.0]])
SAMPLER = OLD + np.array([[0.5, -1.0, 0.1], [-0.2, 0.9, 0.0], [0.3, -0.1, 0.2], [-0.8, 0.0, 0.0]])


def _example(kind):
    logp = (OLD + np.log(RATIOS[kind])).astype(np.float32)
    return logp, OLD.astype(np.float32)


# ------------------------------------------------------------ numpy references (by hand)
def ppo(r, a, lo, hi):
    return min(r * a, min(max(r, 1 - lo), 1 + hi) * a)


def k3(lp, ref):
    return np.exp(ref - lp) - (ref - lp) - 1


def tis(old, samp, cap):
    return min(np.exp(old - samp), cap)


def ref_grpo(lp, old, a, m, ref=None, lo=0.2, hi=0.2, beta=0.04, samp=None, cap=2.0):
    total, n = 0.0, 0
    for i in range(len(a)):
        length = m[i].sum()
        if length == 0:
            continue
        n += 1
        s = 0.0
        for t in range(lp.shape[1]):
            if m[i, t]:
                term = ppo(np.exp(lp[i, t] - old[i, t]), a[i], lo, hi)
                if samp is not None:
                    term *= tis(old[i, t], samp[i, t], cap)
                if ref is not None:
                    term -= beta * k3(lp[i, t], ref[i, t])
                s += term
        total += s / length
    return -total / n


def ref_dr_grpo(lp, old, a, m, ref=None, lo=0.2, hi=0.2, beta=0.0, max_len=None, samp=None):
    lmax = lp.shape[1] if max_len is None else max_len
    total, n = 0.0, 0
    for i in range(len(a)):
        if m[i].sum() == 0:
            continue
        n += 1
        for t in range(lp.shape[1]):
            if m[i, t]:
                term = ppo(np.exp(lp[i, t] - old[i, t]), a[i], lo, hi)
                if samp is not None:
                    term *= tis(old[i, t], samp[i, t], 2.0)
                if ref is not None:
                    term -= beta * k3(lp[i, t], ref[i, t])
                total += term
    return -total / (n * lmax)


def ref_dapo(lp, old, a, m, lo=0.2, hi=0.28):
    total, tokens = 0.0, 0
    for i in range(len(a)):
        for t in range(lp.shape[1]):
            if m[i, t]:
                total += ppo(np.exp(lp[i, t] - old[i, t]), a[i], lo, hi)
                tokens += 1
    return -total / tokens


def ref_gspo(lp, old, a, m, lo=3e-4, hi=4e-4, ref=None, beta=0.0, samp=None, cap=2.0):
    total, kl, n = 0.0, 0.0, 0
    for i in range(len(a)):
        idx = np.nonzero(m[i])[0]
        if len(idx) == 0:
            continue
        n += 1
        s = np.exp(np.mean(lp[i, idx] - old[i, idx]))
        term = ppo(s, a[i], lo, hi)
        if samp is not None:
            term *= min(np.exp(np.mean(old[i, idx] - samp[i, idx])), cap)
        total += term
        if ref is not None:
            kl += beta * np.mean(k3(lp[i, idx], ref[i, idx]))
    return (-total + kl) / n


def ref_gmpo(lp, old, a, m, eps=0.4, samp=None, cap=2.0):
    """Eq. 4 literally: the |o|-th root of the product of |min(r A, clip(r, e^-eps, e^eps) A)|,
    times sgn(A)."""
    total, n = 0.0, 0
    for i in range(len(a)):
        idx = np.nonzero(m[i])[0]
        if len(idx) == 0:
            continue
        n += 1
        prod = 1.0
        for t in idx:
            r = np.exp(lp[i, t] - old[i, t])
            prod *= abs(min(r * a[i], min(max(r, np.exp(-eps)), np.exp(eps)) * a[i]))
        term = prod ** (1.0 / len(idx)) * np.sign(a[i])
        if samp is not None:
            term *= min(np.exp(np.mean(old[i, idx] - samp[i, idx])), cap)
        total += term
    return -total / n


def _close(actual, expected):
    np.testing.assert_allclose(float(actual), expected, rtol=2e-5, atol=1e-7)


# ------------------------------------------------------------------------------- values
@pytest.mark.parametrize("kind", ["wide", "narrow"])
def test_grpo_value(kind):
    lp, old = _example(kind)
    loss, metrics = losses.grpo(lp, old, ADV, MASK)
    _close(loss, ref_grpo(lp, old, ADV, MASK))
    loss, metrics = losses.grpo(lp, old, ADV, MASK, REF, beta=0.1)
    _close(loss, ref_grpo(lp, old, ADV, MASK, REF, beta=0.1))
    kl = np.sum(k3(lp, REF) * MASK) / MASK.sum()
    _close(metrics["kl"], kl)


def test_grpo_metrics():
    lp, old = _example("wide")
    _, m = losses.grpo(lp, old, ADV, MASK)
    r = RATIOS["wide"]
    # Clipped branch active: A > 0 and r > 1.2, or A < 0 and r < 0.8 (unmasked tokens only).
    clipped = [(r[i, t] > 1.2) if ADV[i] > 0 else (r[i, t] < 0.8)
               for i in range(4) for t in range(3) if MASK[i, t]]
    _close(m["clip_frac"], np.mean(clipped))  # tokens (0,0), (1,2), (2,1), (3,0)
    assert np.sum(clipped) == 4
    valid = MASK > 0
    _close(m["ratio_mean"], r[valid].mean())
    _close(m["ratio_max"], r[valid].max())  # 1.5: the masked 2.0 is not counted
    _close(m["ratio_min"], r[valid].min())
    _close(m["approx_kl"], np.mean((r - 1 - np.log(r))[valid]))
    _close(m["kl"], 0.0)


@pytest.mark.parametrize("kind", ["wide", "narrow"])
def test_dr_grpo_value(kind):
    lp, old = _example(kind)
    _close(losses.dr_grpo(lp, old, ADV, MASK)[0], ref_dr_grpo(lp, old, ADV, MASK))
    _close(losses.dr_grpo(lp, old, ADV, MASK, max_len=16)[0],
           ref_dr_grpo(lp, old, ADV, MASK, max_len=16))
    _close(losses.dr_grpo(lp, old, ADV, MASK, REF, beta=0.2)[0],
           ref_dr_grpo(lp, old, ADV, MASK, REF, beta=0.2))


@pytest.mark.parametrize("kind", ["wide", "narrow"])
def test_dapo_value(kind):
    lp, old = _example(kind)
    loss, m = losses.dapo(lp, old, ADV, MASK)
    _close(loss, ref_dapo(lp, old, ADV, MASK))
    if kind == "wide":
        # Clip-higher: r = 1.25 with A > 0 would be clipped by GRPO's 1.2, not by DAPO's 1.28.
        r = RATIOS["wide"]
        clipped = [(r[i, t] > 1.28) if ADV[i] > 0 else (r[i, t] < 0.8)
                   for i in range(4) for t in range(3) if MASK[i, t]]
        _close(m["clip_frac"], np.mean(clipped))


@pytest.mark.parametrize("kind", ["wide", "narrow"])
def test_gspo_value(kind):
    lp, old = _example(kind)
    loss, m = losses.gspo(lp, old, ADV, MASK)
    _close(loss, ref_gspo(lp, old, ADV, MASK))
    _close(losses.gspo(lp, old, ADV, MASK, REF, beta=0.3)[0],
           ref_gspo(lp, old, ADV, MASK, ref=REF, beta=0.3))
    s = np.array([np.exp(np.mean((lp - old)[i, MASK[i] > 0])) for i in range(4)])
    clipped = [(s[i] > 1 + 4e-4) if ADV[i] > 0 else (s[i] < 1 - 3e-4) for i in range(4)]
    _close(m["clip_frac"], np.mean(clipped))
    _close(m["seq_ratio_mean"], s.mean())
    if kind == "narrow":
        # log s = 3e-4 (A > 0: inside), -2.5e-4 (A < 0: inside), 4.5e-4 (A > 0: clipped),
        # -2e-4 (A < 0: inside): the masked 9.0 must not enter the mean.
        assert clipped == [False, False, True, False]


@pytest.mark.parametrize("kind", ["wide", "narrow"])
def test_gspo_token_equals_gspo_for_sequence_advantages(kind):
    lp, old = _example(kind)
    f = lambda fn: jax.value_and_grad(lambda x: fn(x, old, ADV, MASK)[0])(jnp.asarray(lp))
    (v1, g1), (v2, g2) = f(losses.gspo), f(losses.gspo_token)
    _close(v2, float(v1))
    np.testing.assert_allclose(np.asarray(g2), np.asarray(g1), rtol=1e-5, atol=1e-7)


def test_gspo_token_per_token_advantages():
    """Eq. 13 by hand with A_it per token: s_it has the value of s_i."""
    lp, old = _example("narrow")
    adv = np.array([[1.0, -1.0, 0.5], [0.2, 0.3, -0.4], [-1.0, 2.0, 0.0], [0.7, 0.0, 0.0]])
    expected, n = 0.0, 0
    for i in range(4):
        idx = np.nonzero(MASK[i])[0]
        n += 1
        s = np.exp(np.mean(lp[i, idx] - old[i, idx]))
        expected += np.mean([ppo(s, adv[i, t], 3e-4, 4e-4) for t in idx])
    _close(losses.gspo_token(lp, old, adv, MASK)[0], -expected / n)


@pytest.mark.parametrize("kind", ["wide", "narrow"])
def test_gmpo_value(kind):
    lp, old = _example(kind)
    loss, m = losses.gmpo(lp, old, ADV, MASK)
    _close(loss, ref_gmpo(lp, old, ADV, MASK))
    _close(losses.gmpo(lp, old, ADV, MASK, eps_lo=0.1, eps_hi=0.1)[0],
           ref_gmpo(lp, old, ADV, MASK, eps=0.1))
    if kind == "wide":
        # Sign-aware: A > 0 clips log r > 0.4 (r = 1.5 in row 0), A < 0 clips log r < -0.4
        # (r = 0.5 in row 1, r = 0.6 in row 3); r = 0.6 with A > 0 (row 0) and r = 1.6 with
        # A < 0 (row 1) are outside [e^-0.4, e^0.4] but on the side that is not clipped.
        lr = np.log(RATIOS["wide"])
        clipped = [(lr[i, t] > 0.4) if ADV[i] > 0 else (lr[i, t] < -0.4)
                   for i in range(4) for t in range(3) if MASK[i, t]]
        assert np.sum(clipped) == 3
        _close(m["clip_frac"], np.mean(clipped))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "gspo", "gmpo"])
def test_truncated_importance_sampling(name):
    lp, old = _example("wide" if name != "gspo" else "narrow")
    samp = SAMPLER.astype(np.float32)
    loss, m = losses.get(name)(lp, old, ADV, MASK, sampler_logp=samp, tis_cap=2.0)
    ref = {"grpo": lambda: ref_grpo(lp, old, ADV, MASK, samp=samp),
           "dr_grpo": lambda: ref_dr_grpo(lp, old, ADV, MASK, samp=samp),
           "gspo": lambda: ref_gspo(lp, old, ADV, MASK, samp=samp),
           "gmpo": lambda: ref_gmpo(lp, old, ADV, MASK, samp=samp)}[name]()
    _close(loss, ref)
    if name == "grpo":
        w = np.exp(OLD - SAMPLER)  # token (1, 1): e^-0.9 ~ 0.41; (3, 0): e^0.8 ~ 2.2 -> capped
        _close(m["tis_clip_frac"], np.mean((w > 2.0)[MASK > 0]))
        _close(m["tis_weight_mean"], np.mean(np.minimum(w, 2.0)[MASK > 0]))
        # The weights are constants: the gradient is the weighted gradient.
        g = jax.grad(lambda x: losses.grpo(x, old, ADV, MASK, sampler_logp=samp)[0])(jnp.asarray(old))
        gw = -ADV[:, None] * MASK / MASK.sum(1, keepdims=True) / 4 * np.minimum(w, 2.0)
        np.testing.assert_allclose(np.asarray(g), gw, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- on-policy gradients
def _onpolicy_grad(fn, **kw):
    """d loss / d logp at logp == old_logp, logp = log_softmax(theta)[token] for a parameter
    vector theta, old_logp its stop-gradient copy; returned as d loss / d logp_it via the
    chain rule on the token's own logit (d logp_token / d theta_token = 1 - p)."""
    rng = np.random.default_rng(0)
    theta = jnp.asarray(rng.normal(size=(4, 3, 5)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 5, (4, 3)))

    def logp_of(th):
        return jnp.take_along_axis(jax.nn.log_softmax(th), tokens[..., None], -1)[..., 0]

    def loss(th):
        lp = logp_of(th)
        return fn(lp, jax.lax.stop_gradient(lp), ADV, MASK, **kw)[0]

    g_theta = jax.grad(loss)(theta)
    # d loss/d theta_{it,v} = g_it (onehot_v - p_v): recover g_it from the token's coordinate.
    p = jnp.exp(logp_of(theta))
    g_tok = jnp.take_along_axis(g_theta, tokens[..., None], -1)[..., 0]
    return np.asarray(g_tok / (1.0 - p)), np.asarray(logp_of(theta))


LENGTHS = MASK.sum(1, keepdims=True)
B = 4


@pytest.mark.parametrize("name", ["grpo", "gspo", "gspo_token", "gmpo"])
def test_onpolicy_gradient_sequence_mean(name):
    """GRPO (and GSPO, GMPO at r = 1): d L / d logp_it = -A_i m_it / (|o_i| G), G = B."""
    g, _ = _onpolicy_grad(losses.get(name))
    np.testing.assert_allclose(g, -ADV[:, None] * MASK / (LENGTHS * B), rtol=1e-5, atol=1e-7)


def test_onpolicy_gradient_dr_grpo():
    g, _ = _onpolicy_grad(losses.dr_grpo)
    np.testing.assert_allclose(g, -ADV[:, None] * MASK / (B * 3), rtol=1e-5, atol=1e-7)
    g, _ = _onpolicy_grad(losses.dr_grpo, max_len=10)
    np.testing.assert_allclose(g, -ADV[:, None] * MASK / (B * 10), rtol=1e-5, atol=1e-7)


def test_onpolicy_gradient_dapo():
    g, _ = _onpolicy_grad(losses.dapo)
    np.testing.assert_allclose(g, -ADV[:, None] * MASK / MASK.sum(), rtol=1e-5, atol=1e-7)


def test_onpolicy_gradient_grpo_with_kl():
    """+ beta d k3 / d logp = beta (1 - exp(ref - logp)), per-sequence token mean."""
    rng = np.random.default_rng(1)
    _, lp = _onpolicy_grad(losses.grpo)
    ref = jnp.asarray(lp + rng.normal(scale=0.3, size=lp.shape), jnp.float32)
    g, lp = _onpolicy_grad(losses.grpo, ref_logp=ref, beta=0.5)
    expected = (-ADV[:, None] + 0.5 * (1 - np.exp(np.asarray(ref) - lp))) * MASK / (LENGTHS * B)
    np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", list(losses.LOSSES))
def test_empty_sequence_equals_removal(name):
    """A fully masked sequence (dynamic sampling with static shapes) == dropping it."""
    lp, old = _example("wide")
    mask = MASK.copy()
    mask[1] = 0
    fn = losses.get(name)
    full = fn(lp, old, ADV, mask)[0]
    keep = [0, 2, 3]
    kw = {"max_len": 3} if name == "dr_grpo" else {}
    dropped = fn(lp[keep], old[keep], ADV[keep], MASK[keep], **kw)[0]
    _close(full, float(dropped))


def test_losses_jit_and_unknown_name():
    lp, old = _example("wide")
    for fn in losses.LOSSES.values():
        a = jax.jit(fn)(lp, old, ADV, MASK)[0]
        _close(a, float(fn(lp, old, ADV, MASK)[0]))
    with pytest.raises(ValueError, match="unknown RL loss 'ppo'"):
        losses.get("ppo")


# ------------------------------------------------------------ advantages and DAPO helpers
def test_group_advantages_by_hand():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.0])
    a = np.asarray(losses.group_advantages(rewards, 4, eps=1e-6))
    # group 1: mean 0.5, population std 0.5; group 2: all equal -> 0;
    # group 3: mean 0.75, std sqrt((3 * 0.75^2 + 2.25^2) / 4) = sqrt(27/16) = 1.299...
    std3 = np.sqrt(27 / 16)
    expected = np.array([0.5, -0.5, -0.5, 0.5] * 1) / (0.5 + 1e-6)
    expected = np.concatenate([expected, np.zeros(4),
                               (np.array([0, 0, 0, 3.0]) - 0.75) / (std3 + 1e-6)])
    np.testing.assert_allclose(a, expected, rtol=1e-6)
    dr = np.asarray(losses.group_advantages(rewards, 4, normalize_std=False))
    np.testing.assert_allclose(dr, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25])
    with pytest.raises(ValueError, match="multiple of group_size"):
        losses.group_advantages(rewards, 5)


def test_dynamic_sampling_mask():
    rewards = jnp.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 0.5, 0.5, 0.2])
    keep = np.asarray(jax.jit(losses.dapo_dynamic_sampling_mask, static_argnums=1)(rewards, 3))
    assert keep.dtype == bool and keep.shape == (12,)
    np.testing.assert_array_equal(keep, [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1])


def test_overlong_penalty_eq13():
    lengths = jnp.array([0, 10, 16, 17, 19, 20, 21, 100])
    out = np.asarray(losses.overlong_penalty(lengths, max_len=20, cache_len=4))
    # L_max - L_cache = 16: 0 up to 16, then (16 - |y|) / 4, then -1 past 20.
    np.testing.assert_allclose(out, [0, 0, 0, -0.25, -0.75, -1.0, -1.0, -1.0])
    with pytest.raises(ValueError):
        losses.overlong_penalty(lengths, max_len=4, cache_len=8)


def test_dr_grpo_constant_normalizer_is_b_times_lmax():
    """With a row masked out entirely, the default divides by the 3 non-empty rows x L_max;
    `constant_normalizer` by all B = 4 rows x L_max (the paper's constant), by hand."""
    lp, old = _example("wide")
    mask = MASK.copy()
    mask[2] = 0.0
    r = np.exp(np.asarray(lp, np.float64) - np.asarray(old, np.float64))
    clipped = np.clip(r, 0.8, 1.2)
    terms = np.minimum(r * ADV[:, None], clipped * ADV[:, None]) * mask
    lmax = lp.shape[-1]
    _close(losses.dr_grpo(lp, old, ADV, mask)[0], -terms.sum() / (3 * lmax))
    _close(losses.dr_grpo(lp, old, ADV, mask, constant_normalizer=True)[0],
           -terms.sum() / (4 * lmax))

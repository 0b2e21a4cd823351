"""rl.preference against the papers' formulas computed by hand (plain math over pairs),
gradients against the papers' closed forms or finite differences of those hand formulas,
argument validation, and the preference step on a tiny model (one step moves the policy;
with the reference equal to the policy DPO's loss is log 2; the reference from the batch,
from frozen params and from chunked or whole logits agree)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from model import ModelConfig
from rl import preference as pref
from train.step import TrainState

# Three pairs: pair 0 is ordered right by the implicit reward (h > 0), pair 1 wrongly,
# pair 2 barely; lengths differ so length normalization matters.
PI_C = np.array([-5.0, -12.0, -3.0], np.float32)
PI_R = np.array([-7.0, -10.0, -3.5], np.float32)
REF_C = np.array([-6.0, -11.0, -3.2], np.float32)
REF_R = np.array([-6.5, -11.5, -3.1], np.float32)
LEN_C = np.array([4.0, 10.0, 2.0], np.float32)
LEN_R = np.array([5.0, 8.0, 3.0], np.float32)
N = len(PI_C)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _h(i, pc=PI_C, pr=PI_R):
    return (float(pc[i]) - float(REF_C[i])) - (float(pr[i]) - float(REF_R[i]))


def hand_dpo(pc, pr, beta, ls=0.0):
    return sum(-(1 - ls) * logsig(beta * _h(i, pc, pr)) - ls * logsig(-beta * _h(i, pc, pr))
               for i in range(N)) / N


def hand_ipo(pc, pr, beta):
    return sum((_h(i, pc, pr) - 1 / (2 * beta)) ** 2 for i in range(N)) / N


def hand_simpo(pc, pr, beta, gamma):
    return sum(-logsig(beta * float(pc[i]) / float(LEN_C[i])
                       - beta * float(pr[i]) / float(LEN_R[i]) - gamma)
               for i in range(N)) / N


def hand_orpo(pc, pr, lam):
    """(L, NLL, L_OR): odds = P / (1 - P) with P = exp(mean token log-prob)."""
    nll = orl = 0.0
    for i in range(N):
        p_c = math.exp(float(pc[i]) / float(LEN_C[i]))
        p_r = math.exp(float(pr[i]) / float(LEN_R[i]))
        nll += -math.log(p_c) / N
        orl += -logsig(math.log(p_c / (1 - p_c)) - math.log(p_r / (1 - p_r))) / N
    return nll + lam * orl, nll, orl


# KTO: five unpaired examples, three desirable.
LOGPS = np.array([-4.0, -9.0, -2.5, -7.0, -3.0], np.float32)
REF_LOGPS = np.array([-4.5, -8.0, -2.0, -7.5, -3.3], np.float32)
DESIRABLE = np.array([True, False, True, False, True])


def hand_kto(lp, kl, beta, ld, lu):
    z0 = max(kl, 0.0)
    total = 0.0
    for i in range(len(lp)):
        r = float(lp[i]) - float(REF_LOGPS[i])
        total += ld * (1 - sig(beta * (r - z0))) if DESIRABLE[i] else lu * (1 - sig(beta * (z0 - r)))
    return total / len(lp)


def _fd(f, x, i, eps=1e-4):
    """Central difference of the float64 hand formula `f` in coordinate i of `x`."""
    xp, xm = np.array(x, np.float64), np.array(x, np.float64)
    xp[i] += eps
    xm[i] -= eps
    return (f(xp) - f(xm)) / (2 * eps)


# ---------------------------------------------------------------------- values by hand
@pytest.mark.parametrize("beta,ls", [(0.1, 0.0), (0.5, 0.0), (0.5, 0.2)])
def test_dpo_value_and_metrics(beta, ls):
    loss, m = pref.dpo(PI_C, PI_R, REF_C, REF_R, beta=beta, label_smoothing=ls)
    assert float(loss) == pytest.approx(hand_dpo(PI_C, PI_R, beta, ls), rel=1e-6)
    margins = [beta * _h(i) for i in range(N)]
    assert float(m["reward_margin"]) == pytest.approx(np.mean(margins), rel=1e-5)
    assert float(m["reward_accuracy"]) == pytest.approx(np.mean([x > 0 for x in margins]))
    assert float(m["reward_chosen"]) == pytest.approx(beta * np.mean(PI_C - REF_C), rel=1e-5)
    assert float(m["reward_rejected"]) == pytest.approx(beta * np.mean(PI_R - REF_R), rel=1e-5)
    assert float(m["logps_chosen"]) == pytest.approx(np.mean(PI_C))
    assert float(m["logps_rejected"]) == pytest.approx(np.mean(PI_R))


@pytest.mark.parametrize("beta,ls,alpha", [(0.1, 0.0, 1.0), (0.5, 0.2, 0.3)])
def test_dpo_with_nll_of_chosen_value_and_gradient(beta, ls, alpha):
    """RPO: DPO + alpha * mean_pairs(-pi_c / |y_c|); the extra gradient on pi_c is
    -alpha / (|y_c| n); pi_r's is DPO's."""
    loss, m = pref.dpo(PI_C, PI_R, REF_C, REF_R, beta=beta, label_smoothing=ls,
                       nll_weight=alpha, chosen_lengths=LEN_C)
    nll = sum(-float(PI_C[i]) / float(LEN_C[i]) for i in range(N)) / N  # (5/4+12/10+3/2)/3
    assert nll == pytest.approx((1.25 + 1.2 + 1.5) / 3)
    dpo = hand_dpo(PI_C, PI_R, beta, ls)
    assert float(loss) == pytest.approx(dpo + alpha * nll, rel=1e-6)
    assert float(m["nll_loss"]) == pytest.approx(nll, rel=1e-6)
    assert float(m["dpo_loss"]) == pytest.approx(dpo, rel=1e-6)
    assert float(m["reward_margin"]) == pytest.approx(np.mean([beta * _h(i) for i in range(N)]),
                                                      rel=1e-5)
    f = lambda c, r, a: pref.dpo(c, r, REF_C, REF_R, beta=beta, label_smoothing=ls,  # noqa: E731
                                 nll_weight=a, chosen_lengths=LEN_C)[0]
    g_c, g_r = jax.grad(f, argnums=(0, 1))(jnp.asarray(PI_C), jnp.asarray(PI_R), alpha)
    g0_c, g0_r = jax.grad(f, argnums=(0, 1))(jnp.asarray(PI_C), jnp.asarray(PI_R), 0.0)
    for i in range(N):
        assert float(g_c[i] - g0_c[i]) == pytest.approx(-alpha / (float(LEN_C[i]) * N), rel=1e-5)
        assert float(g_r[i]) == pytest.approx(float(g0_r[i]), rel=1e-6)
    # nll_weight = 0 is plain DPO, lengths or not, with no extra metric.
    l0, m0 = pref.dpo(PI_C, PI_R, REF_C, REF_R, beta=beta, label_smoothing=ls,
                      chosen_lengths=LEN_C)
    assert float(l0) == pytest.approx(dpo, rel=1e-6) and "nll_loss" not in m0


def test_ipo_value():
    loss, m = pref.ipo(PI_C, PI_R, REF_C, REF_R, beta=0.25)
    assert float(loss) == pytest.approx(hand_ipo(PI_C, PI_R, 0.25), rel=1e-6)
    assert float(m["reward_margin"]) == pytest.approx(0.25 * np.mean([_h(i) for i in range(N)]))


def test_simpo_value():
    loss, m = pref.simpo(PI_C, PI_R, LEN_C, LEN_R, beta=2.0, gamma=0.5)
    assert float(loss) == pytest.approx(hand_simpo(PI_C, PI_R, 2.0, 0.5), rel=1e-6)
    rc, rr = 2.0 * PI_C / LEN_C, 2.0 * PI_R / LEN_R
    assert float(m["reward_chosen"]) == pytest.approx(np.mean(rc), rel=1e-6)
    assert float(m["reward_accuracy"]) == pytest.approx(np.mean(rc > rr))


def test_orpo_value_and_terms():
    loss, m = pref.orpo(PI_C, PI_R, LEN_C, LEN_R, lam=0.1)
    total, nll, orl = hand_orpo(PI_C, PI_R, 0.1)
    assert float(loss) == pytest.approx(total, rel=1e-6)
    assert float(m["nll_loss"]) == pytest.approx(nll, rel=1e-6)
    assert float(m["or_loss"]) == pytest.approx(orl, rel=1e-6)


def test_orpo_log_odds_stable_at_both_ends():
    """P -> 1 (mean log-prob -1e-6) and P -> 0 (-60): log odds as float64 math gives."""
    pc, pr = np.array([-1e-6, -60.0], np.float32), np.array([-60.0, -1e-6], np.float32)
    ones = np.ones(2, np.float32)
    _, m = pref.orpo(pc, pr, ones, ones, lam=1.0)

    def log_odds(x):
        return x - math.log(-math.expm1(x))

    want = np.mean([log_odds(float(pc[i])) - log_odds(float(pr[i])) for i in range(2)])
    assert np.isfinite(float(m["log_odds_ratio"]))
    assert float(m["log_odds_ratio"]) == pytest.approx(want, rel=1e-5)
    g = jax.grad(lambda c: pref.orpo(c, pr, ones, ones)[0])(jnp.asarray(pc))
    assert np.all(np.isfinite(np.asarray(g)))


@pytest.mark.parametrize("kl", [0.3, -0.4])
def test_kto_value(kl):
    loss, m = pref.kto(LOGPS, REF_LOGPS, DESIRABLE, kl, beta=0.5, lambda_d=1.0, lambda_u=1.5)
    assert float(loss) == pytest.approx(hand_kto(LOGPS, kl, 0.5, 1.0, 1.5), rel=1e-6)
    r = LOGPS - REF_LOGPS
    assert float(m["kl"]) == pytest.approx(max(kl, 0.0))
    assert float(m["reward_chosen"]) == pytest.approx(0.5 * np.mean(r[DESIRABLE]), rel=1e-5)
    assert float(m["reward_rejected"]) == pytest.approx(0.5 * np.mean(r[~DESIRABLE]), rel=1e-5)


# ---------------------------------------------------------------------------- gradients
def test_dpo_gradient_is_the_papers_weight():
    beta = 0.5
    g_c, g_r = jax.grad(lambda c, r: pref.dpo(c, r, REF_C, REF_R, beta=beta)[0],
                        argnums=(0, 1))(jnp.asarray(PI_C), jnp.asarray(PI_R))
    for i in range(N):
        r_c, r_r = float(PI_C[i] - REF_C[i]), float(PI_R[i] - REF_R[i])
        w = beta * sig(beta * (r_r - r_c)) / N
        assert float(g_c[i]) == pytest.approx(-w, rel=1e-5)
        assert float(g_r[i]) == pytest.approx(w, rel=1e-5)


def test_reference_logps_get_no_gradient():
    g = jax.grad(lambda a, b: pref.dpo(PI_C, PI_R, a, b)[0] + pref.ipo(PI_C, PI_R, a, b)[0],
                 argnums=(0, 1))(jnp.asarray(REF_C), jnp.asarray(REF_R))
    assert not np.any(np.asarray(g[0])) and not np.any(np.asarray(g[1]))


def test_ipo_gradient_by_hand():
    beta = 0.25
    g_c, g_r = jax.grad(lambda c, r: pref.ipo(c, r, REF_C, REF_R, beta=beta)[0],
                        argnums=(0, 1))(jnp.asarray(PI_C), jnp.asarray(PI_R))
    for i in range(N):
        d = 2 * (_h(i) - 1 / (2 * beta)) / N
        assert float(g_c[i]) == pytest.approx(d, rel=1e-5)
        assert float(g_r[i]) == pytest.approx(-d, rel=1e-5)


def test_simpo_gradient_by_hand():
    beta, gamma = 2.0, 0.5
    g_c, g_r = jax.grad(lambda c, r: pref.simpo(c, r, LEN_C, LEN_R, beta, gamma)[0],
                        argnums=(0, 1))(jnp.asarray(PI_C), jnp.asarray(PI_R))
    for i in range(N):
        z = beta * float(PI_C[i] / LEN_C[i]) - beta * float(PI_R[i] / LEN_R[i]) - gamma
        w = sig(-z) / N
        assert float(g_c[i]) == pytest.approx(-w * beta / float(LEN_C[i]), rel=1e-5)
        assert float(g_r[i]) == pytest.approx(w * beta / float(LEN_R[i]), rel=1e-5)


def test_orpo_gradient_matches_finite_differences():
    g_c, g_r = jax.grad(lambda c, r: pref.orpo(c, r, LEN_C, LEN_R, lam=0.3)[0],
                        argnums=(0, 1))(jnp.asarray(PI_C), jnp.asarray(PI_R))
    for i in range(N):
        fd_c = _fd(lambda x: hand_orpo(x, PI_R, 0.3)[0], PI_C, i)
        fd_r = _fd(lambda x: hand_orpo(PI_C, x, 0.3)[0], PI_R, i)
        assert float(g_c[i]) == pytest.approx(fd_c, rel=1e-4, abs=1e-7)
        assert float(g_r[i]) == pytest.approx(fd_r, rel=1e-4, abs=1e-7)


def test_kto_gradient_matches_finite_differences_and_kl_gets_none():
    beta, kl = 0.5, 0.3
    g_lp, g_kl = jax.grad(lambda lp, k: pref.kto(lp, REF_LOGPS, DESIRABLE, k, beta, 1.0, 1.5)[0],
                          argnums=(0, 1))(jnp.asarray(LOGPS), jnp.asarray(kl, jnp.float32))
    assert float(g_kl) == 0.0
    for i in range(len(LOGPS)):
        fd = _fd(lambda x: hand_kto(x, kl, beta, 1.0, 1.5), LOGPS, i)
        assert float(g_lp[i]) == pytest.approx(fd, rel=1e-4, abs=1e-7)


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("call,name", [
    (lambda: pref.dpo(PI_C, PI_R, REF_C, REF_R, beta=0.0), "beta"),
    (lambda: pref.dpo(PI_C, PI_R, REF_C, REF_R, label_smoothing=0.5), "label_smoothing"),
    (lambda: pref.dpo(PI_C, PI_R, REF_C, REF_R, label_smoothing=-0.1), "label_smoothing"),
    (lambda: pref.dpo(PI_C, PI_R, REF_C, REF_R, nll_weight=-0.1), "nll_weight"),
    (lambda: pref.dpo(PI_C, PI_R, REF_C, REF_R, nll_weight=1.0), "chosen_lengths"),
    (lambda: pref.dpo(PI_C, PI_R, REF_C, REF_R, nll_weight=1.0,
                      chosen_lengths=np.array([1.0, 0.0, 2.0])), "chosen_lengths"),
    (lambda: pref.ipo(PI_C, PI_R, REF_C, REF_R, beta=-1.0), "beta"),
    (lambda: pref.simpo(PI_C, PI_R, LEN_C, LEN_R, beta=0.0), "beta"),
    (lambda: pref.simpo(PI_C, PI_R, LEN_C, LEN_R, gamma=-0.1), "gamma"),
    (lambda: pref.simpo(PI_C, PI_R, np.array([1.0, 0.0, 2.0]), LEN_R), "chosen_lengths"),
    (lambda: pref.orpo(PI_C, PI_R, LEN_C, np.array([1.0, 2.0, -1.0])), "rejected_lengths"),
    (lambda: pref.orpo(PI_C, PI_R, LEN_C, LEN_R, lam=-1.0), "lam"),
    (lambda: pref.kto(LOGPS, REF_LOGPS, DESIRABLE, 0.0, beta=0.0), "beta"),
    (lambda: pref.kto(LOGPS, REF_LOGPS, DESIRABLE, 0.0, lambda_u=-1.0), "lambda_u"),
    (lambda: pref.get("nope"), "nope"),
])
def test_argument_validation(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# ------------------------------------------------------------------- the step, tiny model
CFG = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=24)
PAIRS, SEQ = 4, 8


def _batch(prefixes=("chosen_", "rejected_"), rows=PAIRS, seed=0):
    """Random token rows; the completion (mask 1) is the last 3 to 6 positions."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in prefixes:
        toks = rng.integers(0, CFG.vocab_size, (rows, SEQ + 1)).astype(np.int32)
        start = SEQ - rng.integers(3, 7, rows)
        out[p + "inputs"] = jnp.asarray(toks[:, :-1])
        out[p + "targets"] = jnp.asarray(toks[:, 1:])
        out[p + "mask"] = jnp.asarray((np.arange(SEQ)[None] >= start[:, None]).astype(np.int32))
        out[p + "positions"] = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (rows, SEQ))
    return out


def _state(variables, tx):
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      router_bias=variables.get("router_bias", {}), rng=jax.random.PRNGKey(0),
                      bad_steps=jnp.zeros((), jnp.int32))


def _setup(tiny):
    model, variables = tiny(CFG, seed=3, gain=1.0)
    tx = optax.adam(1e-2)
    ref = jax.tree.map(jnp.copy, {"params": variables["params"],
                                  "router_bias": variables.get("router_bias", {})})
    return model, tx, _state(variables, tx), ref


def _moved(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_dpo_step_starts_at_log2_and_moves_the_policy(jit, tiny):
    model, tx, state, ref = _setup(tiny)
    batch = _batch()
    new = {}
    for chunk in (0, 24):  # 24: chunks of 3 positions, the last one padded
        step = jit(pref.make_preference_step(model, tx, "dpo", {"beta": 0.1},
                                             chunk_tokens=chunk))
        new[chunk], m = step(state, batch, ref)
        assert float(m["loss"]) == pytest.approx(math.log(2.0), abs=1e-6)
        assert float(m["reward_margin"]) == pytest.approx(0.0, abs=1e-6)
        assert int(m["skipped"]) == 0 and np.isfinite(float(m["grad_norm"]))
        assert int(new[chunk].step) == 1
        assert _moved(new[chunk].params, state.params) > 1e-4
    # Chunked log-probs (LM head inside a rematerialized scan) == whole logits.
    assert _moved(new[0].params, new[24].params) < 1e-5
    # The reference is not trained.
    assert _moved(ref["params"], state.params) == 0.0


def test_reference_from_batch_equals_reference_params(jit, tiny):
    """Precomputed reference log-probs (`sequence_logps` of a plain forward) give the same
    step as the frozen reference params; a second step has a non-trivial DPO loss."""
    model, tx, state, ref = _setup(tiny)
    batch = _batch(seed=1)
    step = jit(pref.make_preference_step(model, tx, "dpo", {"beta": 0.5}, chunk_tokens=0))
    s1, m1 = step(state, batch, ref)

    @jit
    def ref_logps(params, b):
        out = {}
        for p in ("chosen_", "rejected_"):
            logits, _ = model.apply({"params": params}, b[p + "inputs"], b[p + "positions"])
            out["ref_" + p + "logps"] = pref.sequence_logps(logits, b[p + "targets"],
                                                            b[p + "mask"])[0]
        return out

    batch2 = {**batch, **ref_logps(ref["params"], batch)}
    s2, m2 = step(state, batch2)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), abs=1e-6)
    assert _moved(s1.params, s2.params) < 1e-5
    _, m3 = step(s1, batch2)
    assert float(m3["loss"]) < math.log(2.0)  # the step went down the DPO loss
    assert float(m3["reward_accuracy"]) > 0.0


def test_dpo_step_with_nll_passes_the_chosen_lengths(jit, tiny):
    """With nll_weight the step adds alpha x the chosen rows' token-mean NLL (their own
    mask counts): at policy == reference the loss is log 2 + alpha * nll_loss."""
    model, tx, state, ref = _setup(tiny)
    batch = _batch(seed=5)
    step = jit(pref.make_preference_step(model, tx, "dpo", {"beta": 0.1, "nll_weight": 0.5},
                                         chunk_tokens=0))
    new, m = step(state, batch, ref)
    logits, _ = model.apply({"params": state.params}, batch["chosen_inputs"],
                            batch["chosen_positions"])
    lp, n = pref.sequence_logps(logits, batch["chosen_targets"], batch["chosen_mask"])
    nll = float(jnp.mean(-lp / n))
    assert float(m["nll_loss"]) == pytest.approx(nll, rel=1e-5)
    assert float(m["loss"]) == pytest.approx(math.log(2.0) + 0.5 * nll, rel=1e-5)
    assert int(m["skipped"]) == 0 and _moved(new.params, state.params) > 1e-4


@pytest.mark.parametrize("loss,kw", [("simpo", {}), ("orpo", {"lam": 0.2}),
                                     ("kto", {"beta": 0.1})])
def test_other_losses_take_a_finite_step(jit, tiny, loss, kw):
    model, tx, state, ref = _setup(tiny)
    if loss == "kto":
        batch = {**_batch(("",), rows=6, seed=2), **_batch(("kl_",), rows=6, seed=3),
                 "desirable": jnp.asarray([True, False, True, True, False, False])}
    else:
        batch = _batch(seed=4)
    step = jit(pref.make_preference_step(model, tx, loss, kw, chunk_tokens=16))
    new, m = step(state, batch, ref)
    assert np.isfinite(float(m["loss"])) and int(m["skipped"]) == 0
    assert _moved(new.params, state.params) > 1e-4
    if loss == "kto":  # ref == policy: every reward and the KL estimate are 0
        assert float(m["kl"]) == pytest.approx(0.0, abs=1e-6)
        assert float(m["loss"]) == pytest.approx(0.5, abs=1e-6)


def test_step_without_a_reference_is_an_error(tiny):
    model, tx, state, _ = _setup(tiny)
    step = pref.make_preference_step(model, tx, "dpo")
    with pytest.raises(ValueError, match="reference"):
        jax.eval_shape(step, state, _batch())
    with pytest.raises(ValueError, match="beta"):
        pref.make_preference_step(model, tx, "ipo", {"beta": 0.0})

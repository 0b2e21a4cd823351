"""Gradient noise scale (McCandlish et al. 2018, App. A.1): the small/big-batch estimator
recovers tr(Sigma)/|G|^2 of a least-squares problem whose per-example gradient covariance
is known in closed form, and the train step's `noise/*` metrics equal squared norms
computed by hand from per-microbatch `jax.grad`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from model import ModelConfig, Transformer
from train import noise_scale
from train.errors import UserError
from train.loop import step_options
from train.step import StepOptions, TrainState, make_train_step


def test_estimator_recovers_the_noise_scale_of_least_squares():
    """Per-example loss (x.w - y)^2 / 2 with x ~ N(0, I_d), y = x.w* + s z: the gradient
    (x.d - s z) x (d = w - w*) has mean G = d and covariance Sigma = (|d|^2 + s^2) I + d d^T
    (Isserlis), so B_simple = (d (|d|^2 + s^2) + |d|^2) / |d|^2 exactly."""
    dim, s, k, b_small, steps = 6, 0.5, 4, 8, 4000
    rng = np.random.default_rng(0)
    w_star = rng.standard_normal(dim)
    w = w_star + 0.3 * rng.standard_normal(dim)
    d = w - w_star
    want = (dim * (d @ d + s * s) + d @ d) / (d @ d)

    x = rng.standard_normal((steps, k, b_small, dim)).astype(np.float32)
    y = (x @ w_star + s * rng.standard_normal((steps, k, b_small))).astype(np.float32)

    def grad(xb, yb):  # the gradient of a batch's mean loss, as training computes it
        return jax.grad(lambda w: 0.5 * jnp.mean((xb @ w - yb) ** 2))(jnp.asarray(w))

    g_micro = np.asarray(jax.vmap(jax.vmap(grad))(x, y), np.float64)  # [steps, k, dim]
    g_big = np.asarray(jax.vmap(grad)(x.reshape(steps, k * b_small, dim),
                                      y.reshape(steps, k * b_small)), np.float64)
    small_sq = np.mean(np.sum(g_micro**2, -1), -1)  # mean over microbatches, as logged
    big_sq = np.sum(g_big**2, -1)

    _, g_sq, trace = noise_scale.simple_noise_scale(small_sq, big_sq, b_small, k * b_small)
    avg = noise_scale.NoiseScaleAverage()
    for a, b in zip(small_sq, big_sq, strict=True):
        avg.update(a, b, b_small, k * b_small)
    b_simple, g_mean, t_mean = avg.value()
    np.testing.assert_allclose([g_mean, t_mean], [g_sq.mean(), trace.mean()], rtol=1e-10)
    # Each estimate is unbiased: within 3 standard errors of the truth.
    tr_sigma = dim * (d @ d + s * s) + d @ d
    for est, truth in ((g_sq, d @ d), (trace, tr_sigma)):
        se = est.std(ddof=1) / np.sqrt(steps)
        assert abs(est.mean() - truth) < 3 * se, (est.mean(), truth, se)
    # The ratio of the means: its standard error by the delta method.
    cov = np.cov(trace, g_sq) / steps
    se = b_simple * np.sqrt(cov[0, 0] / t_mean**2 + cov[1, 1] / g_mean**2
                            - 2 * cov[0, 1] / (t_mean * g_mean))
    assert abs(b_simple - want) < 3 * se, (b_simple, want, se)
    assert se < 0.1 * want  # the test has power: 3 SE is a tight band
    # One step's ratio is a noisy, biased estimate; the averaged one is what is reported.
    assert noise_scale.from_metrics(
        [{"noise/g_small_sq": a, "noise/g_big_sq": b, "noise/b_small": b_small,
          "noise/b_big": k * b_small} for a, b in zip(small_sq, big_sq, strict=True)]
        + [{"loss": 1.0}])[0] == pytest.approx(b_simple, rel=1e-12)


def test_estimator_formulas_and_arguments():
    # |G_B|^2 = |G|^2 + tr/B exactly: |G|^2 = 2, tr = 8, B = 2 and 8.
    b, g, t = noise_scale.simple_noise_scale(2 + 8 / 2, 2 + 8 / 8, 2, 8)
    np.testing.assert_allclose([b, g, t], [4.0, 2.0, 8.0])
    with pytest.raises(ValueError, match="b_small < b_big"):
        noise_scale.simple_noise_scale(1.0, 1.0, 4, 4)
    ema = noise_scale.NoiseScaleAverage(decay=0.9).update(6.0, 3.0, 2, 8)
    np.testing.assert_allclose(ema.value(), [4.0, 2.0, 8.0])  # bias-corrected after 1 step


def _masked_mean_ce(model, params, b):
    logits, _ = model.apply({"params": params}, b["inputs"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), b["targets"])
    return jnp.sum(ce * b["mask"]) / jnp.sum(b["mask"])


def test_train_step_logs_the_squared_norms_of_the_microbatch_gradients():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=32)
    model = Transformer(cfg)
    tx = optax.sgd(0.1)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32)))["params"]
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       router_bias={}, rng=jax.random.PRNGKey(0),
                       bad_steps=jnp.zeros((), jnp.int32))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 64, size=(8, 17)).astype(np.int32)
    mask = (rng.random((8, 16)) < 0.7).astype(np.float32)  # uneven counts per microbatch
    batch = {"inputs": jnp.asarray(x[:, :-1]), "targets": jnp.asarray(x[:, 1:]),
             "mask": jnp.asarray(mask)}
    step = jax.jit(make_train_step(model, tx, options=StepOptions(grad_accum=4,
                                                                  noise_scale=True)))
    _, m = step(state, batch)

    sq = lambda t: sum(float(jnp.sum(jnp.square(v))) for v in jax.tree.leaves(t))  # noqa: E731
    grad = jax.grad(lambda p, b: _masked_mean_ce(model, p, b))
    micro = [jax.tree.map(lambda v, i=i: v[2 * i:2 * i + 2], batch) for i in range(4)]
    small = np.mean([sq(grad(params, mb)) for mb in micro])
    big = sq(grad(params, batch))
    np.testing.assert_allclose(float(m["noise/g_small_sq"]), small, rtol=1e-4)
    np.testing.assert_allclose(float(m["noise/g_big_sq"]), big, rtol=1e-4)
    np.testing.assert_allclose(float(m["noise/b_big"]), mask.sum())
    np.testing.assert_allclose(float(m["noise/b_small"]), mask.sum() / 4)
    np.testing.assert_allclose(float(m["grad_norm"]) ** 2, big, rtol=1e-4)
    assert small > big  # small batches are noisier (the test can fail)

    off = jax.jit(make_train_step(model, tx, options=StepOptions(grad_accum=4)))(state, batch)[1]
    assert not any(k.startswith("noise/") for k in off)


def test_noise_scale_needs_gradient_accumulation():
    with pytest.raises(ValueError, match="grad_accum >= 2"):
        StepOptions(noise_scale=True)
    c = base.get_config()
    c.train.noise_scale_every = 10
    with pytest.raises(UserError, match="noise_scale_every=10.*grad_accum >= 2"):
        step_options(c)
    c.train.grad_accum = 2
    assert step_options(c).noise_scale
    c.train.noise_scale_every = 0
    assert not step_options(c).noise_scale

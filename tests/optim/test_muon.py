"""Muon: optax.contrib reference, hand-computed momentum, stacked matrices, matrix_axes,
error paths, and sharded == unsharded on the 8-device CPU mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optim
from optim.muon import update_scale_factor

COEFFS = (3.4445, -4.7750, 2.0315)


def _ns64(x: np.ndarray, steps: int = 5, eps: float = 1e-7) -> np.ndarray:
    """Independent float64 Newton-Schulz from the formula (no transposition trick)."""
    x = x.astype(np.float64)
    x = x / (np.linalg.norm(x) + eps)
    a, b, c = COEFFS
    for _ in range(steps):
        x = a * x + b * (x @ x.T @ x) + c * (x @ x.T @ x @ x.T @ x)
    return x


def _params(key=0):
    k = jax.random.split(jax.random.key(key), 3)
    return {
        "wide": jax.random.normal(k[0], (16, 40)),
        "tall": jax.random.normal(k[1], (40, 16)),
        "square": jax.random.normal(k[2], (24, 24)),
    }


def _grads(step: int):
    return jax.tree.map(lambda p: p * 0.0 + 1.0, _params()) if step < 0 else _params(100 + step)


@pytest.mark.parametrize("scale,consistent_rms", [("original", None), ("moonlight", 0.2)])
def test_first_step_matches_optax_contrib(scale, consistent_rms):
    params, grads, lr = _params(), _grads(0), 0.05
    ours = optim.muon(lr, beta=0.95, nesterov=True, eps=1e-7, update_scale=scale)
    ref = optax.contrib.muon(
        lr, ns_coeffs=COEFFS, ns_steps=5, beta=0.95, eps=1e-7, weight_decay=0.0,
        nesterov=True, adaptive=False, preconditioning="frobenius",
        consistent_rms=consistent_rms,
    )
    u_ours, _ = ours.update(grads, ours.init(params), params)
    u_ref, _ = ref.update(grads, ref.init(params), params)
    for name in params:
        np.testing.assert_allclose(u_ours[name], u_ref[name], atol=2e-6, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("scale", ["original", "moonlight", "spectral"])
def test_three_steps_match_hand_computed_momentum(nesterov, scale):
    params, lr, wd, beta = _params(), 0.02, 0.1, 0.9
    opt = optim.muon(lr, beta=beta, nesterov=nesterov, weight_decay=wd, update_scale=scale)
    state = opt.init(params)
    mom = {k: np.zeros(v.shape) for k, v in params.items()}
    p_np = {k: np.asarray(v, np.float64) for k, v in params.items()}
    for step in range(3):
        grads = _grads(step)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for k, g in grads.items():
            g = np.asarray(g, np.float64)
            mom[k] = beta * mom[k] + g
            u = g + beta * mom[k] if nesterov else mom[k]
            fan_in, fan_out = g.shape
            s = {
                "original": np.sqrt(max(1.0, fan_out / fan_in)),
                "moonlight": 0.2 * np.sqrt(max(fan_in, fan_out)),
                "spectral": np.sqrt(fan_out / fan_in),
            }[scale]
            p_np[k] = p_np[k] - lr * (s * _ns64(u) + wd * p_np[k])
            np.testing.assert_allclose(params[k], p_np[k], atol=2e-5, err_msg=f"{k} step {step}")
    assert int(state[0].count) == 3


def test_update_scale_factors_by_hand():
    assert update_scale_factor("original", 16, 64) == pytest.approx(2.0)
    assert update_scale_factor("original", 64, 16) == pytest.approx(1.0)
    assert update_scale_factor("moonlight", 16, 64) == pytest.approx(1.6)
    assert update_scale_factor("spectral", 64, 16) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="update_scale"):
        optim.scale_by_muon(update_scale="bogus")


def _run(tx, params, grads_seq):
    state = tx.init(params)
    outs = []
    for g in grads_seq:
        u, state = tx.update(g, state, params)
        outs.append(u)
    return outs


def test_expert_stack_equals_each_expert_alone():
    key = jax.random.key(5)
    w = jax.random.normal(key, (4, 12, 20))  # [E, in, out]
    grads = [jax.random.normal(jax.random.fold_in(key, s), w.shape) for s in range(2)]
    tx = optim.muon(0.1, update_scale="moonlight")
    stacked = _run(tx, {"w": w}, [{"w": g} for g in grads])
    for e in range(4):
        alone = _run(tx, {"w": w[e]}, [{"w": g[e]} for g in grads])
        for s in range(2):
            np.testing.assert_allclose(stacked[s]["w"][e], alone[s]["w"], atol=1e-6)


def test_layer_expert_stack_equals_each_matrix_alone():
    key = jax.random.key(6)
    w = jax.random.normal(key, (2, 3, 10, 6))  # [L, E, in, out]
    g = jax.random.normal(jax.random.fold_in(key, 1), w.shape)
    tx = optim.muon(0.1)
    (stacked,) = _run(tx, {"w": w}, [{"w": g}])
    for layer in range(2):
        for e in range(3):
            (alone,) = _run(tx, {"w": w[layer, e]}, [{"w": g[layer, e]}])
            np.testing.assert_allclose(stacked["w"][layer, e], alone["w"], atol=1e-6)


def test_matrix_axes_flattened_head_kernel():
    key = jax.random.key(7)
    w = jax.random.normal(key, (16, 4, 8))  # [D, H, Dh] seen as [D, H*Dh]
    g = jax.random.normal(jax.random.fold_in(key, 1), w.shape)
    spec = ((0,), (1, 2))
    (ours,) = _run(optim.muon(0.1, matrix_axes=spec), {"w": w}, [{"w": g}])
    (flat,) = _run(optim.muon(0.1), {"w": w.reshape(16, 32)}, [{"w": g.reshape(16, 32)}])
    np.testing.assert_allclose(ours["w"], flat["w"].reshape(16, 4, 8), atol=1e-6)
    # The same result from optax.contrib (first step), with its dimension numbers.
    ref = optax.contrib.muon(
        0.1, ns_coeffs=COEFFS, eps=1e-7,
        muon_weight_dimension_numbers={"w": optax.contrib.MuonDimensionNumbers(0, (1, 2))},
    )
    (ref_u,) = _run(ref, {"w": w}, [{"w": g}])
    np.testing.assert_allclose(ours["w"], ref_u["w"], atol=2e-6, rtol=1e-5)


def test_matrix_axes_per_leaf_tree_and_callable():
    key = jax.random.key(8)
    params = {"torch": jax.random.normal(key, (20, 12)), "plain": jax.random.normal(key, (12, 20))}
    grads = {"torch": params["plain"].T, "plain": params["plain"]}
    # `torch` is an [out, in] weight: rows (fan-in) are axis 1.
    by_tree = _run(optim.muon(0.1, matrix_axes={"torch": (1, 0), "plain": None}), params, [grads])
    by_fn = _run(
        optim.muon(0.1, matrix_axes=lambda path, x: (1, 0) if path == ("torch",) else None),
        params,
        [grads],
    )
    for out in (by_tree[0], by_fn[0]):
        np.testing.assert_allclose(out["torch"], out["plain"].T, atol=1e-6)
    # original scale depends on orientation: fan_out/fan_in = 20/12 for both here.
    assert np.linalg.norm(by_tree[0]["torch"]) > np.linalg.norm(
        _run(optim.muon(0.1), params, [grads])[0]["torch"]
    )


def test_vector_leaf_error_names_path():
    params = {"layers_0": {"attn_norm": {"scale": jnp.ones(8)}}}
    with pytest.raises(ValueError, match="layers_0/attn_norm/scale"):
        optim.muon(0.1).init(params)
    with pytest.raises(ValueError, match="distinct"):
        optim.muon(0.1, matrix_axes=(0, 0)).init({"w": jnp.ones((3, 3))})


def test_momentum_dtype_and_bf16_updates():
    params = {"w": jnp.ones((8, 4), jnp.bfloat16)}
    tx = optim.scale_by_muon(mu_dtype=jnp.float32)
    state = tx.init(params)
    assert state.mu["w"].dtype == jnp.float32
    u, state = tx.update({"w": jnp.ones((8, 4), jnp.bfloat16)}, state)
    assert u["w"].dtype == jnp.bfloat16 and state.mu["w"].dtype == jnp.float32


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_equals_unsharded(axis_type):
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3)
    key = jax.random.key(9)
    ks = jax.random.split(key, 4)
    params = {
        "kernel": jax.random.normal(ks[0], (64, 32)),
        "experts": jax.random.normal(ks[1], (8, 16, 24)),
    }
    grads = {
        "kernel": jax.random.normal(ks[2], (64, 32)),
        "experts": jax.random.normal(ks[3], (8, 16, 24)),
    }
    shardings = {
        "kernel": NamedSharding(mesh, P("fsdp", "tensor")),
        "experts": NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")),
    }
    tx = optim.muon(0.1, weight_decay=0.1, update_scale="moonlight")

    def step(p, g):
        u, s = tx.update(g, tx.init(p), p)
        u2, _ = tx.update(g, s, p)
        return u2

    expected = jax.jit(step)(params, grads)
    p_sh = jax.device_put(params, shardings)
    g_sh = jax.device_put(grads, shardings)
    got = jax.jit(step, out_shardings=shardings)(p_sh, g_sh)
    assert got["experts"].sharding.spec == shardings["experts"].spec
    # newton_schulz on its own, under jit, with the sharded input.
    ns = jax.jit(optim.newton_schulz)(g_sh["kernel"])
    np.testing.assert_allclose(ns, optim.newton_schulz(grads["kernel"]), atol=1e-5)
    for k in params:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(expected[k]), atol=1e-5)

"""build(config.optim, params): AdamW and Muon+AdamW on a fake tree with the model's names."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from optim._tree import join, path_names


def _config(**kw):
    cfg = optim.default_config()
    cfg.total_steps = 100
    cfg.update(kw)
    return cfg


def _random_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), tree)


def _flat(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {join(path_names(kp)): v for kp, v in flat}


def _decayed(path):
    last = path.rsplit("/", 1)[-1]
    return last in ("kernel", "w_gate", "w_up", "w_down")


def test_default_config_keys():
    cfg = optim.default_config()
    assert cfg.name == "adamw" and cfg.total_steps is None
    assert cfg.muon.lr is None and cfg.muon.weight_decay is None
    assert '"total_steps": null' in cfg.to_json()
    # None defaults are typed placeholders: an override gets (and is checked against) the type.
    cfg.total_steps, cfg.muon.lr = 100, 1
    assert (cfg.total_steps, cfg.muon.lr) == (100, 1.0) and isinstance(cfg.muon.lr, float)
    with pytest.raises(TypeError, match="total_steps"):
        cfg.total_steps = "100"
    assert set(cfg.mup) == {"enabled", "width_multiplier"}
    assert set(cfg.qk_clip) == {"enabled", "tau"}
    with pytest.raises(AttributeError):
        cfg.not_a_key  # noqa: B018


@pytest.mark.parametrize("which", ["plain", "scanned"])
def test_adamw_matches_optax_adamw(which, request):
    params = _random_like(request.getfixturevalue(which), 0)
    grads = _random_like(params, 1)
    cfg = _config(schedule="constant", warmup_steps=0, clip_norm=0.0, lr=1e-2)
    tx = optim.build(cfg, params)
    mask = jax.tree_util.tree_map_with_path(lambda kp, x: _decayed(join(path_names(kp))), params)
    ref = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, mask=mask)
    s, rs = tx.init(params), ref.init(params)
    for _ in range(2):
        u, s = jax.jit(tx.update)(grads, s, params)
        ru, rs = jax.jit(ref.update)(grads, rs, params)
    got, want = _flat(u), _flat(ru)
    for path in got:
        if "router_bias" in path:
            np.testing.assert_array_equal(got[path], 0.0)
        else:
            np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-7, err_msg=path)


@pytest.mark.parametrize("which", ["plain", "scanned"])
def test_muon_partition(which, request):
    params = _random_like(request.getfixturevalue(which), 2)
    grads = _random_like(params, 3)
    cfg = _config(name="muon", schedule="constant", warmup_steps=0, clip_norm=0.0, lr=1e-2)
    cfg.muon.lr = 2e-2
    tx = optim.build(cfg, params)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    labels = _flat(optim.label_params(params))
    muon_ref = optim.muon(2e-2, weight_decay=0.1, update_scale="moonlight")
    adam_ref = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    got, g, p = _flat(u), _flat(grads), _flat(params)
    for path, lab in labels.items():
        if lab == "none":
            np.testing.assert_array_equal(got[path], 0.0)
            continue
        ref = muon_ref if lab == "muon" else adam_ref
        leaf = {"x": p[path]}
        want, _ = ref.update({"x": g[path]}, ref.init(leaf), leaf)
        if lab == "adam" and not _decayed(path):
            want, _ = optax.adam(1e-2, b1=0.9, b2=0.95, eps=1e-8).update(
                {"x": g[path]}, optax.adam(1e-2).init(leaf), leaf)
        np.testing.assert_allclose(got[path], want["x"], rtol=1e-5, atol=1e-7, err_msg=path)
    assert {"muon", "adam", "none"} == set(labels.values())


def test_muon_lr_and_weight_decay_default_to_adamw_values(plain):
    params = _random_like(plain, 11)
    grads = _random_like(params, 12)
    leaf = "layers_0/mlp/up_proj/kernel"
    assert _flat(optim.label_params(params))[leaf] == "muon"
    cfg = _config(name="muon", schedule="constant", warmup_steps=0, clip_norm=0.0, lr=1e-2,
                  weight_decay=0.3)
    for lr, wd, want_lr, want_wd in ((None, None, 1e-2, 0.3), (2e-2, 0.0, 2e-2, 0.0)):
        cfg.muon.lr, cfg.muon.weight_decay = lr, wd
        tx = optim.build(cfg, params)
        got = _flat(tx.update(grads, tx.init(params), params)[0])[leaf]
        ref = optim.muon(want_lr, weight_decay=want_wd, update_scale="moonlight")
        x = {"x": _flat(params)[leaf]}
        want, _ = ref.update({"x": _flat(grads)[leaf]}, ref.init(x), x)
        np.testing.assert_allclose(got, want["x"], rtol=1e-5, atol=1e-7)
    for key in ("lr", "weight_decay"):
        bad = _config(name="muon")
        bad.muon[key] = -1.0
        with pytest.raises(ValueError, match=f"optim.muon.{key}=-1.0"):
            optim.build(bad, plain)


@pytest.mark.parametrize("name", ["wsd", "warmup_stable_decay"])
def test_wsd_schedule_by_name_and_alias(name):
    cfg = _config(schedule=name, warmup_steps=10, total_steps=100, lr=2.0, min_lr_frac=0.0)
    cfg.wsd.update(dict(decay_frac=0.2, decay="linear"))
    sched = optim.build_schedule(cfg)
    # warmup 0..10, stable at 2.0 until 80, linear decay to 0 at 100.
    got = [float(sched(t)) for t in (0, 5, 10, 79, 80, 90, 100)]
    np.testing.assert_allclose(got, [0.0, 1.0, 2.0, 2.0, 2.0, 1.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="'wsd'"):
        optim.build_schedule(_config(schedule="stable_decay"))


def test_global_norm_clipping_comes_first(plain):
    params = _random_like(plain, 4)
    grads = _random_like(params, 5)
    norm = float(optax.tree.norm(grads))
    cfg = _config(schedule="constant", warmup_steps=0, clip_norm=0.5)
    clipped = jax.tree.map(lambda x: x * 0.5 / norm, grads)
    tx = optim.build(cfg, params)
    tx_noclip = optim.build(_config(schedule="constant", warmup_steps=0, clip_norm=0.0), params)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    want, _ = jax.jit(tx_noclip.update)(clipped, tx_noclip.init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u, want)


def test_schedule_and_label_overrides(plain):
    params = _random_like(plain, 6)
    cfg = _config(schedule="warmup_cosine", warmup_steps=10, total_steps=110, lr=1.0)
    assert float(optim.build_schedule(cfg)(60)) == pytest.approx(0.55)
    cfg.labels = ((r"^lm_head/", "none"),)
    tx = optim.build(cfg, params)
    u, _ = jax.jit(tx.update)(params, tx.init(params), params)
    np.testing.assert_array_equal(u["lm_head"]["kernel"], 0.0)
    assert float(jnp.abs(u["embed"]["embedding"]).sum()) == 0.0  # warmup step 0: lr = 0


def test_mup_scales_hidden_adam_updates(plain):
    params = _random_like(plain, 7)
    grads = _random_like(params, 8)
    base = _config(schedule="constant", warmup_steps=0, clip_norm=0.0)
    scaled = _config(schedule="constant", warmup_steps=0, clip_norm=0.0)
    scaled.mup.enabled, scaled.mup.width_multiplier = True, 4.0
    u0, _ = optim.build(base, params).update(grads, optim.build(base, params).init(params), params)
    tx = optim.build(scaled, params)
    u1, _ = tx.update(grads, tx.init(params), params)
    mult = optim.mup_lr_multipliers(params, 4.0)
    jax.tree.map(lambda a, b, c: np.testing.assert_allclose(b, a * c, rtol=1e-6), u0, u1, mult)


def test_errors_name_the_key(plain):
    with pytest.raises(ValueError, match="optim.name='sgd'"):
        optim.build(_config(name="sgd"), plain)
    with pytest.raises(ValueError, match="optim.total_steps"):
        optim.build(optim.default_config(), plain)
    with pytest.raises(ValueError, match="optim.schedule"):
        optim.build(_config(schedule="step"), plain)
    bad = _config(name="muon")
    bad.muon.update_scale = "rms"
    with pytest.raises(ValueError, match="optim.muon.update_scale"):
        optim.build(bad, plain)
    mup_moon = _config(name="muon")
    mup_moon.mup.enabled = True
    with pytest.raises(ValueError, match="spectral"):
        optim.build(mup_moon, plain)


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
def test_sharded_step_equals_unsharded(scanned, axis_type):
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    params = _random_like(scanned, 9)
    grads = _random_like(params, 10)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), (getattr(AxisType, axis_type),) * 3)

    def spec(kp, x):
        path = join(path_names(kp))
        if "/experts/" in path:  # [L, E, in, out]: experts over fsdp, columns over tensor
            return NamedSharding(mesh, P(None, "fsdp", None, "tensor"))
        if x.ndim >= 2 and x.shape[-1] % 2 == 0:
            return NamedSharding(mesh, P(*([None] * (x.ndim - 2)), "fsdp", "tensor"))
        return NamedSharding(mesh, P())

    shardings = jax.tree_util.tree_map_with_path(spec, params)
    tx = optim.build(_config(name="muon", schedule="constant", warmup_steps=0), params)

    def step(p, g):
        return tx.update(g, tx.init(p), p)[0]

    want = jax.jit(step)(params, grads)
    got = jax.jit(step, out_shardings=shardings)(
        jax.device_put(params, shardings), jax.device_put(grads, shardings)
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), got, want)

"""muP multipliers: Adam LR / m for hidden (and router readout) matrices, 1 elsewhere."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optim
from optim._tree import join, path_names

M = 4.0


def _flat(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {join(path_names(kp)): v for kp, v in flat}


@pytest.mark.parametrize("which", ["plain", "scanned"])
def test_lr_multipliers_by_name(which, request):
    params = request.getfixturevalue(which)
    mult = _flat(optim.mup_lr_multipliers(params, M))
    for path, c in mult.items():
        hidden = path.endswith("/kernel") and not path.startswith("lm_head")
        hidden = hidden or "/experts/" in path
        assert c == pytest.approx(1 / M if hidden else 1.0), path
    # The router kernel counts as hidden above: a width -> n_experts readout, LR / m.
    assert any(p.endswith("router/kernel") and c == 1 / M for p, c in mult.items())
    assert mult["embed/embedding"] == 1.0 and mult["lm_head/kernel"] == 1.0


def test_init_std():
    assert optim.mup_init_std(0.02, 4.0, "hidden") == pytest.approx(0.01)
    assert optim.mup_init_std(0.02, 4.0, "readout") == pytest.approx(0.005)
    for kind in ("input", "output", "vector"):
        assert optim.mup_init_std(0.02, 4.0, kind) == 0.02
    with pytest.raises(ValueError, match="kind"):
        optim.mup_init_std(0.02, 4.0, "matrix")
    with pytest.raises(ValueError, match="width_multiplier"):
        optim.mup_init_std(0.02, 0.0, "hidden")


def test_scale_by_mup_in_adam_chain_and_partition(plain):
    params = jax.tree.map(lambda x: x + 1.0, plain)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), plain)
    base = optax.adam(1e-2)
    mup = optax.chain(optax.scale_by_adam(), optim.scale_by_mup(M), optax.scale_by_learning_rate(1e-2))
    u_base, _ = base.update(grads, base.init(params), params)
    u_mup, _ = mup.update(grads, mup.init(params), params)
    mult = optim.mup_lr_multipliers(params, M)
    jax.tree.map(lambda a, b, c: np.testing.assert_allclose(b, a * c, rtol=1e-6), u_base, u_mup, mult)
    # Inside optax.partition, leaves of another partition are masked: still keyed by path.
    labels = optim.label_params(params)
    part = optax.partition({"muon": optim.scale_by_mup(M), "adam": optax.identity(),
                            "none": optax.set_to_zero()}, labels)
    u, _ = part.update(grads, part.init(params), params)
    np.testing.assert_allclose(u["layers_0"]["mlp"]["up_proj"]["kernel"], 0.5 / M)
    np.testing.assert_allclose(u["embed"]["embedding"], 0.5)


def test_explicit_kinds_tree_and_callable():
    params = {"a": jnp.ones((3, 3)), "b": jnp.ones((3, 3))}
    kinds = {"a": "hidden", "b": "vector"}
    for spec in (kinds, lambda p: kinds):
        u, _ = optim.scale_by_mup(2.0, spec).update(params, optax.EmptyState())
        np.testing.assert_allclose(u["a"], 0.5)
        np.testing.assert_allclose(u["b"], 1.0)
    with pytest.raises(ValueError, match="'a'"):
        optim.scale_by_mup(2.0, {"a": "wide", "b": "vector"}).update(params, optax.EmptyState())

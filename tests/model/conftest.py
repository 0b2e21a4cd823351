"""Fixtures for tests/model: a model with random parameters, built without compiling the
initializers (compiling `model.init` costs seconds per config on CPU; `eval_shape` gives the
boxed shapes and numpy fills them), and `jit` with XLA's backend optimizations off, which
halves the compile time of these tiny models (the tests compare programs compiled the same
way, and the numerics stay IEEE float32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer


def _fill(abstract, seed: int, gain: float):
    """Random values for an abstract variable tree: norm gains 1 + 0.2 N(0, 1), embeddings
    N(0, 1/d) (so scaled embeddings have unit RMS), router biases 0, other biases
    0.1 N(0, 1), matrices gain * N(0, 1/fan_in) (fan_in = second-to-last axis)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        keys = [getattr(k, "key", None) for k in path]
        names = [k for k in keys if isinstance(k, str)]
        name, shape = names[-1], leaf.shape
        if names[0] == "router_bias":
            x = np.zeros(shape)
        elif name == "scale":
            x = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name == "embedding":
            x = rng.standard_normal(shape) / np.sqrt(shape[-1])
        elif name == "bias":
            x = 0.1 * rng.standard_normal(shape)
        else:
            x = gain * rng.standard_normal(shape) / np.sqrt(shape[-2])
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


@functools.cache
def _setup(cfg: ModelConfig, seed: int = 0, gain: float = 1.5):
    model = Transformer(cfg)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    variables = _fill(abstract, seed, gain)
    fwd = fast_jit(lambda v, t, p=None, s=None: model.apply(v, t, p, s))
    return model, variables, fwd


@pytest.fixture(scope="session")
def make_model():
    """`make_model(cfg, seed=0, gain=1.5) -> (model, variables, jitted forward)`, cached per config.

    The forward is `fwd(variables, tokens, positions=None, segment_ids=None) -> (logits, aux)`.
    """
    return _setup


@pytest.fixture(scope="session")
def jit():
    """`jax.jit` with fast (unoptimized) CPU compilation; same keyword arguments."""
    return fast_jit


@pytest.fixture(scope="session")
def fill():
    """`fill(abstract_variables, seed, gain=1.5)`: random values for a `jax.eval_shape`d
    variable tree (see `_fill`)."""
    return lambda abstract, seed=0, gain=1.5: _fill(abstract, seed, gain)

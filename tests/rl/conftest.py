"""Fixtures for tests/rl: `jit` with XLA's backend optimizations off (compiling, not
running, dominates these tiny programs on CPU; the numerics stay IEEE float32), and tiny
models with random parameters built without compiling the initializers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, Transformer

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def _fill(abstract, seed: int, gain: float):
    """Random values: norm gains 1 + 0.2 N(0, 1), embeddings N(0, 1/d), router biases 0,
    other biases 0.1 N(0, 1), matrices gain * N(0, 1/fan_in)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        names = [k for k in (getattr(p, "key", None) for p in path) if isinstance(k, str)]
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


@functools.cache
def _tiny(cfg: ModelConfig, seed: int = 0, gain: float = 1.5):
    model = Transformer(cfg)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return model, nn.unbox(_fill(abstract, seed, gain))


@pytest.fixture(scope="session")
def jit():
    """`jax.jit` with fast (unoptimized) CPU compilation; same keyword arguments."""
    return fast_jit


@pytest.fixture(scope="session")
def tiny():
    """`tiny(cfg, seed=0, gain=1.5) -> (model, variables)` with random (unboxed) parameters,
    cached per config."""
    return _tiny

"""Fixtures for the optim tests: a small parameter tree with the model's flax names."""

import jax.numpy as jnp
import pytest

V, D, F, E, L, H, DH = 64, 16, 32, 4, 2, 4, 4
QR, KVR, NOPE, ROPE, VD = 8, 8, 4, 2, 4


def _z(*shape):
    return jnp.zeros(shape, jnp.float32)


def attn_mla(lead=()):
    return {
        "q_a_proj": {"kernel": _z(*lead, D, QR)},
        "q_a_norm": {"scale": _z(*lead, QR)},
        "q_b_proj": {"kernel": _z(*lead, QR, H * (NOPE + ROPE))},
        "kv_a_proj": {"kernel": _z(*lead, D, KVR + ROPE)},
        "kv_a_norm": {"scale": _z(*lead, KVR)},
        "kv_b_proj": {"kernel": _z(*lead, KVR, H * (NOPE + VD))},
        "o_proj": {"kernel": _z(*lead, H * VD, D)},
    }


def attn_mha(lead=()):
    return {
        "q_proj": {"kernel": _z(*lead, D, H * DH), "bias": _z(*lead, H * DH)},
        "k_proj": {"kernel": _z(*lead, D, H * DH)},
        "v_proj": {"kernel": _z(*lead, D, H * DH)},
        "o_proj": {"kernel": _z(*lead, H * DH, D)},
        "q_norm": {"scale": _z(*lead, DH)},
    }


def moe(lead=()):
    return {
        "router": {"kernel": _z(*lead, D, E)},
        "router_bias": _z(*lead, E),
        "experts": {
            "w_gate": _z(*lead, E, D, F),
            "w_up": _z(*lead, E, D, F),
            "w_down": _z(*lead, E, F, D),
        },
        "shared": {
            "gate_proj": {"kernel": _z(*lead, D, F)},
            "up_proj": {"kernel": _z(*lead, D, F)},
            "down_proj": {"kernel": _z(*lead, F, D)},
        },
    }


def dense_mlp(lead=()):
    return {
        "gate_proj": {"kernel": _z(*lead, D, F)},
        "up_proj": {"kernel": _z(*lead, D, F)},
        "down_proj": {"kernel": _z(*lead, F, D)},
    }


def block(attn, mlp, lead=()):
    return {
        "attn_norm": {"scale": _z(*lead, D)},
        "attn": attn(lead),
        "mlp_norm": {"scale": _z(*lead, D)},
        "mlp": mlp(lead),
    }


def plain_params():
    """Unscanned: `layers_0` dense MHA, `layers_1` MoE MLA."""
    return {
        "embed": {"embedding": _z(V, D)},
        "layers_0": block(attn_mha, dense_mlp),
        "layers_1": block(attn_mla, moe),
        "final_norm": {"scale": _z(D)},
        "lm_head": {"kernel": _z(D, V)},
    }


def scanned_params():
    """Layer scan: the same names under `dense_stack` / `moe_stack` with a leading [L]."""
    return {
        "embed": {"embedding": _z(V, D)},
        "dense_stack": block(attn_mha, dense_mlp, (L,)),
        "moe_stack": block(attn_mla, moe, (L,)),
        "final_norm": {"scale": _z(D)},
        "lm_head": {"kernel": _z(D, V)},
    }


@pytest.fixture
def plain():
    return plain_params()


@pytest.fixture
def scanned():
    return scanned_params()

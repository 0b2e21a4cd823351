"""muP coordinate check (Tensor Programs V, Fig. 5 / App. D.1): after a few Adam steps at a
fixed LR, the RMS of the last block's hidden states stays flat across widths under muP and
grows with width under standard parametrization."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optim
from model import ModelConfig, Transformer
from model.transformer import Block

WIDTHS = (64, 128, 256, 512)


def hidden_rms_after_training(width: int, mup: bool, steps: int = 5, lr: float = 1e-2) -> float:
    cfg = ModelConfig(
        vocab_size=128, d_model=width, n_layers=2, n_heads=width // 16, ffn_dim=2 * width,
        max_seq_len=32, mup_base_d_model=64 if mup else 0,
        attn_logit_scale="inverse" if mup else "sqrt",
    )
    model = Transformer(cfg)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 128, size=(4, 17)), jnp.int32)
    x, y = toks[:, :-1], toks[:, 1:]
    params = nn.unbox(model.init(jax.random.PRNGKey(0), x))["params"]
    oc = optim.default_config()
    oc.update(dict(lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=0.0))
    oc.mup.enabled = mup
    oc.mup.width_multiplier = cfg.width_multiplier
    tx = optim.build(oc, params)
    state = tx.init(params)

    def loss(p):
        logits, _ = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    for _ in range(steps):
        params, state = step(params, state)
    _, inter = model.apply(
        {"params": params}, x, capture_intermediates=lambda m, _: isinstance(m, Block)
    )
    h = inter["intermediates"]["layers_1"]["__call__"][0][0]
    return float(jnp.sqrt(jnp.mean(h**2)))


def test_coordinate_check_flat_under_mup_grows_under_sp():
    sp = [hidden_rms_after_training(w, mup=False) for w in WIDTHS]
    mup = [hidden_rms_after_training(w, mup=True) for w in WIDTHS]
    # Measured: SP 1.2 -> 6.3 (x5), muP 1.18 -> 1.35 over widths 64..512.
    assert sp[-1] / sp[0] > 3.0, sp
    assert mup[-1] / mup[0] < 1.5, mup
    assert max(mup) / min(mup) < 1.5, mup

"""Wires `optim.qk_clip` to the model's parameter layout (the trainer's post-update hook).

The layout itself (which kernels, which rows of `max_logits`) is the model's:
`model.attention_param_paths`; this module only turns it into `optim.QKClipTarget`s.
"""

from __future__ import annotations

from typing import Any

import jax

import optim
from model import ModelConfig, attention_param_paths


def qk_clip_targets(cfg: ModelConfig) -> list[tuple[optim.QKClipTarget, slice]]:
    """One `QKClipTarget` per attention module (per stack when layers are scanned), with
    the rows of the model's `max_logits [layers, heads]` it owns."""
    if cfg.qk_norm:
        raise ValueError("qk_clip has no effect with qk_norm (the norm removes the weights' scale)")
    exact = cfg.attn_max_logits is True or (
        cfg.attn_max_logits is None and cfg.attn_impl in ("explicit", "flash"))
    if not exact:
        raise ValueError(f"qk_clip needs exact max logits: set attn_max_logits=True (now "
                         f"{cfg.attn_max_logits!r}) or attn_impl='explicit'|'flash' (now "
                         f"{cfg.attn_impl!r})")
    out = []
    for a in attention_param_paths(cfg):
        if a.kind == "mla":
            t = optim.QKClipTarget(
                kind="mla", q_path=a.q_kernel, k_path=a.k_kernel, logits_key=a.block,
                num_heads=a.num_heads, qk_nope_head_dim=a.qk_nope_head_dim,
                qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
            )
        else:
            t = optim.QKClipTarget(
                kind="mha", q_path=a.q_kernel, k_path=a.k_kernel, logits_key=a.block,
                num_heads=a.num_heads, num_kv_heads=a.num_kv_heads,
                q_bias_path=a.q_bias, k_bias_path=a.k_bias,
            )
        out.append((t, a.rows))
    return out


def make_qk_clip_hook(cfg: ModelConfig, tau: float):
    """`hook(params, aux) -> (params, metrics)` applying QK-clip from `aux['max_logits']`."""
    pairs = qk_clip_targets(cfg)

    def hook(params: Any, aux: dict[str, jax.Array]):
        ml = aux["max_logits"]
        logits = {}
        for t, rows in pairs:
            part = ml[rows]
            logits[t.logits_key] = part if cfg.scan_layers else part[0]
        return optim.qk_clip(params, logits, tau=tau, targets=[t for t, _ in pairs])

    return hook

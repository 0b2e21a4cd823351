"""Wires `optim.qk_clip` to the model's parameter layout (the trainer's post-update hook)."""

from __future__ import annotations

from typing import Any

import jax

import optim
from model import ModelConfig


def qk_clip_targets(cfg: ModelConfig) -> list[tuple[optim.QKClipTarget, slice]]:
    """One `QKClipTarget` per attention module (per stack when layers are scanned), with
    the rows of the model's `max_logits [layers, heads]` it owns."""
    if cfg.qk_norm:
        raise ValueError("qk_clip has no effect with qk_norm (the norm removes the weights' scale)")
    if cfg.attn_impl != "explicit":
        raise ValueError(f"qk_clip needs the max-logit statistic, which attn_impl="
                         f"{cfg.attn_impl!r} does not compute (use attn_impl='explicit')")
    if cfg.scan_layers:
        blocks = [("dense_stack", slice(0, cfg.n_dense_layers))] if cfg.n_dense_layers else []
        if cfg.n_moe_layers:
            blocks.append(("moe_stack", slice(cfg.n_dense_layers, cfg.n_layers)))
    else:
        blocks = [(f"layers_{i}", slice(i, i + 1)) for i in range(cfg.n_layers)]
    out = []
    for name, rows in blocks:
        if cfg.attention == "mla":
            q = "q_b_proj" if cfg.q_lora_rank else "q_proj"
            t = optim.QKClipTarget(
                kind="mla", q_path=(name, "attn", q, "kernel"),
                k_path=(name, "attn", "kv_b_proj", "kernel"), logits_key=name,
                num_heads=cfg.n_heads, qk_nope_head_dim=cfg.qk_nope_head_dim,
                qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
            )
        else:
            bias = cfg.attn_bias
            t = optim.QKClipTarget(
                kind="mha", q_path=(name, "attn", "q_proj", "kernel"),
                k_path=(name, "attn", "k_proj", "kernel"), logits_key=name,
                num_heads=cfg.n_heads, num_kv_heads=cfg.num_kv_heads,
                q_bias_path=(name, "attn", "q_proj", "bias") if bias else None,
                k_bias_path=(name, "attn", "k_proj", "bias") if bias else None,
            )
        out.append((t, rows))
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

"""LoRA adapters (Hu et al., 2021) on the model's dense projections.

A targeted projection `y = x W` becomes

    y = x W + (alpha / r) * dropout(x) A B,    A [in, r] ~ N(0, 1/in),  B [r, out] = 0,

so at initialisation the adapted model *is* the base model (bitwise: the adapter adds an
exact 0). `ModelConfig.lora_rank` (r; 0 = off), `lora_alpha`, `lora_dropout` and
`lora_targets` configure it.

Which projections. Every `model.layers.Linear` built through `model.layers.dense` whose
module path, written with the block as `layers` (`layers_3/attn/q_proj` and the scanned
`dense_stack/attn/q_proj` are both `layers/attn/q_proj`), fully matches the regex
`lora_targets` (`re.fullmatch`). `projection_paths(cfg)` lists the candidates: MHA/GQA
`layers/attn/{q,k,v,o}_proj`; MLA `layers/attn/{q_proj | q_a_proj, q_b_proj}`,
`kv_a_proj`, `kv_b_proj`, `o_proj`; dense SwiGLU `layers/mlp/{gate,up,down}_proj`; MoE
shared experts `layers/moe/shared/{gate,up,down}_proj`. The default targets every
attention projection and dense SwiGLU matrix. Not adaptable: the routed experts (stacked
`[E, in, out]` weights, not `Linear`s), the MoE router, the embedding and the LM head.
A target is per module kind, not per layer (a scanned stack shares one module).

Parameters. `lora_a` and `lora_b` sit next to the projection's `kernel`
(`layers_0/attn/q_proj/{kernel, lora_a, lora_b}`; with `scan_layers` stacked
`[layers, in, r]` / `[layers, r, out]` like the kernel), sharded along the kernel's
input / output axis (the rank axis replicated). They are ordinary parameters, so
checkpoints save them. MLA's absorbed decoding reads `Linear.kernel`, the merged kernel.

Training. `train.setup.build_optimizer` trains only the adapters when they are present
(AdamW; the base weights get `optax.set_to_zero()` and no optimizer state), so every job
(pretrain, SFT, preference, RL) fine-tunes with LoRA by setting `config.model.lora_rank`.
The base weights' gradients are still computed (the step reports the global gradient
norm); MoE router biases still follow the balancing rule (`bias_update_rate=0` stops
them); QK-clip, which rescales base weights, is refused. With `config.init_from` the
checkpoint gives the base weights (its own adapters, if any, merged in) and the run's
adapters start fresh (`train.setup.load_init_from`).

Dropout. Applied to the adapter's input only when the caller passes a `"dropout"` rng
(`model.apply(..., rngs={"dropout": key})`); without one (evaluation, sampling, decoding)
the adapter is deterministic. The train and RL steps do not pass one yet, and the layer
scan (`scan_layers=True`) does not hand it to the stacked blocks (its `split_rngs` names
only `"params"`), so for now `lora_dropout` acts only in unscanned models applied with a
dropout rng.

Export. `merge_lora(cfg, params)` folds each adapter into its kernel,
`W + (alpha / r) A B`, and drops the adapters; run the result with
`base_config(cfg)` (`lora_rank=0`). `python -m model.hf export` does this.

References:
  Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
  <https://arxiv.org/abs/2106.09685>`_, 2021
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from model.config import ModelConfig

#: Parameter names of the adapter factors.
LORA_NAMES: tuple[str, str] = ("lora_a", "lora_b")
_BLOCK = re.compile(r"layers_\d+|dense_stack|moe_stack")


def module_key(path: Sequence[str]) -> str:
    """The name `lora_targets` is matched against: the module path joined by `/` with its
    block (`layers_{i}`, `dense_stack`, `moe_stack`) written `layers`."""
    names = [str(p) for p in path]
    if names and _BLOCK.fullmatch(names[0]):
        names[0] = "layers"
    return "/".join(names)


def projection_paths(cfg: ModelConfig) -> tuple[str, ...]:
    """The `module_key`s of the projections of `Transformer(cfg)` that can carry adapters."""
    if cfg.attention == "mla":
        q = ("q_a_proj", "q_b_proj") if cfg.q_lora_rank else ("q_proj",)
        attn = (*q, "kv_a_proj", "kv_b_proj", "o_proj")
    else:
        attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    swiglu = ("gate_proj", "up_proj", "down_proj")
    out = [f"layers/attn/{n}" for n in attn]
    if cfg.n_dense_layers:
        out += [f"layers/mlp/{n}" for n in swiglu]
    if cfg.n_moe_layers and cfg.n_shared_experts:
        out += [f"layers/moe/shared/{n}" for n in swiglu]
    return tuple(out)


def is_target(targets: str, key: str) -> bool:
    """Whether the module `key` (a `module_key`) is adapted under the regex `targets`."""
    return re.fullmatch(targets, key) is not None


def target_paths(cfg: ModelConfig) -> tuple[str, ...]:
    """The projections `cfg` adapts (none when `lora_rank == 0`)."""
    if not cfg.lora_rank:
        return ()
    return tuple(k for k in projection_paths(cfg) if is_target(cfg.lora_targets, k))


def target_errors(cfg: ModelConfig) -> list[str]:
    """`ModelConfig` validation of `lora_targets`: a valid regex that matches at least one
    projection of the model."""
    try:
        re.compile(cfg.lora_targets)
    except (re.error, TypeError) as e:
        return [f"lora_targets={cfg.lora_targets!r} is not a valid regex: {e}"]
    if not target_paths(cfg):
        return [f"lora_targets={cfg.lora_targets!r} matches none of this model's projections "
                f"({', '.join(projection_paths(cfg))})"]
    return []


def base_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` without adapters (`lora_rank=0`): the config of `merge_lora`'s output."""
    return cfg.replace(lora_rank=0)


def merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """`kernel + scale * a @ b` in float32 (at full matmul precision), returned in
    `kernel`'s dtype; leading (stacked layer) axes are batched over."""
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def scale(cfg: ModelConfig) -> float:
    """The adapter's output multiplier alpha / r."""
    return cfg.lora_alpha / cfg.lora_rank


def merge_lora(cfg: ModelConfig, params: Any) -> Any:
    """`params` with every adapter folded into its kernel (`W + alpha/r * A @ B`) and the
    `lora_a` / `lora_b` entries dropped: the parameters of `base_config(cfg)` computing the
    same function (up to float rounding) as the adapted model. A tree without adapters is
    returned as it is (a new dict structure, same arrays).

    Args:
      cfg: the adapted model's config (for alpha / r).
      params: the `params` collection (nested mappings of arrays, unboxed).
    Returns:
      The merged `params`, nested `dict`s.
    """

    def walk(node: Any) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v) for k, v in node.items() if k not in LORA_NAMES}
        if all(n in node for n in LORA_NAMES):
            out["kernel"] = merged_kernel(node["kernel"], node["lora_a"], node["lora_b"],
                                          scale(cfg))
        return out

    return walk(params)


def is_adapter(path: Sequence[Any]) -> bool:
    """Whether a parameter path (names, or a JAX key path; a trailing `.value` of a flax
    `nn.Partitioned` box is skipped) ends in an adapter factor."""
    names = [getattr(k, "key", getattr(k, "name", k)) for k in path]
    if names and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
        names = names[:-1]
    return bool(names) and names[-1] in LORA_NAMES


def adapter_mask(params: Any) -> Any:
    """A tree of bools shaped like `params`: True at the adapter factors."""
    return jax.tree_util.tree_map_with_path(lambda kp, _: is_adapter(kp), params)


def has_adapters(params: Any) -> bool:
    """Whether `params` holds any adapter factor."""
    return any(jax.tree.leaves(adapter_mask(params)))

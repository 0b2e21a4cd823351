"""The decoder-only `Transformer`: one definition for training, evaluation and decoding.

Variables:
  params:       trained weights (logical axis names on every one).
  router_bias:  the MoE loss-free balancing biases (not trained by gradients; updated
                with `update_router_biases` from the loads the forward reports).
  cache:        decoding caches (created by `init_cache`).

Parameter layout: `embed/embedding`, `layers_{i}/{attn_norm,attn,ffn_norm,mlp|moe}/...`,
`final_norm/scale`, `lm_head/kernel`. With `scan_layers=True` the blocks are stacked with
a leading `layers` axis under `dense_stack/...` (the first `first_k_dense` layers, or all
of a dense model) and `moe_stack/...`. `attention_param_paths` and `moe_bias_paths` give the
paths that code outside the model (QK-clip, the balancing update) works on;
`stack_layers` turns per-layer variables into the stacked layout.

Decoding (`decode=True`) with scanned layers carries each stack's cache, `[layers, ...]`,
whole through the layer scan: each layer writes its new entries into its own row in place
(no per-step copy of the cache).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from model.attention import Attention, MLAttention
from model.config import ModelConfig
from model.layers import Linear, RMSNorm, SwiGLU, constrain
from model.moe import MoE, update_router_bias

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then x + FFN(RMSNorm(x)) (FFN dense or MoE)."""

    cfg: ModelConfig
    moe: bool = False
    decode: bool = False
    mesh: Mesh | None = None
    stack: int = 0  # decoding in a scanned stack of this many layers (see `Attention`)

    @nn.compact
    def __call__(
        self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
        layer: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        attn_cls = MLAttention if cfg.attention == "mla" else Attention
        h = RMSNorm(cfg.norm_eps, dt, pdt, name="attn_norm")(x)
        h, max_logits = attn_cls(cfg, self.stack, name="attn")(
            h, positions, segment_ids, self.decode, layer)
        x = x + h
        h = RMSNorm(cfg.norm_eps, dt, pdt, name="ffn_norm")(x)
        aux: dict[str, jax.Array] = {"max_logits": max_logits}
        if self.moe:
            h, moe_aux = MoE(cfg, mesh=self.mesh, name="moe")(h, segment_ids)
            aux.update(moe_aux)
        else:
            h = SwiGLU(cfg, cfg.ffn_dim, name="mlp")(h)
        x = constrain(x + h, ("batch", "length", "act_embed"))
        return x, aux


def _block_cls(cfg: ModelConfig, scanned: bool):
    cls = Block  # its (carry, *broadcast) -> (carry, ys) signature suits nn.scan as is
    if cfg.remat != "none":
        cls = nn.remat(cls, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not scanned)
    return cls


class Transformer(nn.Module):
    """Decoder-only LM.

    `__call__(tokens [batch, length], positions=None, segment_ids=None, decode=False)`
    returns `(logits [batch, length, vocab] float32, aux)`; aux holds `max_logits
    [layers, heads]` and, for MoE models, `moe_load [moe_layers, experts]`,
    `moe_dropped [moe_layers]` and the summed `aux_loss`.

    `logits_at [batch]` (int): only the head outputs at position `logits_at[b]` of each row,
    `[batch, 1, ...]` (a prefill that needs only each prompt's last logits skips the LM head
    and its `[batch, length, vocab]` float32 output for the rest).

    With `return_hidden=True` it returns `(hidden [batch, length, d_model], aux)` instead:
    the final-norm output before the LM head, so that a loss can apply the head in chunks
    (`lm_head(cfg, params)` gives its kernel and logit multiplier). Initialize with the
    default `return_hidden=False` (the head's parameters are created by that path).

    `mesh`: the device mesh the model runs on, given explicitly (as MaxText does) to the
    parts that place work on devices themselves: MoE's expert-parallel dropless dispatch
    (`jax.shard_map` with `all_to_all` over the mesh axis the logical rules map `act_expert`
    to; apply under `nn.logical_axis_rules(LOGICAL_RULES)`). None (default): no such path, the
    single-program forward that the partitioner shards from the annotations alone. A mesh
    changes no parameter and (up to float rounding) no result, only where the work runs.
    """

    cfg: ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        decode: bool = False,
        return_hidden: bool = False,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        cfg = self.cfg
        b, t = tokens.shape
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        embed_std = 1.0 / math.sqrt(cfg.d_model) if cfg.scale_embeddings else cfg.init_std
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=dt,
            param_dtype=pdt,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(embed_std), ("vocab", "embed")
            ),
            name="embed",
        )
        x = embed(tokens)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), dt)
        x = constrain(x, ("batch", "length", "act_embed"))

        auxes: list[dict[str, jax.Array]] = []
        stacks = [("dense_stack", False, cfg.n_dense_layers), ("moe_stack", True, cfg.n_moe_layers)]
        if cfg.scan_layers:
            for name, is_moe, n in stacks:
                if n == 0:
                    continue
                # Decoding carries each stack's cache whole through the layer scan (each
                # layer writes its own row in place and reads it) instead of slicing it per
                # layer and stacking the results, which would copy the whole cache every
                # step. A cache is created (`init_cache`) the plain way: same layout.
                carry = decode and self.has_variable("cache", name)
                scanned = nn.scan(
                    _block_cls(cfg, True),
                    variable_axes={"params": 0, "router_bias": 0, **({} if carry else {"cache": 0})},
                    variable_carry="cache" if carry else False,
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, nn.broadcast, 0),
                    length=n,
                    metadata_params={nn.PARTITION_NAME: "layers"},
                )
                layer = jnp.arange(n, dtype=jnp.int32) if carry else None
                x, aux = scanned(cfg, is_moe, decode, self.mesh, n if carry else 0, name=name)(
                    x, positions, segment_ids, layer)
                auxes.append(aux)
        else:
            for i in range(cfg.n_layers):
                is_moe = i >= cfg.n_dense_layers
                x, aux = _block_cls(cfg, False)(cfg, is_moe, decode, self.mesh,
                                                name=f"layers_{i}")(x, positions, segment_ids)
                auxes.append(jax.tree.map(lambda a: a[None], aux))

        x = RMSNorm(cfg.norm_eps, dt, pdt, name="final_norm")(x)
        if logits_at is not None:  # one position per row: [batch, 1, d_model]
            x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)
        if return_hidden:
            return x, _collect_aux(auxes, cfg)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = Linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"),
                            init_std=cfg.init_std, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        if cfg.mup_base_d_model:
            logits = logits / cfg.width_multiplier  # muP output multiplier 1/m
        logits = constrain(logits, ("batch", "length", "act_vocab"))
        return logits, _collect_aux(auxes, cfg)


def _collect_aux(auxes: list[dict[str, jax.Array]], cfg: ModelConfig) -> dict[str, jax.Array]:
    out = {"max_logits": jnp.concatenate([a["max_logits"] for a in auxes], axis=0)}
    moe = [a for a in auxes if "load" in a]
    if cfg.is_moe and moe:
        out["moe_load"] = jnp.concatenate([a["load"] for a in moe], axis=0)
        out["moe_dropped"] = jnp.concatenate([a["dropped_frac"] for a in moe], axis=0)
        out["aux_loss"] = sum(jnp.sum(a["aux_loss"]) for a in moe)
    return out


def lm_head(cfg: ModelConfig, params: Any) -> tuple[jax.Array, float]:
    """`(kernel [d_model, vocab], multiplier)` with `logits = (hidden @ kernel) * multiplier`
    for the `hidden` that `Transformer(..., return_hidden=True)` returns: the LM head (or the
    transposed embedding when tied) in the compute dtype, and muP's output multiplier 1/m."""
    dt = jnp.dtype(cfg.dtype)
    if cfg.tie_embeddings:
        kernel = jnp.transpose(params["embed"]["embedding"]).astype(dt)
    else:
        kernel = params["lm_head"]["kernel"].astype(dt)
    return kernel, (1.0 / cfg.width_multiplier if cfg.mup_base_d_model else 1.0)


def init_cache(model: Transformer, params: Any, batch_size: int) -> Any:
    """An all-zero decoding cache for `batch_size` rows of up to `cfg.max_seq_len` tokens.

    Memory per layer and row: `max_seq_len * cfg.cache_values_per_token` values.
    """
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    shapes = jax.eval_shape(
        lambda p: model.apply(p, tokens, decode=True, mutable=["cache"])[1]["cache"], params
    )
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def stack_layers(cfg: ModelConfig, variables: Any) -> Any:
    """`variables` of `Transformer(cfg)` with per-layer blocks (`scan_layers=False`:
    `layers_{i}/...`) in the layout of its scanned twin (`cfg.replace(scan_layers=True)`):
    every leaf of the first `n_dense_layers` blocks stacked along a new leading axis under
    `dense_stack/...`, those of the MoE blocks under `moe_stack/...`, in every collection
    (`params` with any LoRA adapters, `router_bias`, ...); everything else as is. The stacked
    arrays are new buffers (one copy of the block weights). Returns `variables` unchanged
    when `cfg.scan_layers` is already set."""
    if cfg.scan_layers:
        return variables
    groups = [("dense_stack", range(cfg.n_dense_layers)),
              ("moe_stack", range(cfg.n_dense_layers, cfg.n_layers))]
    out = {}
    for col, tree in variables.items():
        if not any(f"layers_{i}" in tree for i in range(cfg.n_layers)):
            out[col] = tree
            continue
        new = {k: v for k, v in tree.items() if not k.startswith("layers_")}
        for name, idx in groups:
            blocks = [tree[f"layers_{i}"] for i in idx if f"layers_{i}" in tree]
            if blocks:
                new[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
        out[col] = new
    return out


@dataclasses.dataclass(frozen=True)
class AttentionParamPaths:
    """Where one attention module (or one scanned stack of them) keeps its query and key
    weights inside `params`, how its heads are laid out, and which rows of the forward's
    `aux["max_logits"] [layers, heads]` hold its heads' max logits.

    Attributes:
      kind: `"mha"` (also GQA/MQA) or `"mla"`.
      block: the block's key in `params`: `layers_{i}`, or `dense_stack` / `moe_stack`.
      q_kernel: the query kernel `[(layers,) in, heads * q_head_dim]`: `attn/q_proj/kernel`
        (MLA: `attn/q_b_proj/kernel` with a q LoRA; per head `[qk_nope, qk_rope]`).
      k_kernel: MHA: `attn/k_proj/kernel` `[(layers,) d_model, kv_heads * head_dim]`; MLA:
        `attn/kv_b_proj/kernel` `[(layers,) kv_lora_rank, heads * (qk_nope + v)]`, per head
        `[k_nope, v]` (the shared rope key is in `kv_a_proj`).
      q_bias, k_bias: MHA biases `[(layers,) heads * head_dim]` with `attn_bias`, else None.
      rows: the rows of `max_logits` this entry owns (`rows.stop - rows.start` = its layers).
      stacked: the kernels carry a leading `layers` axis (a scanned stack).
      num_heads, num_kv_heads: query heads, key/value heads (MLA: `num_heads`).
      head_dim: MHA head size (MLA: 0).
      qk_nope_head_dim, qk_rope_head_dim, v_head_dim: MLA head sizes (MHA: 0).
    """

    kind: Literal["mha", "mla"]
    block: str
    q_kernel: tuple[str, ...]
    k_kernel: tuple[str, ...]
    q_bias: tuple[str, ...] | None
    k_bias: tuple[str, ...] | None
    rows: slice
    stacked: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0


def attention_param_paths(cfg: ModelConfig) -> list[AttentionParamPaths]:
    """The query/key weights of every attention module of `Transformer(cfg)`'s `params`, in
    layer order: one entry per layer, or one per scanned stack with `scan_layers`."""
    if cfg.scan_layers:
        blocks = [("dense_stack", slice(0, cfg.n_dense_layers))] if cfg.n_dense_layers else []
        if cfg.n_moe_layers:
            blocks.append(("moe_stack", slice(cfg.n_dense_layers, cfg.n_layers)))
    else:
        blocks = [(f"layers_{i}", slice(i, i + 1)) for i in range(cfg.n_layers)]
    out = []
    for name, rows in blocks:
        path = lambda module, leaf, name=name: (name, "attn", module, leaf)  # noqa: E731
        if cfg.attention == "mla":
            q = "q_b_proj" if cfg.q_lora_rank else "q_proj"
            out.append(AttentionParamPaths(
                kind="mla", block=name, q_kernel=path(q, "kernel"),
                k_kernel=path("kv_b_proj", "kernel"), q_bias=None, k_bias=None, rows=rows,
                stacked=cfg.scan_layers, num_heads=cfg.n_heads, num_kv_heads=cfg.n_heads,
                qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                v_head_dim=cfg.v_head_dim,
            ))
        else:
            bias = cfg.attn_bias
            out.append(AttentionParamPaths(
                kind="mha", block=name, q_kernel=path("q_proj", "kernel"),
                k_kernel=path("k_proj", "kernel"),
                q_bias=path("q_proj", "bias") if bias else None,
                k_bias=path("k_proj", "bias") if bias else None, rows=rows,
                stacked=cfg.scan_layers, num_heads=cfg.n_heads, num_kv_heads=cfg.num_kv_heads,
                head_dim=cfg.attn_head_dim,
            ))
    return out


def moe_bias_paths(cfg: ModelConfig) -> list[tuple[str, ...]]:
    """Paths of the router biases inside the `router_bias` collection, in layer order (one
    stacked `[moe_layers, E]` entry when layers are scanned)."""
    if not cfg.is_moe:
        return []
    if cfg.scan_layers:
        return [("moe_stack", "moe", "bias")]
    return [(f"layers_{i}", "moe", "bias") for i in range(cfg.n_dense_layers, cfg.n_layers)]


def update_router_biases(
    cfg: ModelConfig, router_bias: Any, moe_load: jax.Array, rate: float | None = None
) -> Any:
    """Applies the loss-free balancing update to every MoE layer.

    Args:
      router_bias: the `router_bias` variable collection.
      moe_load: `[moe_layers, experts]` loads from the forward pass (`aux["moe_load"]`),
        summed over the global batch.
      rate: u; defaults to `cfg.bias_update_rate`.
    Returns:
      The updated collection (same structure).
    """
    u = cfg.bias_update_rate if rate is None else rate
    new = jax.tree.map(lambda x: x, router_bias)  # shallow structural copy
    paths = moe_bias_paths(cfg)
    for i, path in enumerate(paths):
        node = new
        for key in path[:-1]:
            node = node[key]
        load = moe_load if cfg.scan_layers else moe_load[i]
        node[path[-1]] = update_router_bias(node[path[-1]], load, u)
    return new

"""DeepSeek-V3 Mixture of Experts: shared + routed SwiGLU experts with auxiliary-loss-free
load balancing (Wang et al., 2024, "Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts"; DeepSeek-V3 Sec. 2.1.2).

Routing (all in float32): affinities s = sigmoid(x W_r) (or softmax); the top-k experts are
chosen on s + b, where b is a per-expert bias that is *not* a trained parameter (it lives
in the `router_bias` variable collection); the gate of a chosen expert is its raw s,
normalized over the chosen experts, times `routed_scaling_factor`. After each step
`update_router_bias` moves b_i by u * sign(mean_load - load_i).

Dispatch (`ModelConfig.moe_dispatch`; `choose_moe` resolves "auto" per device and prints
as `moe: ...` at the start of a run):

- `"capacity"`: each expert processes at most
  C = ceil(capacity_factor * tokens * top_k / experts) tokens in a `[experts, C, d_model]`
  buffer (one batched matmul per projection, sharded on the `expert` axis); assignments past
  an expert's capacity are dropped (top-1 choices have priority over top-2, ...) and their
  fraction is reported. Slots come from a stable sort by expert, not a one-hot cumsum.
  Compute is O(capacity_factor * tokens * top_k).
- `"dropless"`: the (token, expert) assignments are sorted by expert, each expert's rows go
  through its SwiGLU in a grouped GEMM (`model.grouped_matmul`, `ModelConfig.moe_gemm`: the
  block loop on CPU, megablox on TPU, the Hopper Pallas kernels on H100/H200,
  `jax.lax.ragged_dot` anywhere), and the outputs are unsorted and combined with the gates;
  nothing is dropped and nothing goes to the host inside the step. When the module is given
  a `mesh` whose `expert` axis (the mesh axis the logical rules map `act_expert` to) has
  size > 1, each device's experts run where they live, tokens travelling there and back
  with two `all_to_all`s (`jax.shard_map` over `expert`), through the same grouped GEMM;
  `mesh=None` runs the single-program path (which the partitioner may still shard).
- `"dense"`: every token through every expert, outputs combined with one-hot gates:
  O(tokens * experts), the reference the others are measured against.
- `"auto"` (default): dropless on CPU, TPU and Hopper GPUs (where the Pallas kernels pass a
  self-check), capacity on other GPUs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from model.config import ModelConfig
from model.grouped_matmul import expert_swiglu, grouped_moe, pallas_gpu_problem, sort_by_expert
from model.layers import Linear, SwiGLU, constrain, hidden_std


def router_scores(logits: jax.Array, score: str) -> jax.Array:
    """Affinities from router logits `[..., experts]` (float32)."""
    logits = logits.astype(jnp.float32)
    return jax.nn.sigmoid(logits) if score == "sigmoid" else jax.nn.softmax(logits, axis=-1)


def select_experts(
    scores: jax.Array,
    bias: jax.Array,
    top_k: int,
    *,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
    group_score: str = "top2",
) -> tuple[jax.Array, jax.Array]:
    """Top-k expert choice on `scores + bias`, gates from the raw scores.

    Group-limited routing (DeepSeek-V3): experts are split into `n_group` groups, a group's
    score is the sum of its two best biased scores (`group_score="top2"`; `"max"` for the
    softmax/V2 variant), and only the `topk_group` best groups are eligible.

    Args:
      scores: `[tokens, experts]` float32 affinities.
      bias: `[experts]` balancing bias (affects the choice only).
    Returns:
      `(indices [tokens, top_k] int32, gates [tokens, top_k] float32)`.
    """
    n, e = scores.shape
    choice = scores + bias.astype(jnp.float32)[None, :]
    if n_group > 1:
        grouped = choice.reshape(n, n_group, e // n_group)
        if group_score == "top2":
            gs = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
        else:
            gs = jnp.max(grouped, axis=-1)
        _, gidx = jax.lax.top_k(gs, topk_group)
        gmask = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], gidx].set(True)
        emask = jnp.repeat(gmask, e // n_group, axis=1)
        choice = jnp.where(emask, choice, -jnp.inf)
    _, idx = jax.lax.top_k(choice, top_k)
    gates = jnp.take_along_axis(scores, idx, axis=-1)
    if norm_topk_prob:
        gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-20)
    return idx.astype(jnp.int32), gates * routed_scaling_factor


def expert_load(indices: jax.Array, n_experts: int, mask: jax.Array | None = None) -> jax.Array:
    """Number of (valid) tokens routed to each expert: `[experts]` float32."""
    oh = jax.nn.one_hot(indices, n_experts, dtype=jnp.float32).sum(axis=-2)  # [tokens, E]
    if mask is not None:
        oh = oh * mask.astype(jnp.float32)[:, None]
    return oh.sum(axis=0)


def update_router_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Loss-free balancing update b_i <- b_i + u * sign(mean_load - load_i) (Wang et al.,
    Alg. 1). `load` must be summed over the whole global batch. Works on stacked
    `[..., experts]` arrays (one row per layer)."""
    load = load.astype(jnp.float32)
    err = jnp.mean(load, axis=-1, keepdims=True) - load
    return (bias + rate * jnp.sign(err)).astype(bias.dtype)


def max_violation(load: jax.Array) -> jax.Array:
    """MaxVio = (max_i load_i - mean load) / mean load (Wang et al., Eq. 5); `[..., E] -> [...]`."""
    mean = jnp.mean(load, axis=-1)
    return (jnp.max(load, axis=-1) - mean) / jnp.maximum(mean, 1e-9)


def sequence_aux_loss(
    scores: jax.Array, indices: jax.Array, n_experts: int, top_k: int, mask: jax.Array | None
) -> jax.Array:
    """Sequence-wise balance loss (DeepSeek-V3 Eqs. 17-20), without alpha, averaged over
    sequences: sum_i f_i P_i with f_i = E/(K T) * #{t: i in topk_t},
    P_i = mean_t s_{i,t} / sum_j s_{j,t}.

    Args:
      scores: `[batch, length, E]`; indices: `[batch, length, K]`; mask: `[batch, length]`.
    """
    m = jnp.ones(scores.shape[:2], jnp.float32) if mask is None else mask.astype(jnp.float32)
    t = jnp.maximum(m.sum(axis=1), 1.0)  # [b]
    sel = jax.nn.one_hot(indices, n_experts, dtype=jnp.float32).sum(axis=-2)  # [b, l, E]
    f = n_experts / (top_k * t[:, None]) * jnp.einsum("ble,bl->be", sel, m)
    sn = scores / (jnp.sum(scores, axis=-1, keepdims=True) + 1e-20)
    p = jnp.einsum("ble,bl->be", sn, m) / t[:, None]
    return jnp.mean(jnp.sum(f * p, axis=-1))


@dataclasses.dataclass(frozen=True)
class MoEBackend:
    """How the routed experts run: `dispatch` (capacity | dropless | dense), the grouped
    GEMM of the dropless dispatch (`gemm`, one of `model.grouped_matmul.GEMMS`; None for
    the others) and why."""

    dispatch: str
    gemm: str | None
    reason: str

    def describe(self) -> str:
        how = self.dispatch + (f" / {self.gemm}" if self.gemm else "")
        return f"moe: {how} ({self.reason})"


def choose_moe(cfg: ModelConfig, platform: str | None = None) -> MoEBackend:
    """The MoE dispatch and grouped GEMM for `cfg.moe_dispatch` / `cfg.moe_gemm` on
    `platform` (default: this process's JAX backend). "auto" picks per device: CPU -> the
    dropless block loop; TPU -> dropless with the megablox kernels; an NVIDIA Hopper GPU
    where the Pallas kernels pass their self-check -> dropless with them; other GPUs ->
    the capacity buffers (batched einsums). A requested backend that cannot run here
    raises `ValueError` naming why."""
    platform = platform or jax.default_backend()
    gemm = cfg.moe_gemm
    if cfg.moe_dispatch in ("capacity", "dense"):
        return MoEBackend(cfg.moe_dispatch, None, "requested")
    if gemm == "pallas_gpu" or (gemm == "auto" and platform == "gpu"):
        problem = pallas_gpu_problem(cfg.dtype) if platform == "gpu" else (
            f"needs an NVIDIA Hopper GPU; this process runs on {platform}")
        if gemm == "pallas_gpu" and problem:
            raise ValueError(f"moe_gemm='pallas_gpu' cannot run: {problem}")
        if problem is None:
            return MoEBackend("dropless", "pallas_gpu",
                              "requested" if gemm != "auto" else "auto: Hopper GPU")
        if cfg.moe_dispatch == "auto":
            return MoEBackend("capacity", None,
                              f"auto: the Hopper grouped-GEMM kernels {problem}")
        return MoEBackend("dropless", "ragged_dot", f"auto: Pallas kernels {problem}")
    if gemm == "megablox" and platform not in ("tpu", "cpu"):
        raise ValueError(f"moe_gemm='megablox' runs on TPU (or in interpret mode on CPU), "
                         f"not on {platform}")
    if gemm != "auto":
        note = " (Pallas interpret mode: slow)" if gemm == "megablox" and platform == "cpu" else ""
        return MoEBackend("dropless", gemm, "requested" + note)
    if platform == "tpu":
        return MoEBackend("dropless", "megablox", "auto: TPU")
    return MoEBackend("dropless", "blocks", f"auto: {platform}")


def capacity(n_tokens: int, n_experts: int, top_k: int, factor: float) -> int:
    """Per-expert buffer size: ceil(factor * tokens * top_k / experts), at most `tokens`."""
    return max(1, min(n_tokens, math.ceil(factor * n_tokens * top_k / n_experts)))


class Experts(nn.Module):
    """Stacked SwiGLU experts, `[E, d_in, d_out]` weights sharded on `expert`.

    `__call__` runs the capacity buffers, `dense` and `dropless` the other dispatches
    (`ModelConfig.moe_dispatch`); all three use the same parameters. `mesh`: the device mesh
    for the expert-parallel dropless path (None: the single-program path)."""

    cfg: ModelConfig
    mesh: Mesh | None = None

    def setup(self) -> None:
        cfg = self.cfg
        e, d, f = cfg.n_routed_experts, cfg.d_model, cfg.moe_ffn_dim
        pd = jnp.dtype(cfg.param_dtype)
        init = nn.initializers.normal(hidden_std(cfg))
        w = lambda name, shape, axes: self.param(  # noqa: E731
            name, nn.with_logical_partitioning(init, axes), shape, pd
        )
        self.w_gate = w("w_gate", (e, d, f), ("expert", "embed", "mlp"))
        self.w_up = w("w_up", (e, d, f), ("expert", "embed", "mlp"))
        self.w_down = w("w_down", (e, f, d), ("expert", "mlp", "embed"))

    def _weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        dt = jnp.dtype(self.cfg.dtype)
        return self.w_gate.astype(dt), self.w_up.astype(dt), self.w_down.astype(dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x [experts, capacity, d_model] -> [experts, capacity, d_model]`."""
        w_gate, w_up, w_down = self._weights()
        x = x.astype(w_gate.dtype)
        g = jnp.einsum("ecd,edf->ecf", x, w_gate)
        u = jnp.einsum("ecd,edf->ecf", x, w_up)
        h = constrain(nn.silu(g) * u, ("act_expert", "capacity", "act_mlp"))
        return jnp.einsum("ecf,efd->ecd", h, w_down)

    def dense(self, x: jax.Array, combine: jax.Array) -> jax.Array:
        """Every token through every expert: `x [n, d]`, `combine [n, E]` (gate of each
        chosen expert, 0 elsewhere) -> `[n, d]`."""
        w_gate, w_up, w_down = self._weights()
        x = x.astype(w_gate.dtype)
        h = nn.silu(jnp.einsum("nd,edf->enf", x, w_gate)) * jnp.einsum("nd,edf->enf", x, w_up)
        h = constrain(h, ("act_expert", None, "act_mlp"))
        return jnp.einsum("enf,efd,ne->nd", h, w_down, combine.astype(h.dtype))

    def dropless(self, x: jax.Array, idx: jax.Array, gates: jax.Array) -> jax.Array:
        """Sorted dispatch: `x [n, d]`, chosen experts `idx [n, k]` and their `gates [n, k]`
        -> `sum_k gates * expert_k(x)` `[n, d]`, every assignment computed by the grouped
        GEMM `choose_moe(cfg).gemm`. Expert-parallel (`expert_parallel_dropless`) when
        `self.mesh` splits the expert axis."""
        w = self._weights()
        x = x.astype(w[0].dtype)
        gemm = choose_moe(self.cfg).gemm
        ep = _expert_mesh(self.mesh, self.cfg.n_routed_experts, x.shape[0])
        if ep is not None:
            return expert_parallel_dropless(x, idx, gates, w, *ep, gemm=gemm)
        return grouped_moe(x, idx, gates, w, gemm)


def _slot_in_expert(flat_e: jax.Array, n_experts: int) -> jax.Array:
    """Each assignment's slot among the earlier assignments to its expert (`flat_e [A]`
    expert ids, in priority order), by a stable sort: no `[A, experts]` one-hot."""
    order, sizes = sort_by_expert(flat_e, n_experts)
    start = jnp.cumsum(sizes) - sizes
    slot_sorted = jnp.arange(flat_e.shape[0], dtype=jnp.int32) - start[flat_e[order]]
    return jnp.zeros_like(order).at[order].set(slot_sorted)


def _capacity_dispatch(
    experts: Experts, xf: jax.Array, idx: jax.Array, gates: jax.Array, c: int,
    valid: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Capacity buffers `[E, c, d]`; assignment order is k-major so top-1 choices win
    capacity. Returns (`y [n, d]`, fraction of valid assignments dropped)."""
    n, d = xf.shape
    k, e = idx.shape[1], experts.cfg.n_routed_experts
    flat_e = idx.T.reshape(k * n)  # [k*n]
    tok = jnp.tile(jnp.arange(n), k)
    pos = _slot_in_expert(flat_e, e)
    keep = pos < c
    buf = jnp.zeros((e, c, d), xf.dtype).at[flat_e, pos].set(xf[tok], mode="drop")
    buf = constrain(buf, ("act_expert", "capacity", "act_embed"))
    out = experts(buf)
    y_assign = out[flat_e, jnp.minimum(pos, c - 1)] * keep[:, None].astype(out.dtype)
    w = gates.T.reshape(k * n, 1).astype(out.dtype)
    y = jnp.sum((y_assign * w).reshape(k, n, d), axis=0)
    vk = jnp.tile(jnp.ones((n,), bool) if valid is None else valid, k)
    return y, jnp.sum(vk & ~keep) / jnp.maximum(jnp.sum(vk), 1)


def _expert_mesh(
    mesh: Mesh | AbstractMesh | None, n_experts: int, n_tokens: int
) -> tuple[Mesh | AbstractMesh, str] | None:
    """`(mesh, axis)` when `mesh` splits the mesh axis that the logical rules map
    `act_expert` to over more than one device and that size divides the expert and token
    counts; else None (also for `mesh=None`)."""
    if mesh is None or mesh.empty:
        return None
    axis = nn.logical_to_mesh_axes(("act_expert",))[0]
    if not isinstance(axis, str) or axis not in mesh.axis_names:
        return None
    size = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))[axis]
    return (mesh, axis) if size > 1 and n_experts % size == 0 == n_tokens % size else None


def expert_parallel_dropless(
    x: jax.Array, idx: jax.Array, gates: jax.Array,
    w: tuple[jax.Array, jax.Array, jax.Array], mesh: Mesh | AbstractMesh, axis: str,
    gemm: str = "blocks",
) -> jax.Array:
    """Dropless MoE with the experts split over mesh axis `axis` (expert parallelism).

    Inside `jax.shard_map` over `axis` (the other mesh axes stay automatic), each device
    holds `n / ep` tokens and `E / ep` experts. It sorts its assignments by expert (so by
    destination device), sends them with one `all_to_all` (a slot of `n / ep * k` rows per
    destination: room for every assignment going to one device, hence nothing dropped),
    runs the grouped SwiGLU of its own experts over the rows it received
    (`model.grouped_matmul.expert_swiglu` with `gemm`), and returns the outputs with a
    second `all_to_all`; the gates are applied on the tokens' own device. Equals
    `grouped_moe` on one device.
    """
    ep = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))[axis]
    n, d = x.shape
    k, e = idx.shape[1], w[0].shape[0]
    el = e // ep

    def local(x, idx, gates, wg, wu, wd):
        nl = x.shape[0]
        a = nl * k
        flat_e = idx.reshape(a)
        dest = flat_e // el
        # Slot of each assignment within its destination's buffer (stable, by expert).
        order = jnp.argsort(flat_e, stable=True)
        count = jnp.zeros((ep,), jnp.int32).at[dest].add(1)
        sd = dest[order]
        slot_sorted = jnp.arange(a, dtype=jnp.int32) - (jnp.cumsum(count) - count)[sd]
        slot = jnp.zeros((a,), jnp.int32).at[order].set(slot_sorted.astype(jnp.int32))
        tok = jnp.repeat(jnp.arange(nl, dtype=jnp.int32), k)
        send_x = jnp.zeros((ep, a, d), x.dtype).at[dest, slot].set(x[tok])
        send_e = jnp.full((ep, a), el, jnp.int32).at[dest, slot].set(flat_e - dest * el)
        exchange = functools.partial(jax.lax.all_to_all, axis_name=axis, split_axis=0,
                                     concat_axis=0, tiled=True)
        recv_x, recv_e = exchange(send_x).reshape(ep * a, d), exchange(send_e).reshape(ep * a)
        # Local experts 0..el-1; empty slots carry expert id el and sort last, past the
        # groups the grouped GEMM computes (they give 0).
        order, sizes = sort_by_expert(recv_e, el + 1)
        ys_sorted = expert_swiglu(recv_x[order], sizes[:el], wg, wu, wd, gemm)
        ys = jnp.zeros_like(ys_sorted).at[order].set(ys_sorted)
        back = exchange(ys.reshape(ep, a, d))
        y = back[dest, slot].reshape(nl, k, d)
        return jnp.einsum("nkd,nk->nd", y, gates.astype(y.dtype))

    spec = P(axis)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 6, out_specs=spec,
                         axis_names={axis}, check_vma=False)(x, idx, gates, *w)


class MoE(nn.Module):
    """Shared + routed experts (DeepSeek-V3 Eq. 12-16) with the loss-free balancing bias.

    `mesh`: the device mesh, for the expert-parallel dropless dispatch (`Experts.dropless`);
    None: no expert-parallel `shard_map` (the single-program path)."""

    cfg: ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, segment_ids: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`x [batch, length, d_model]` -> (`y` same shape, aux) with aux holding `load [E]`
        (tokens per expert), `aux_loss` (sequence-wise, times alpha) and `dropped_frac`."""
        cfg = self.cfg
        b, t, d = x.shape
        e, k = cfg.n_routed_experts, cfg.top_k
        n = b * t
        bias = self.variable("router_bias", "bias", jnp.zeros, (e,), jnp.float32)
        router = Linear(d, e, ("embed", None), init_std=hidden_std(cfg), dtype="float32",
                        param_dtype=cfg.param_dtype, name="router")
        scores = router_scores(router(x.astype(jnp.float32)), cfg.router_score)  # [b, t, E]
        idx, gates = select_experts(
            scores.reshape(n, e),
            bias.value,
            k,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
            group_score="top2" if cfg.router_score == "sigmoid" else "max",
        )
        valid = None if segment_ids is None else (segment_ids.reshape(n) != 0)
        load = expert_load(idx, e, valid)

        xf = x.reshape(n, d)
        experts = Experts(cfg, mesh=self.mesh, name="experts")
        dispatch = choose_moe(cfg).dispatch
        if dispatch == "capacity":
            y, dropped = _capacity_dispatch(experts, xf, idx, gates, c=capacity(
                n, e, k, cfg.capacity_factor), valid=valid)
        elif dispatch == "dense":
            combine = jnp.sum(jax.nn.one_hot(idx, e, dtype=gates.dtype) * gates[..., None], axis=1)
            y, dropped = experts.dense(xf, combine), jnp.zeros((), jnp.float32)
        else:
            y, dropped = experts.dropless(xf, idx, gates), jnp.zeros((), jnp.float32)
        y = y.reshape(b, t, d)

        if cfg.n_shared_experts:
            y = y + SwiGLU(cfg, cfg.n_shared_experts * cfg.moe_ffn_dim, name="shared")(x)

        aux_loss = jnp.zeros((), jnp.float32)
        if cfg.aux_loss_alpha > 0:
            aux_loss = cfg.aux_loss_alpha * sequence_aux_loss(
                scores, idx.reshape(b, t, k), e, k,
                None if segment_ids is None else segment_ids != 0,
            )
        return y.astype(x.dtype), {"load": load, "aux_loss": aux_loss, "dropped_frac": dropped}

"""Grouped GEMM for the routed experts: rows sorted by expert -> each row through its
expert's SwiGLU, with one kernel per device kind.

The input is `xs [rows, d]`, rows grouped by expert in order (expert e owns `group_sizes[e]`
consecutive rows; rows past `sum(group_sizes)` are padding and give 0), and the stacked
expert weights `w_gate, w_up [E, d, f]`, `w_down [E, f, d]`. Every backend computes

    ys[r] = (silu(xs[r] Wg[e]) * (xs[r] Wu[e])) Wd[e]        for row r of expert e

with its gradient, and none moves data to the host inside the step:

  "blocks"      rows padded per expert to blocks of `block_rows` rows, a loop over each
                expert's blocks with a data-dependent trip count (`grouped_swiglu`):
                the fastest on a CPU, where a loop step is cheap.
  "ragged_dot"  `jax.lax.ragged_dot` (XLA's grouped matmul; its transpose rules give the
                backward pass). Portable; XLA:GPU lowers it to a zero-padded dense dot.
  "megablox"    the TPU grouped-matmul Pallas kernels (`gmm`, `tgmm` for the weight
                gradient; `jax.experimental.pallas.ops.tpu.megablox`); on a CPU they run in
                Pallas interpret mode (slow: for tests).
  "pallas_gpu"  the Hopper (sm90) Pallas kernels `ragged_dot_mgpu` and
                `transposed_ragged_dot_mgpu` (weight gradient), with a custom VJP.

The Pallas kernels are imported only when used, so a CPU install never needs them.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

GEMMS = ("blocks", "ragged_dot", "megablox", "pallas_gpu")


def pad_rows(xs: jax.Array, group_sizes: jax.Array, multiple: int) -> tuple[jax.Array, jax.Array]:
    """`xs` zero-padded to a multiple of `multiple` rows, and group sizes that cover every
    row (the padding, and any rows past `sum(group_sizes)`, join the last group: zero rows
    give zero outputs and zero weight gradients). Kernels that tile the rows need both."""
    rows = xs.shape[0]
    total = -(-rows // multiple) * multiple
    xs = jnp.pad(xs, ((0, total - rows), (0, 0)))
    gs = group_sizes.astype(jnp.int32)
    gs = gs.at[-1].add(total - jnp.sum(gs))
    return xs, gs


def _swiglu(gu: jax.Array, f: int) -> jax.Array:
    return nn.silu(gu[:, :f]) * gu[:, f:]


# ------------------------------------------------------------------------------ blocks
def block_rows(n_assign: int, n_experts: int) -> int:
    """Rows per block of the dropless grouped matmul: a power of two near a quarter of the
    mean expert load, in [8, 128] (padding waste < B rows per expert)."""
    target = max(1, n_assign // (4 * n_experts))
    return max(8, min(128, 1 << (target.bit_length() - 1)))


def _silu_grad(g: jax.Array) -> jax.Array:
    s = jax.nn.sigmoid(g)
    return s * (1 + g * (1 - s))


def _expert_loops(body, carry, b0, nb, block, rows):
    """Runs `body(size, row0, carry)` over the `nb` blocks of `block` rows from block `b0`:
    first as many chunks of `4 * block` rows as fit, then the remaining single blocks (fewer
    loop steps and larger matmuls than single blocks only; rows are still padded to
    `block`, so the waste stays under `block` rows per expert). A layout of fewer than
    `4 * block` rows (few tokens: a decode step) has no chunk and runs single blocks only."""
    big = 4 * block
    if rows < big:  # a chunk's static slice would not fit in the layout
        return jax.lax.fori_loop(0, nb, lambda j, c: body(block, (b0 + j) * block, c), carry)
    n_big = nb // 4
    carry = jax.lax.fori_loop(0, n_big, lambda j, c: body(big, (b0 + 4 * j) * block, c), carry)
    start = b0 + 4 * n_big
    return jax.lax.fori_loop(0, nb - 4 * n_big,
                             lambda j, c: body(block, (start + j) * block, c), carry)


def _grouped_fwd(xs, first, n_blocks, w_gate, w_up, w_down, block):
    """Forward of `grouped_swiglu`, also returning the gate/up pre-activations `[rows, 2f]`
    for the backward. Gate and up are one matmul per block (their weights concatenated per
    expert)."""
    rows, d = xs.shape
    f = w_gate.shape[-1]
    dslice = jax.lax.dynamic_slice_in_dim
    dupdate = jax.lax.dynamic_update_slice_in_dim

    def expert(carry, inp):
        wg, wu, wd, b0, nb = inp
        wgu = jnp.concatenate([wg, wu], axis=-1)

        def body(size, r0, c):
            ys, gus = c
            gu = dslice(xs, r0, size) @ wgu
            y = (nn.silu(gu[:, :f]) * gu[:, f:]) @ wd
            return dupdate(ys, y, r0, 0), dupdate(gus, gu, r0, 0)

        return _expert_loops(body, carry, b0, nb, block, rows), None

    init = (jnp.zeros((rows, d), xs.dtype), jnp.zeros((rows, 2 * f), xs.dtype))
    (ys, gus), _ = jax.lax.scan(expert, init, (w_gate, w_up, w_down, first, n_blocks))
    return ys, gus


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def grouped_swiglu(xs, first, n_blocks, w_gate, w_up, w_down, block):
    """Grouped SwiGLU over the sorted row layout (`sorted_layout`): rows of blocks
    `first[e] .. first[e] + n_blocks[e] - 1` of `xs [rows, d]` go through expert e of the
    stacked `[E, ...]` weights; other rows give 0. Only the blocks in use are computed (a
    loop per expert with a data-dependent trip count), in the backward pass too (custom VJP:
    each expert's weight gradient is accumulated over its own blocks only)."""
    return _grouped_fwd(xs, first, n_blocks, w_gate, w_up, w_down, block)[0]


def _grouped_vjp_fwd(xs, first, n_blocks, w_gate, w_up, w_down, block):
    ys, gus = _grouped_fwd(xs, first, n_blocks, w_gate, w_up, w_down, block)
    return ys, (xs, gus, first, n_blocks, w_gate, w_up, w_down)


def _grouped_vjp_bwd(block, res, dys):
    xs, gus, first, n_blocks, w_gate, w_up, w_down = res
    f = w_gate.shape[-1]
    dslice = jax.lax.dynamic_slice_in_dim
    f32 = jnp.float32

    def expert(dx, inp):
        wg, wu, wd, b0, nb = inp
        wgu = jnp.concatenate([wg, wu], axis=-1)

        def body(size, r0, c):
            dx, dwgu, dwd = c
            x, gu, dy = (dslice(a, r0, size) for a in (xs, gus, dys))
            g, u = gu[:, :f], gu[:, f:]
            sg = nn.silu(g)
            dwd = dwd + jnp.einsum("bf,bd->fd", sg * u, dy, preferred_element_type=f32)
            dh = dy @ wd.T
            dgu = jnp.concatenate([dh * u * _silu_grad(g), dh * sg], axis=-1)
            dwgu = dwgu + jnp.einsum("bd,bf->df", x, dgu, preferred_element_type=f32)
            dxb = (dgu @ wgu.T).astype(dx.dtype)
            return jax.lax.dynamic_update_slice_in_dim(dx, dxb, r0, 0), dwgu, dwd

        zeros = (jnp.zeros(wgu.shape, f32), jnp.zeros(wd.shape, f32))
        dx, dwgu, dwd = _expert_loops(body, (dx, *zeros), b0, nb, block, xs.shape[0])
        return dx, (dwgu[:, :f], dwgu[:, f:], dwd)

    dx, (dwg, dwu, dwd) = jax.lax.scan(
        expert, jnp.zeros_like(xs), (w_gate, w_up, w_down, first, n_blocks))
    return (dx, None, None, dwg.astype(w_gate.dtype), dwu.astype(w_up.dtype),
            dwd.astype(w_down.dtype))


grouped_swiglu.defvjp(_grouped_vjp_fwd, _grouped_vjp_bwd)




def block_layout(
    group_sizes: jax.Array, rows: int, block: int
) -> tuple[jax.Array, jax.Array, jax.Array, int]:
    """The block layout of `rows` sorted rows grouped by `group_sizes [E]`: expert e's rows
    start at a multiple of `block`. Returns `(padded_row [rows]` (rows past the groups:
    `bound`, out of range), `first [E]`: first block of each expert, `n_blocks [E]`
    = ceil(size_e / block), bound)` where `bound = block * ((rows + E (block - 1)) // block)`
    is the static size of the layout."""
    e = group_sizes.shape[0]
    counts = group_sizes.astype(jnp.int32)
    n_blocks = (counts + block - 1) // block
    first = jnp.cumsum(n_blocks) - n_blocks
    start = jnp.cumsum(counts) - counts
    expert = jnp.searchsorted(jnp.cumsum(counts), jnp.arange(rows), side="right")
    safe = jnp.minimum(expert, e - 1)
    bound = block * ((rows + e * (block - 1)) // block)
    padded = jnp.where(expert < e, first[safe] * block + jnp.arange(rows) - start[safe], bound)
    return padded.astype(jnp.int32), first.astype(jnp.int32), n_blocks.astype(jnp.int32), bound


def _blocks(xs, group_sizes, w_gate, w_up, w_down, block: int | None = None):
    rows = xs.shape[0]
    block = block or block_rows(rows, w_gate.shape[0])
    padded, first, n_blocks, bound = block_layout(group_sizes, rows, block)
    xp = jnp.zeros((bound, xs.shape[1]), xs.dtype).at[padded].set(xs, mode="drop")
    yp = grouped_swiglu(xp, first, n_blocks, w_gate, w_up, w_down, block)
    return yp.at[padded].get(mode="fill", fill_value=0)


# -------------------------------------------------------------------------- ragged_dot
def _ragged(xs, group_sizes, w_gate, w_up, w_down):
    f = w_gate.shape[-1]
    gs = group_sizes.astype(jnp.int32)
    gu = jax.lax.ragged_dot(xs, jnp.concatenate([w_gate, w_up], axis=-1), gs)
    return jax.lax.ragged_dot(_swiglu(gu, f).astype(xs.dtype), w_down, gs).astype(xs.dtype)


# ---------------------------------------------------------------------------- megablox
def _tile(n: int, pref: int = 128) -> int:
    """The largest of pref, pref/2, ... dividing n (megablox tiles must divide the dims)."""
    t = pref
    while t > 1 and n % t:
        t //= 2
    return t


def _megablox(xs, group_sizes, w_gate, w_up, w_down):
    from jax.experimental.pallas.ops.tpu.megablox import ops

    interpret = jax.default_backend() != "tpu"
    rows, d = xs.shape
    f = w_gate.shape[-1]
    xp, gs = pad_rows(xs, group_sizes, 128 if rows >= 128 else 8)
    m = xp.shape[0]

    def gmm(lhs, rhs):
        k, n = rhs.shape[1:]
        tiling = (min(128, m), _tile(k), _tile(n))
        return ops.gmm(lhs, rhs, gs, jnp.float32, tiling, None, None, False, interpret)

    gu = gmm(xp, jnp.concatenate([w_gate, w_up], axis=-1)).astype(xs.dtype)
    return gmm(_swiglu(gu, f), w_down)[:rows].astype(xs.dtype)


# -------------------------------------------------------------------------- pallas_gpu
_MGPU = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)


@jax.custom_vjp
def _mgpu_dot(lhs, rhs, group_sizes):
    """`lhs [m, k]` @ `rhs [E, k, n]` per group (Hopper Pallas), differentiable."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes, **_MGPU)


def _mgpu_fwd(lhs, rhs, group_sizes):
    return _mgpu_dot(lhs, rhs, group_sizes), (lhs, rhs, group_sizes)


def _mgpu_bwd(res, dy):
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

    lhs, rhs, group_sizes = res
    dy = dy.astype(lhs.dtype)
    dlhs = ragged_dot_mgpu.ragged_dot(dy, rhs, group_sizes=group_sizes, transpose_rhs=True,
                                      **_MGPU)
    drhs = transposed_ragged_dot_mgpu.transposed_ragged_dot(
        lhs, dy, group_sizes=group_sizes,
        **{k: v for k, v in _MGPU.items() if k != "grid_block_n"}, grid_block_n=1)
    return dlhs, drhs.astype(rhs.dtype), None


_mgpu_dot.defvjp(_mgpu_fwd, _mgpu_bwd)


def _pallas_gpu(xs, group_sizes, w_gate, w_up, w_down):
    rows = xs.shape[0]
    f = w_gate.shape[-1]
    xp, gs = pad_rows(xs, group_sizes, _MGPU["block_m"])
    gu = _mgpu_dot(xp, jnp.concatenate([w_gate, w_up], axis=-1), gs)
    return _mgpu_dot(_swiglu(gu, f).astype(xs.dtype), w_down, gs)[:rows].astype(xs.dtype)


_IMPLS = {"blocks": _blocks, "ragged_dot": _ragged, "megablox": _megablox,
          "pallas_gpu": _pallas_gpu}


def expert_swiglu(
    xs: jax.Array, group_sizes: jax.Array, w_gate: jax.Array, w_up: jax.Array,
    w_down: jax.Array, gemm: str,
) -> jax.Array:
    """Each row of `xs [rows, d]` (grouped by expert, `group_sizes [E]`) through its
    expert's SwiGLU with the `gemm` backend (one of `GEMMS`) -> `[rows, d]`; rows past
    `sum(group_sizes)` give 0."""
    if gemm not in _IMPLS:
        raise ValueError(f"moe_gemm={gemm!r} must be one of {GEMMS}")
    ys = _IMPLS[gemm](xs, group_sizes, w_gate, w_up, w_down)
    valid = jnp.arange(xs.shape[0]) < jnp.sum(group_sizes)
    return jnp.where(valid[:, None], ys, 0).astype(xs.dtype)


# ------------------------------------------------------------------------ sort / unsort
def sort_by_expert(idx: jax.Array, n_experts: int) -> tuple[jax.Array, jax.Array]:
    """The sorted layout of assignments `idx [tokens, k]` (token-major): `(order [A]`: the
    assignment at each sorted position, stable within an expert, `group_sizes [E]` int32)."""
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sizes = jnp.zeros((n_experts,), jnp.int32).at[flat].add(1)
    return order, sizes


def grouped_moe(
    x: jax.Array, idx: jax.Array, gates: jax.Array,
    w: tuple[jax.Array, jax.Array, jax.Array], gemm: str, block: int | None = None,
) -> jax.Array:
    """Dropless MoE by sort / gather / unsort: `x [n, d]`, chosen experts `idx [n, k]`,
    `gates [n, k]` -> `sum_k gates[:, k] * expert_{idx[:, k]}(x)` `[n, d]` (`block`: the
    block loop's rows per block, default `block_rows`)."""
    n, d = x.shape
    k, e = idx.shape[1], w[0].shape[0]
    order, sizes = sort_by_expert(idx, e)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(n * k, dtype=jnp.int32))
    if gemm == "blocks":  # straight into the block layout: one gather in, one out
        block = block or block_rows(n * k, e)
        padded_sorted, first, n_blocks, bound = block_layout(sizes, n * k, block)
        padded = padded_sorted[inverse]  # each assignment's row in the layout
        xp = jnp.zeros((bound, d), x.dtype).at[padded].set(jnp.repeat(x, k, axis=0))
        y = grouped_swiglu(xp, first, n_blocks, *w, block)[padded].reshape(n, k, d)
    else:
        ys = expert_swiglu(x[order // k], sizes, *w, gemm)
        y = ys[inverse].reshape(n, k, d)
    return jnp.einsum("nkd,nk->nd", y, gates.astype(y.dtype))


@functools.lru_cache(maxsize=4)
def pallas_gpu_problem(dtype: str) -> str | None:
    """Why the `pallas_gpu` kernels cannot run here (None: they can). They need an NVIDIA
    Hopper GPU (compute capability 9.x) and bf16/fp16 operands; on such a device a small
    grouped matmul (forward and both gradients) is run once and compared with
    `jax.lax.ragged_dot`, so a kernel that fails to build or disagrees is reported, not used."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return f"needs an NVIDIA Hopper GPU; this process runs on {dev.platform}"
    cc = str(getattr(dev, "compute_capability", "") or "?")
    if cc.split(".")[0] != "9":
        return f"needs an NVIDIA Hopper GPU (compute capability 9.x); this one is {cc}"
    if dtype not in ("bfloat16", "float16"):
        return f"runs bfloat16/float16, not dtype={dtype}"
    try:
        dt = jnp.dtype(dtype)
        keys = jax.random.split(jax.random.key(0), 3)
        lhs = jax.random.normal(keys[0], (384, 128), dt)
        rhs = jax.random.normal(keys[1], (3, 128, 256), dt) * 0.1
        dy = jax.random.normal(keys[2], (384, 256), dt)
        gs = jnp.asarray([100, 0, 284], jnp.int32)

        def grads(fn):
            out, vjp = jax.vjp(lambda a, b: fn(a, b, gs).astype(jnp.float32), lhs, rhs)
            return (out, *vjp(dy.astype(jnp.float32)))

        got = jax.jit(lambda: grads(_mgpu_dot))()
        want = jax.jit(lambda: grads(lambda a, b, g: jax.lax.ragged_dot(
            a, b, g, preferred_element_type=jnp.float32)))()
        for name, a, b in zip(("output", "lhs gradient", "rhs gradient"), got, want,
                              strict=True):
            err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
            scale = float(jnp.max(jnp.abs(b.astype(jnp.float32)))) + 1e-6
            if not err <= 2e-2 * scale:
                return f"its {name} differs from jax.lax.ragged_dot (max error {err:.3g})"
    except Exception as e:  # noqa: BLE001 (any build or run failure disqualifies the kernel)
        return f"the kernel failed here: {type(e).__name__}: {str(e).splitlines()[0]}"
    return None

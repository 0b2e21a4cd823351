"""DeepSeek-V3 MoE: routing by hand (bias, gates, groups), the loss-free bias update by hand
and its effect on a skewed router, dispatch == a per-token numpy loop (with and without
dropped assignments; capacity, dense and dropless dispatch with each grouped GEMM that runs
on a CPU: the block loop, ragged_dot, megablox in Pallas interpret mode), the sorted layout,
row padding and block layout by hand, the per-device choice of dispatch,
gradients equal across dispatches, expert parallelism (all-to-all over 8 fake devices) ==
one device, the sequence-wise aux loss against the V3 formula, and the per-layer bias
bookkeeping of the Transformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model import LOGICAL_RULES, ModelConfig, make_mesh, max_violation, moe_bias_paths, update_router_bias
from model import update_router_biases as update_all
from model.grouped_matmul import block_layout, block_rows, grouped_moe, pad_rows, sort_by_expert
from model.moe import MoE, choose_moe, select_experts, sequence_aux_loss
from model.sharding import batch_sharding, logical_to_sharding

# ---------------------------------------------------------------- routing by hand


def _sorted_pairs(idx, gates):
    """Per token, (expert, gate) pairs sorted by expert: order inside top-k is irrelevant."""
    idx, gates = np.asarray(idx), np.asarray(gates)
    return [sorted(zip(i.tolist(), g.tolist(), strict=True)) for i, g in zip(idx, gates, strict=True)]


def _assert_routes(idx, gates, expected):
    got = _sorted_pairs(idx, gates)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert [x for x, _ in g] == [x for x, _ in e]
        np.testing.assert_allclose([y for _, y in g], [y for _, y in e], rtol=1e-6)


def test_select_experts_bias_changes_choice_not_gates():
    s = jnp.asarray([[0.9, 0.8, 0.1, 0.2]])
    # No bias: {0, 1}, gates 0.9/1.7 and 0.8/1.7.
    idx, g = select_experts(s, jnp.zeros(4), 2)
    _assert_routes(idx, g, [[(0, 0.9 / 1.7), (1, 0.8 / 1.7)]])
    # Bias: choice scores 0.9, -0.2, 0.1, 1.0 -> {0, 3}; gates from the raw scores 0.9, 0.2.
    bias = jnp.asarray([0.0, -1.0, 0.0, 0.8])
    idx, g = select_experts(s, bias, 2, routed_scaling_factor=2.5)
    _assert_routes(idx, g, [[(0, 2.5 * 0.9 / 1.1), (3, 2.5 * 0.2 / 1.1)]])
    # Without renormalization the gates are the raw scores times the scaling factor.
    idx, g = select_experts(s, bias, 2, norm_topk_prob=False, routed_scaling_factor=2.5)
    _assert_routes(idx, g, [[(0, 2.25), (3, 0.5)]])


def test_select_experts_group_limited_by_hand():
    # 8 experts in 4 groups of 2:  g0 = (0.9, 0.0)  g1 = (0.55, 0.45)  g2 = (0.6, 0.2)  g3 = (0.1, 0.1)
    s = jnp.asarray([[0.9, 0.0, 0.55, 0.45, 0.6, 0.2, 0.1, 0.1]])
    zero = jnp.zeros(8)
    # Ungrouped top-2: experts 0 (0.9) and 4 (0.6).
    idx, g = select_experts(s, zero, 2)
    _assert_routes(idx, g, [[(0, 0.9 / 1.5), (4, 0.6 / 1.5)]])
    # V3 group score = sum of the group's top-2: 0.9, 1.0, 0.8, 0.2 -> groups {0, 1};
    # expert 4 is not eligible and 2 (0.55) takes its place.
    idx, g = select_experts(s, zero, 2, n_group=4, topk_group=2)
    _assert_routes(idx, g, [[(0, 0.9 / 1.45), (2, 0.55 / 1.45)]])
    # V2 group score = the group's max: 0.9, 0.55, 0.6, 0.1 -> groups {0, 2} -> experts {0, 4}.
    idx, g = select_experts(s, zero, 2, n_group=4, topk_group=2, group_score="max")
    _assert_routes(idx, g, [[(0, 0.9 / 1.5), (4, 0.6 / 1.5)]])
    # The bias enters the group score: +1.0 on expert 6 gives biased group scores 0.9, 1.0,
    # 0.8, 1.2 -> groups {1, 3}; the choice is 6 (1.1 biased) and 2 (0.55), so expert 0 with
    # the best raw score is excluded; the gates still come from the raw 0.1 and 0.55.
    bias = zero.at[6].set(1.0)
    idx, g = select_experts(s, bias, 2, n_group=4, topk_group=2)
    _assert_routes(idx, g, [[(2, 0.55 / 0.65), (6, 0.1 / 0.65)]])


def test_update_router_bias_and_max_violation_by_hand():
    bias = jnp.asarray([[0.0, 0.1, -0.2, 0.0], [0.3, 0.0, 0.0, 0.0]])
    load = jnp.asarray([[10.0, 2.0, 4.0, 4.0], [5.0, 5.0, 2.0, 8.0]])  # means 5 and 5
    new = update_router_bias(bias, load, 0.01)
    expect = [[-0.01, 0.11, -0.19, 0.01], [0.3, 0.0, 0.01, -0.01]]  # load == mean: no move
    np.testing.assert_allclose(np.asarray(new), expect, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(max_violation(load)), [(10 - 5) / 5, (8 - 5) / 5], rtol=1e-6)


# ---------------------------------------------------------------- a standalone MoE layer

D = 16


def _moe(cfg, fill, seed=0):
    layer = MoE(cfg)
    abstract = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((1, 4, cfg.d_model)))
    return layer, fill(abstract, seed)


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(tree))


def _swiglu(x, wg, wu, wd):
    g = x @ wg
    return (g / (1.0 + np.exp(-g)) * (x @ wu)) @ wd


def _np_route(cfg, params, bias, x):
    """Numpy routing of tokens x [n, d]: (scores [n, E], chosen experts [n, k] best first,
    gates [n, k])."""
    logits = x @ params["router"]["kernel"]
    if cfg.router_score == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(-1, keepdims=True))
        s = e / e.sum(-1, keepdims=True)
    choice = s + bias
    if cfg.n_group > 1:  # V3: group score = sum of its top-2 biased scores (V2/softmax: max)
        grouped = choice.reshape(len(x), cfg.n_group, -1)
        if cfg.router_score == "sigmoid":
            gscore = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
        else:
            gscore = grouped.max(-1)
        top_groups = np.argsort(-gscore, axis=-1)[:, : cfg.topk_group]
        eligible = np.zeros(gscore.shape, bool)
        np.put_along_axis(eligible, top_groups, True, axis=-1)
        eligible = np.repeat(eligible, cfg.n_routed_experts // cfg.n_group, axis=-1)
        assert not eligible.all()
        choice = np.where(eligible, choice, -np.inf)
    sel = np.argsort(-choice, axis=-1, kind="stable")[:, : cfg.top_k]
    gates = np.take_along_axis(s, sel, axis=-1)
    if cfg.norm_topk_prob:
        gates = gates / gates.sum(-1, keepdims=True)
    return s, sel, gates * cfg.routed_scaling_factor


def _np_moe(cfg, variables, x, capacity=None):
    """Per-token loop over the chosen experts (plus shared experts). With `capacity`,
    assignments are admitted in k-major order (every token's 1st choice, then every 2nd
    choice, ...) while the expert has room. Returns (y [n, d], load [E], dropped assignments)."""
    p = _np(variables["params"])
    bias = np.asarray(variables["router_bias"]["bias"], np.float64)
    n = x.shape[0]
    s, sel, gates = _np_route(cfg, p, bias, x)
    ex = p["experts"]
    used = np.zeros(cfg.n_routed_experts, int)
    keep = np.ones_like(sel, bool)
    if capacity is not None:
        for j in range(cfg.top_k):
            for i in range(n):
                e = sel[i, j]
                keep[i, j] = used[e] < capacity
                used[e] += keep[i, j]
    y = np.zeros_like(x)
    for i in range(n):
        for j in range(cfg.top_k):
            e = sel[i, j]
            if keep[i, j]:
                y[i] += gates[i, j] * _swiglu(x[i], ex["w_gate"][e], ex["w_up"][e], ex["w_down"][e])
        if cfg.n_shared_experts:
            sh = p["shared"]
            y[i] += _swiglu(x[i], sh["gate_proj"]["kernel"], sh["up_proj"]["kernel"],
                            sh["down_proj"]["kernel"])
    load = np.bincount(sel.ravel(), minlength=cfg.n_routed_experts)
    return y, load, int((~keep).sum()), s, sel


MOE = ModelConfig(vocab_size=64, d_model=D, n_layers=1, n_heads=2, n_routed_experts=4,
                  n_shared_experts=1, top_k=2, moe_ffn_dim=8, capacity_factor=2.0,
                  moe_dispatch="capacity")


@pytest.mark.parametrize(
    "cfg",
    [
        MOE.replace(routed_scaling_factor=2.5),
        MOE.replace(router_score="softmax", norm_topk_prob=False, n_shared_experts=0),
        MOE.replace(n_routed_experts=8, top_k=3, n_group=4, topk_group=2, capacity_factor=8 / 3),
    ],
    ids=["sigmoid_shared", "softmax", "sigmoid_grouped"],
)
@pytest.mark.parametrize("dispatch", ["capacity", "dropless", "dense", "dropless/ragged_dot",
                                      "dropless/megablox"])
def test_dispatch_equals_per_token_loop(cfg, dispatch, fill, jit):
    dispatch, _, gemm = dispatch.partition("/")
    cfg = cfg.replace(moe_dispatch=dispatch, moe_gemm=gemm or "auto")
    layer, variables = _moe(cfg, fill, seed=1)
    # A non-zero balancing bias, so that the choice differs from the plain top-k.
    bias = np.random.default_rng(2).normal(0, 0.3, cfg.n_routed_experts)
    variables = variables | {"router_bias": {"bias": jnp.asarray(bias, jnp.float32)}}
    x = np.random.default_rng(3).standard_normal((2, 8, D))
    y, aux = jit(layer.apply)(variables, jnp.asarray(x, jnp.float32))
    ref_y, ref_load, dropped, _, _ = _np_moe(cfg, variables, x.reshape(16, D))
    np.testing.assert_allclose(np.asarray(y).reshape(16, D), ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["load"]), ref_load)
    assert float(aux["dropped_frac"]) == 0.0 == dropped


def test_small_capacity_drops_in_k_major_order(fill, jit):
    cfg = MOE.replace(capacity_factor=1.0)  # capacity = ceil(1.0 * 16 * 2 / 4) = 8 = mean load
    layer, variables = _moe(cfg, fill, seed=4)
    x = np.random.default_rng(5).standard_normal((2, 8, D))
    y, aux = jit(layer.apply)(variables, jnp.asarray(x, jnp.float32))
    xf = x.reshape(16, D)
    ref_y, ref_load, dropped, _, _ = _np_moe(cfg, variables, xf, capacity=8)
    assert 0 < dropped < 16  # some, not all, assignments are dropped
    np.testing.assert_allclose(float(aux["dropped_frac"]), dropped / 32, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(aux["load"]), ref_load)  # load counts before drops
    np.testing.assert_allclose(np.asarray(y).reshape(16, D), ref_y, rtol=1e-5, atol=1e-5)
    # The reference without capacity differs: the dropped contributions are really missing.
    full_y, _, _, _, _ = _np_moe(cfg, variables, xf)
    assert np.max(np.abs(full_y - ref_y)) > 1e-3


def test_dropless_drops_nothing_where_capacity_drops(fill, jit):
    cfg = MOE.replace(capacity_factor=1.0, moe_dispatch="dropless")
    layer, variables = _moe(cfg, fill, seed=4)  # the routing of the test above: drops there
    x = np.random.default_rng(5).standard_normal((2, 8, D))
    y, aux = jit(layer.apply)(variables, jnp.asarray(x, jnp.float32))
    ref_y, _, _, _, _ = _np_moe(cfg, variables, x.reshape(16, D))
    assert float(aux["dropped_frac"]) == 0.0
    np.testing.assert_allclose(np.asarray(y).reshape(16, D), ref_y, rtol=1e-5, atol=1e-5)


def test_block_layout_by_hand():
    # 8 sorted rows, groups [3, 0, 1, 3] (the 8th row is padding); blocks of 2 rows: expert
    # 0 has 2 blocks, 1 none, 2 one, 3 two. Rows: e0 -> 0,1,2; e2 -> 4; e3 -> 6,7,8.
    padded, first, n_blocks, bound = block_layout(jnp.asarray([3, 0, 1, 3]), 8, 2)
    assert bound == 2 * ((8 + 4 * 1) // 2)  # the static bound: 12 rows
    np.testing.assert_array_equal(np.asarray(padded), [0, 1, 2, 4, 6, 7, 8, bound])
    np.testing.assert_array_equal(np.asarray(first), [0, 2, 2, 3])
    np.testing.assert_array_equal(np.asarray(n_blocks), [2, 0, 1, 2])


def test_sort_by_expert_and_padding_by_hand():
    """The inputs every grouped GEMM gets: assignments sorted by expert (stable, so a
    token's earlier choice first among equals), group sizes with empty experts, and the
    row padding that tiled kernels need (the padding joins the last group)."""
    idx = jnp.asarray([[3, 0], [2, 0], [3, 3]], jnp.int32)  # token-major: 3 0 2 0 3 3
    order, sizes = sort_by_expert(idx, 5)
    np.testing.assert_array_equal(np.asarray(order), [1, 3, 2, 0, 4, 5])
    np.testing.assert_array_equal(np.asarray(sizes), [2, 0, 1, 3, 0])
    xs, gs = pad_rows(jnp.ones((6, 2)), sizes, 4)
    assert xs.shape == (8, 2) and not np.any(np.asarray(xs[6:]))
    np.testing.assert_array_equal(np.asarray(gs), [2, 0, 1, 3, 2])


@pytest.mark.parametrize("platform, cfg, want", [
    ("cpu", {}, ("dropless", "blocks")),
    ("tpu", {}, ("dropless", "megablox")),
    ("gpu", {}, ("capacity", None)),  # no Hopper here: the kernels cannot run
    ("gpu", {"moe_dispatch": "dropless"}, ("dropless", "ragged_dot")),
    ("cpu", {"moe_gemm": "megablox"}, ("dropless", "megablox")),
    ("cpu", {"moe_dispatch": "capacity", "moe_gemm": "megablox"}, ("capacity", None)),
])
def test_choose_moe(platform, cfg, want):
    got = choose_moe(MOE.replace(**{"moe_dispatch": "auto", **cfg}), platform)
    assert (got.dispatch, got.gemm) == want
    assert got.describe().startswith("moe: " + want[0])


def test_requested_gemm_that_cannot_run_names_why():
    with pytest.raises(ValueError, match="moe_gemm='pallas_gpu' cannot run: needs an NVIDIA "
                                         "Hopper GPU; this process runs on cpu"):
        choose_moe(MOE.replace(moe_dispatch="auto", moe_gemm="pallas_gpu"), "cpu")
    with pytest.raises(ValueError, match="megablox.*not on gpu"):
        choose_moe(MOE.replace(moe_dispatch="dropless", moe_gemm="megablox"), "gpu")
    with pytest.raises(ValueError, match="moe_gemm='mgpu' must be one of"):
        MOE.replace(moe_gemm="mgpu")


@pytest.mark.parametrize("gemm, block", [("blocks", 4), ("blocks", 8), ("ragged_dot", None),
                                         ("megablox", None)])
def test_dropless_grouped_swiglu_equals_dense_on_skewed_loads(gemm, block, jit):
    """Loads from 0 to 40 rows per expert: blocks, 4-block chunks and their mix, empty
    experts; values and gradients of each grouped GEMM against every token through every
    expert."""
    n, k, e, d, f = 40, 2, 5, 6, 7
    rng = np.random.default_rng(11)
    first = np.where(np.arange(n) < 34, 0, rng.choice([2, 3, 4], n))  # expert 0: 34 rows
    second = (first + rng.choice([1, 2], n) - 2) % 3 + 2  # in {2, 3, 4}, != first
    idx = np.stack([first, second], axis=1)  # expert 1: no rows
    x, g = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((n, d), (n, d)))
    gates = jnp.asarray(rng.random((n, k)), jnp.float32)
    w = tuple(jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32)
              for s in ((e, d, f), (e, d, f), (e, f, d)))
    combine = jnp.sum(jax.nn.one_hot(idx, e) * gates[..., None], axis=1)  # [n, e]

    def dense(x, w):
        h = nn.silu(jnp.einsum("nd,edf->enf", x, w[0])) * jnp.einsum("nd,edf->enf", x, w[1])
        return jnp.sum(jnp.einsum("enf,efd,ne->nd", h, w[2], combine) * g)

    def dropless(x, w):
        return jnp.sum(grouped_moe(x, jnp.asarray(idx, jnp.int32), gates, w, gemm, block) * g)

    ref = jit(jax.value_and_grad(dense, argnums=(0, 1)))(x, w)
    got = jit(jax.value_and_grad(dropless, argnums=(0, 1)))(x, w)
    loads = np.bincount(idx.ravel(), minlength=e)
    assert loads[0] >= 4 * 8 and loads[1] == 0 and (idx[:, 0] != idx[:, 1]).all()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gemm", ["blocks", "ragged_dot", "megablox"])
@pytest.mark.parametrize("n", [1, 3])
def test_dropless_few_tokens_equals_dense(n, gemm, jit):
    """A layout shorter than one 4-block chunk (a decode step's few tokens: 16 and 24 rows
    here) runs single blocks; values and gradients against every token through every
    expert."""
    k, e, d, f = 2, 3, 6, 7
    rng = np.random.default_rng(12)
    idx = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(n)]), jnp.int32)
    x, g = (jnp.asarray(rng.standard_normal((n, d)), jnp.float32) for _ in range(2))
    gates = jnp.asarray(rng.random((n, k)), jnp.float32)
    w = tuple(jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32)
              for s in ((e, d, f), (e, d, f), (e, f, d)))
    combine = jnp.sum(jax.nn.one_hot(idx, e) * gates[..., None], axis=1)
    block = block_rows(n * k, e)
    assert block_layout(sort_by_expert(idx, e)[1], n * k, block)[3] < 4 * block

    def dense(x, w):
        h = nn.silu(jnp.einsum("nd,edf->enf", x, w[0])) * jnp.einsum("nd,edf->enf", x, w[1])
        return jnp.sum(jnp.einsum("enf,efd,ne->nd", h, w[2], combine) * g)

    def dropless(x, w):
        return jnp.sum(grouped_moe(x, idx, gates, w, gemm) * g)

    ref = jit(jax.value_and_grad(dense, argnums=(0, 1)))(x, w)
    got = jit(jax.value_and_grad(dropless, argnums=(0, 1)))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def _moe_loss(cfg, mesh=None):
    def loss(variables, x):
        y, _ = MoE(cfg, mesh=mesh).apply(variables, x)
        return jnp.sum(jnp.sin(y)), y

    return jax.value_and_grad(loss, has_aux=True)


def test_gradients_equal_across_dispatches(fill, jit):
    cfg = MOE.replace(n_routed_experts=8, top_k=3, capacity_factor=8 / 3)  # no drops
    _, variables = _moe(cfg, fill, seed=6)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 8, D)), jnp.float32)
    out = {m: jit(_moe_loss(cfg.replace(moe_dispatch=m)))(variables, x)
           for m in ("capacity", "dropless", "dense")}
    for m in ("dropless", "dense"):
        for a, b in zip(jax.tree.leaves(out[m]), jax.tree.leaves(out["capacity"]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mesh_shape, gemm", [({"expert": 8}, "blocks"),
                                              ({"data": 2, "expert": 4}, "blocks"),
                                              ({"data": 2, "expert": 4}, "ragged_dot")])
def test_expert_parallel_all_to_all_equals_one_device(mesh_shape, gemm, fill, jit):
    cfg = MOE.replace(n_routed_experts=8, top_k=3, moe_dispatch="dropless", moe_gemm=gemm)
    _, variables = _moe(cfg, fill, seed=8)
    bias = np.random.default_rng(9).normal(0, 0.3, 8)  # skewed loads across devices
    variables = variables | {"router_bias": {"bias": jnp.asarray(bias, jnp.float32)}}
    x = jnp.asarray(np.random.default_rng(10).standard_normal((8, 6, D)), jnp.float32)
    ref = jit(_moe_loss(cfg))(variables, x)
    mesh = make_mesh(mesh_shape)
    shardings = logical_to_sharding(nn.get_partition_spec(variables), mesh)
    params = jax.device_put(nn.unbox(variables), shardings)
    xs = jax.device_put(x, batch_sharding(mesh, 3))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        f = jit(_moe_loss(cfg, mesh))  # the mesh is passed: the expert-parallel path
        hlo = f.lower(params, xs).as_text()
        got = f(params, xs)
        no_mesh = jit(_moe_loss(cfg)).lower(params, xs).as_text()
    assert "all_to_all" in hlo and "all_to_all" not in no_mesh
    w = params["params"]["experts"]["w_gate"]
    assert w.addressable_shards[0].data.shape[0] == 8 // mesh.shape["expert"]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- sequence-wise aux loss


def _np_seq_aux(scores, sel, n_experts, k, mask):
    """DeepSeek-V3 Eqs. 17-20 (without alpha), averaged over sequences, by loops."""
    losses = []
    for b in range(scores.shape[0]):
        toks = [t for t in range(scores.shape[1]) if mask[b, t]]
        T = len(toks)
        f = np.zeros(n_experts)
        P = np.zeros(n_experts)
        for t in toks:
            for i in range(n_experts):
                f[i] += (i in sel[b, t]) * n_experts / (k * T)
                P[i] += scores[b, t, i] / scores[b, t].sum() / T
        losses.append(np.sum(f * P))
    return np.mean(losses)


def test_sequence_aux_loss_matches_v3_formula():
    rng = np.random.default_rng(6)
    e, k = 6, 2
    scores = 1.0 / (1.0 + np.exp(-rng.standard_normal((3, 7, e))))
    sel = np.argsort(-(scores + rng.normal(0, 0.3, e)), axis=-1)[..., :k]
    mask = np.ones((3, 7), bool)
    mask[1, 4:] = False
    mask[2, :2] = False
    for m in (None, mask):
        got = sequence_aux_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(sel), e, k,
                                None if m is None else jnp.asarray(m))
        ref = _np_seq_aux(scores, sel, e, k, np.ones((3, 7), bool) if m is None else m)
        np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    # Perfect balance with uniform scores gives the minimum 1 (f_i = 1, P_i = 1/E).
    uni = jnp.full((1, 6, e), 0.5)
    rr = jnp.asarray([[[0, 1], [2, 3], [4, 5], [0, 1], [2, 3], [4, 5]]])
    np.testing.assert_allclose(float(sequence_aux_loss(uni, rr, e, k, None)), 1.0, rtol=1e-6)


def test_moe_layer_aux_loss_and_load_skip_padding(fill, jit):
    cfg = MOE.replace(aux_loss_alpha=1e-2)
    layer, variables = _moe(cfg, fill, seed=7)
    x = np.random.default_rng(8).standard_normal((2, 8, D))
    seg = np.ones((2, 8), np.int32)
    seg[0, 5:] = 0  # padding
    seg[1, 3:] = 2  # a second document: still valid
    y, aux = jit(layer.apply)(variables, jnp.asarray(x, jnp.float32), jnp.asarray(seg))
    _, _, _, s, sel = _np_moe(cfg, variables, x.reshape(16, D))
    valid = seg.reshape(16) != 0
    np.testing.assert_array_equal(
        np.asarray(aux["load"]), np.bincount(sel[valid].ravel(), minlength=cfg.n_routed_experts)
    )
    ref = 1e-2 * _np_seq_aux(s.reshape(2, 8, -1), sel.reshape(2, 8, -1), 4, 2, seg != 0)
    np.testing.assert_allclose(float(aux["aux_loss"]), ref, rtol=1e-5)


# ---------------------------------------------------------------- loss-free balancing


def test_bias_updates_balance_a_skewed_router(fill, jit):
    cfg = MOE.replace(n_routed_experts=8, top_k=2, n_shared_experts=0, capacity_factor=4.0)
    layer, variables = _moe(cfg, fill, seed=9)
    # Tokens share a common direction u (x = N(0, I) + 2u); the router adds shift_i * (x . u)
    # to expert i's logit, so the high-numbered experts win most tokens.
    u = np.ones(D) / np.sqrt(D)
    shift = np.linspace(-1.0, 1.0, 8)
    kernel = np.asarray(variables["params"]["router"]["kernel"].value) + np.outer(u, shift)
    params = jax.tree.map(lambda a: a, variables["params"])
    params["router"]["kernel"] = params["router"]["kernel"].replace_boxed(jnp.asarray(kernel, jnp.float32))

    def tokens(key):
        return jax.random.normal(key, (8, 64, D)) + 2.0 * jnp.asarray(u, jnp.float32)

    def step(bias, key):
        _, aux = layer.apply({"params": params, "router_bias": {"bias": bias}}, tokens(key))
        return update_router_bias(bias, aux["load"], 1e-2), max_violation(aux["load"])

    run = jit(lambda bias, keys: jax.lax.scan(step, bias, keys))
    bias, vio = run(jnp.zeros(8), jax.random.split(jax.random.key(0), 200))
    vio = np.asarray(vio)
    assert np.mean(vio[:5]) > 1.5, vio[:5]  # fresh random tokens every step
    assert np.mean(vio[-20:]) < 0.3, vio[-20:]
    # The favoured experts were pushed down, the starved ones up.
    b = np.asarray(bias)
    assert b[7] < 0 < b[0]


# ---------------------------------------------------------------- Transformer bookkeeping

TINY_MOE = ModelConfig(vocab_size=64, d_model=D, n_layers=3, n_heads=2, ffn_dim=32, max_seq_len=16,
                       n_routed_experts=4, top_k=2, moe_ffn_dim=8, first_k_dense=1,
                       capacity_factor=2.0)


@pytest.mark.parametrize("scan", [False, True])
def test_update_router_biases_per_layer(scan, make_model):
    cfg = TINY_MOE.replace(scan_layers=scan)
    model, variables, fwd = make_model(cfg)
    rb = variables["router_bias"]
    paths = moe_bias_paths(cfg)
    if scan:
        assert paths == [("moe_stack", "moe", "bias")]
        assert rb["moe_stack"]["moe"]["bias"].shape == (2, 4)
    else:
        assert paths == [("layers_1", "moe", "bias"), ("layers_2", "moe", "bias")]
        assert set(rb) == {"layers_1", "layers_2"}  # the dense layer 0 has no router
    load = jnp.asarray([[8.0, 0.0, 4.0, 4.0], [1.0, 2.0, 3.0, 6.0]])  # means 4 and 3
    new = update_all(cfg, rb, load, rate=0.5)
    got = new["moe_stack"]["moe"]["bias"] if scan else jnp.stack(
        [new["layers_1"]["moe"]["bias"], new["layers_2"]["moe"]["bias"]])
    np.testing.assert_allclose(np.asarray(got), [[-0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, -0.5]])
    # The input collection is left as it was (pure function).
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(rb))
    # The default rate is cfg.bias_update_rate.
    default = jax.tree.leaves(update_all(cfg, rb, load))
    assert np.isclose(np.max(np.abs(np.concatenate([np.ravel(x) for x in default]))), 1e-3)


@pytest.mark.parametrize("scan", [False, True])
def test_moe_load_rows_follow_layer_order(scan, make_model):
    """A huge bias on expert 3 of the *second* MoE layer only sends every token there:
    row 1 of aux['moe_load'] must show it, row 0 must not, and the update must push that
    layer's expert 3 down."""
    cfg = TINY_MOE.replace(scan_layers=scan)
    model, variables, fwd = make_model(cfg)
    rb = jax.tree.map(lambda a: a, variables["router_bias"])
    if scan:
        rb["moe_stack"]["moe"]["bias"] = rb["moe_stack"]["moe"]["bias"].at[1, 3].set(100.0)
    else:
        rb["layers_2"]["moe"]["bias"] = rb["layers_2"]["moe"]["bias"].at[3].set(100.0)
    tokens = jnp.asarray(np.random.default_rng(10).integers(0, 64, (2, 8)), jnp.int32)
    _, aux = fwd(variables | {"router_bias": rb}, tokens)
    load = np.asarray(aux["moe_load"])
    assert load.shape == (2, 4)
    assert load.sum(axis=1).tolist() == [32.0, 32.0]  # 16 tokens x top-2 per layer
    assert load[1, 3] == 16 and load[0, 3] < 16
    new = update_all(cfg, rb, aux["moe_load"], rate=0.25)
    b = new["moe_stack"]["moe"]["bias"] if scan else jnp.stack(
        [new["layers_1"]["moe"]["bias"], new["layers_2"]["moe"]["bias"]])
    assert float(b[1, 3]) == 100.0 - 0.25


def test_transformer_moe_forward_reports_loads_and_drops(make_model):
    # A small capacity in a full model: moe_dropped reports a fraction per MoE layer.
    cfg = TINY_MOE.replace(capacity_factor=0.5, moe_dispatch="capacity")
    _, variables, fwd = make_model(cfg)
    tokens = jnp.asarray(np.random.default_rng(11).integers(0, 64, (2, 8)), jnp.int32)
    _, aux = fwd(variables, tokens)
    dropped = np.asarray(aux["moe_dropped"])
    assert dropped.shape == (2,)
    # capacity = ceil(0.5 * 16 * 2 / 4) = 4 per expert: at most 16 of 32 assignments kept.
    assert np.all(dropped >= 0.5 - 1e-6)

"""Attention: causality, packed segments, cached decode == full forward (MHA, GQA, MLA with
and without q_lora, scanned or not, per-row positions), the MLA latent cache size, max_logits
and a one-layer forward against a numpy reference, the blockwise "flash" backend == the
explicit one in the model (values, max logits, gradients), cuDNN refusing where it cannot
run, the parameter paths `attention_param_paths` gives QK-clip, and RoPE invariants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model import ModelConfig, Transformer, attention, attention_param_paths, init_cache
from model.layers import apply_rope

# Parameters come from the `make_model` fixture (conftest.py): random with gain 1.5, so attention is
# far from uniform and position/mask bugs show.
MHA = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=32)
GQA = MHA.replace(n_kv_heads=2)
MLA = MHA.replace(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8)
# capacity_factor = n_experts / top_k: capacity == tokens, no token can be dropped.
MLA_MOE = MLA.replace(q_lora_rank=12, n_routed_experts=4, n_shared_experts=1, top_k=2,
                      moe_ffn_dim=16, first_k_dense=1, capacity_factor=2.0)
CONFIGS = {"mha": MHA, "gqa": GQA, "mla": MLA, "mla_moe": MLA_MOE}


def _tokens(shape, seed=1, vocab=128):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


B, T = 3, 16
POS = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
ONE_SEGMENT = jnp.ones((B, T), jnp.int32)


def _full(fwd, variables, tokens):
    """Full forward of `[B, T]` tokens; positions and one segment passed explicitly so that
    every full forward of a config shares one compiled program."""
    return fwd(variables, tokens, POS, ONE_SEGMENT)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_causal(make_model, name):
    model, variables, fwd = make_model(CONFIGS[name])
    tokens = _tokens((B, T))
    changed = tokens.at[:, 9].set((tokens[:, 9] + 17) % 128)
    a, _ = _full(fwd, variables, tokens)
    b, _ = _full(fwd, variables, changed)
    np.testing.assert_allclose(np.asarray(a[:, :9]), np.asarray(b[:, :9]), rtol=0, atol=1e-6)
    # The change is visible from its own position on (so the test is not vacuous).
    assert np.min(np.max(np.abs(np.asarray(a[:, 9:] - b[:, 9:])), axis=-1)) > 1e-3


@pytest.mark.parametrize("name", ["gqa", "mla_moe"])
def test_packed_segments_equal_separate_documents(make_model, name):
    """Row 0 packs doc1 (5 tokens) and doc2 (11 tokens) with segment ids and restarting
    positions; rows 1 and 2 hold doc1 and doc2 alone (followed by filler, which causality
    keeps out of their logits), so everything runs in one compiled [3, 16] forward."""
    model, variables, fwd = make_model(CONFIGS[name])
    doc1, doc2, filler = _tokens((5,), seed=2), _tokens((11,), seed=3), _tokens((11,), seed=9)
    tokens = jnp.stack([
        jnp.concatenate([doc1, doc2]),
        jnp.concatenate([doc1, filler]),
        jnp.concatenate([doc2, filler[:5]]),
    ])
    seg = jnp.asarray([[1] * 5 + [2] * 11, [1] * 16, [1] * 16], jnp.int32)
    pos = jnp.asarray([list(range(5)) + list(range(11)), list(range(16)), list(range(16))], jnp.int32)
    logits, _ = fwd(variables, tokens, pos, seg)
    logits = np.asarray(logits)
    np.testing.assert_allclose(logits[0, :5], logits[1, :5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[0, 5:], logits[2, :11], rtol=1e-5, atol=1e-5)
    # With one segment for the whole row, document 2 would see document 1.
    mixed, _ = fwd(variables, tokens, pos, jnp.ones_like(seg))
    assert np.max(np.abs(np.asarray(mixed)[0, 5:] - logits[2, :11])) > 1e-3


@functools.cache
def _decode_fn(model, jit):
    def step(variables, tok, pos):
        (logits, _), upd = model.apply(variables, tok, pos, decode=True, mutable=["cache"])
        return logits, upd["cache"]

    return jit(step)


DECODE_CASES = {
    "mha": MHA,
    "mqa": MHA.replace(n_kv_heads=1),
    "gqa": GQA,
    "gqa_qknorm_bias_tied": GQA.replace(qk_norm=True, attn_bias=True, tie_embeddings=True),
    "mla_qlora": MLA.replace(q_lora_rank=12),
    "mla_moe": MLA_MOE.replace(q_lora_rank=0),
}


@pytest.mark.parametrize(
    "name, scan",
    [("mha", False), ("gqa", True), ("mqa", False), ("gqa_qknorm_bias_tied", False),
     ("mla_qlora", False), ("mla_moe", True)],
)
def test_cached_decode_equals_full_forward(make_model, jit, name, scan):
    """Prefill 8 tokens per row, then decode token by token; the rows sit at different
    positions (prompts of 5, 8 and 2 tokens). The prefill slots past a row's prompt hold
    other tokens: the decode mask must hide them until decoding overwrites them."""
    cfg = DECODE_CASES[name].replace(scan_layers=scan)
    model, variables, fwd = make_model(cfg)
    tokens = _tokens((B, T), seed=4)
    full, _ = _full(fwd, variables, tokens)
    full = np.asarray(full)
    prompts = np.asarray([5, 8, 2])
    pre = 8
    garbage = _tokens((B, pre), seed=11)
    prefill = jnp.where(jnp.arange(pre)[None, :] < prompts[:, None], tokens[:, :pre], garbage)
    step = _decode_fn(model, jit)
    cache = init_cache(model, variables, B)
    logits, cache = step(variables | {"cache": cache}, prefill, POS[:, :pre])
    for r in range(B):
        np.testing.assert_allclose(
            np.asarray(logits[r, : prompts[r]]), full[r, : prompts[r]], rtol=1e-5, atol=1e-5
        )
    rows = np.arange(B)
    for j in range(T - pre):
        p = prompts + j
        logits, cache = step(
            variables | {"cache": cache}, tokens[rows, p][:, None], jnp.asarray(p[:, None], jnp.int32)
        )
        np.testing.assert_allclose(
            np.asarray(logits[:, 0]), full[rows, p], rtol=1e-5, atol=1e-5, err_msg=f"positions {p}"
        )


@pytest.mark.parametrize("scan", [False, True])
def test_mla_cache_holds_only_latent_and_rope_key(make_model, scan):
    cfg = MLA_MOE.replace(scan_layers=scan)
    model, variables, _ = make_model(cfg)
    b, s, r, rope = 3, cfg.max_seq_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    cache = init_cache(model, variables, b)
    leaves = jax.tree_util.tree_leaves_with_path(cache)
    assert len(leaves) == (2 * 2 if scan else 2 * cfg.n_layers)  # (dense, moe) stacks or layers
    for path, leaf in leaves:
        name = path[-1].key
        assert name in ("c_kv", "k_rope"), path
        lead = leaf.shape[:1] if scan else ()
        assert leaf.shape == lead + (b, s, r if name == "c_kv" else rope), (path, leaf.shape)
    total = sum(leaf.size for _, leaf in leaves)
    assert total == cfg.n_layers * b * s * (16 + 4)
    assert cfg.cache_values_per_token == 16 + 4


# ---------------------------------------------------------------- numpy reference forward


def _np_rope(x, pos, theta=10000.0):
    """Rotate-half RoPE on x [t, heads, dim] at integer positions pos [t], float64."""
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    ang = pos[:, None].astype(np.float64) * inv  # [t, d/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _np_rms(x, g, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def _np_silu(x):
    return x / (1.0 + np.exp(-x))


def _np_softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def _np_one_layer_mha(cfg, params, tokens):
    """Independent float64 forward of a 1-layer dense MHA/GQA Transformer; returns
    (logits [b, t, vocab], max scaled logit per head [heads])."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params))
    b, t = tokens.shape
    d, h, kvh, hd = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.attn_head_dim
    lay = p["layers_0"]
    x = p["embed"]["embedding"][np.asarray(tokens)] * np.sqrt(d)
    out_logits, maxes = [], np.full(h, -np.inf)
    causal = np.tril(np.ones((t, t), bool))
    for r in range(b):
        xr = x[r]
        hn = _np_rms(xr, lay["attn_norm"]["scale"], cfg.norm_eps)
        q = (hn @ lay["attn"]["q_proj"]["kernel"]).reshape(t, h, hd)
        k = (hn @ lay["attn"]["k_proj"]["kernel"]).reshape(t, kvh, hd)
        v = (hn @ lay["attn"]["v_proj"]["kernel"]).reshape(t, kvh, hd)
        pos = np.arange(t)
        q, k = _np_rope(q, pos), _np_rope(k, pos)
        o = np.zeros((t, h, hd))
        for head in range(h):
            kv = head // (h // kvh)  # heads 0..g-1 share kv head 0, ...
            s = q[:, head] @ k[:, kv].T / np.sqrt(hd)
            maxes[head] = max(maxes[head], np.max(s[causal]))
            s = np.where(causal, s, -np.inf)
            o[:, head] = _np_softmax(s) @ v[:, kv]
        xr = xr + o.reshape(t, h * hd) @ lay["attn"]["o_proj"]["kernel"]
        hn = _np_rms(xr, lay["ffn_norm"]["scale"], cfg.norm_eps)
        mlp = lay["mlp"]
        f = _np_silu(hn @ mlp["gate_proj"]["kernel"]) * (hn @ mlp["up_proj"]["kernel"])
        xr = xr + f @ mlp["down_proj"]["kernel"]
        xr = _np_rms(xr, p["final_norm"]["scale"], cfg.norm_eps)
        out_logits.append(xr @ p["lm_head"]["kernel"])
    return np.stack(out_logits), maxes


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_one_layer_forward_and_max_logits_match_numpy(make_model, n_kv_heads):
    cfg = MHA.replace(n_layers=1, n_kv_heads=n_kv_heads)
    model, variables, fwd = make_model(cfg, seed=3)
    tokens = _tokens((2, 10), seed=6)
    logits, aux = fwd(variables, tokens)
    ref_logits, ref_max = _np_one_layer_mha(cfg, variables["params"], tokens)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-4, atol=1e-4)
    assert aux["max_logits"].shape == (1, cfg.n_heads)
    np.testing.assert_allclose(np.asarray(aux["max_logits"][0]), ref_max, rtol=1e-5, atol=1e-5)
    # Distinct heads have distinct maxima (a head mix-up would be caught).
    assert len(np.unique(np.round(ref_max, 4))) == cfg.n_heads


def test_mla_max_logits_match_numpy(make_model):
    cfg = MLA.replace(n_layers=1)
    model, variables, fwd = make_model(cfg, seed=4)
    tokens = _tokens((2, 9), seed=7)
    _, aux = fwd(variables, tokens)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(variables["params"]))
    at = p["layers_0"]["attn"]
    h, nope, rope, r = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    x = p["embed"]["embedding"][np.asarray(tokens)] * np.sqrt(cfg.d_model)
    t = tokens.shape[1]
    causal = np.tril(np.ones((t, t), bool))
    maxes = np.full(h, -np.inf)
    for row in range(tokens.shape[0]):
        hn = _np_rms(x[row], p["layers_0"]["attn_norm"]["scale"], cfg.norm_eps)
        q = (hn @ at["q_proj"]["kernel"]).reshape(t, h, nope + rope)
        ckv = hn @ at["kv_a_proj"]["kernel"]
        c = _np_rms(ckv[:, :r], at["kv_a_norm"]["scale"], cfg.norm_eps)
        k_rope = _np_rope(ckv[:, None, r:], np.arange(t))[:, 0]
        q_rope = _np_rope(q[..., nope:], np.arange(t))
        k_nope = (c @ at["kv_b_proj"]["kernel"]).reshape(t, h, nope + cfg.v_head_dim)[..., :nope]
        for head in range(h):
            s = (q[:, head, :nope] @ k_nope[:, head].T + q_rope[:, head] @ k_rope.T) / np.sqrt(nope + rope)
            maxes[head] = max(maxes[head], np.max(s[causal]))
    np.testing.assert_allclose(np.asarray(aux["max_logits"][0]), maxes, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mha", "gqa", "mla", "mla_moe"])
def test_flash_backend_equals_explicit_in_the_model(make_model, jit, monkeypatch, name):
    """attn_impl="flash" (blockwise, here 4 blocks of 4 tokens) gives the explicit path's
    logits, exact max logits and gradients, with packed segments; MLA with v_head_dim !=
    the q/k head size."""
    monkeypatch.setattr(attention, "default_block", lambda: 4)
    cfg = CONFIGS[name].replace(attn_impl="explicit")
    if name == "mla":
        cfg = cfg.replace(v_head_dim=6)
    model, variables, _ = make_model(cfg)
    flash = type(model)(cfg.replace(attn_impl="flash"))
    tokens = _tokens((B, T))
    seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 7 + [3] * 3], B, axis=0), jnp.int32)

    def loss(m):
        def f(v):
            logits, aux = m.apply(v, tokens, POS, seg)
            return jnp.sum(jnp.sin(logits)), (logits, aux["max_logits"])
        return jit(jax.value_and_grad(f, has_aux=True))(variables)

    (_, (ref, ref_max)), ref_g = loss(model)
    (_, (got, got_max)), got_g = loss(flash)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_max), np.asarray(ref_max), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=2e-4)


def test_cudnn_backend_refuses_to_run_on_cpu(make_model):
    """A requested cuDNN backend that cannot run raises, naming why; no silent fallback."""
    model, variables, _ = make_model(GQA)
    fused = type(model)(GQA.replace(attn_impl="dot_product"))
    with pytest.raises(ValueError, match="attn_impl='dot_product' cannot run this case: "
                                         "cuDNN flash attention needs an NVIDIA GPU"):
        fused.apply(variables, _tokens((B, T)))


@pytest.mark.parametrize("cfg", [
    GQA.replace(attn_bias=True), MLA, MLA_MOE, MLA_MOE.replace(scan_layers=True),
    GQA.replace(n_routed_experts=4, top_k=2, moe_ffn_dim=16, scan_layers=True),
], ids=["gqa_bias", "mla", "mla_moe", "mla_moe_scan", "gqa_moe_scan"])
def test_attention_param_paths_name_the_kernels(cfg):
    """Every path names a parameter of the built model with the documented head layout, and
    the entries own the rows of `max_logits [layers, heads]` in order, each row once."""
    variables = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    params = nn.unbox(variables["params"])
    entries = attention_param_paths(cfg)
    assert [r for a in entries for r in range(a.rows.start, a.rows.stop)] == list(range(cfg.n_layers))
    for a in entries:
        lead = (a.rows.stop - a.rows.start,) if a.stacked else ()
        assert a.stacked == cfg.scan_layers and a.q_kernel[0] == a.k_kernel[0] == a.block
        leaf = lambda path: functools.reduce(lambda node, key: node[key], path, params).shape  # noqa: E731
        h = a.num_heads
        if a.kind == "mla":
            nope, rope, v = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
            assert leaf(a.q_kernel) == lead + (cfg.q_lora_rank or cfg.d_model, h * (nope + rope))
            assert leaf(a.k_kernel) == lead + (cfg.kv_lora_rank, h * (nope + v))
            assert a.q_bias is a.k_bias is None
        else:
            assert leaf(a.q_kernel) == lead + (cfg.d_model, h * a.head_dim)
            assert leaf(a.k_kernel) == lead + (cfg.d_model, a.num_kv_heads * a.head_dim)
            if cfg.attn_bias:
                assert leaf(a.q_bias) == lead + (h * a.head_dim,)
                assert leaf(a.k_bias) == lead + (a.num_kv_heads * a.head_dim,)
            else:
                assert a.q_bias is a.k_bias is None


# ---------------------------------------------------------------- RoPE


def test_rope_hand_value():
    # dim 4: frequencies (1, theta^-1/2) = (1, 0.01); rotate-half pairs (x0, x2) and (x1, x3).
    x = jnp.asarray([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    out = np.asarray(apply_rope(x, jnp.asarray([[2]]), 10000.0)).ravel()
    a0, a1 = 2.0, 0.02
    expect = [
        1 * np.cos(a0) - 3 * np.sin(a0),
        2 * np.cos(a1) - 4 * np.sin(a1),
        3 * np.cos(a0) + 1 * np.sin(a0),
        4 * np.cos(a1) + 2 * np.sin(a1),
    ]
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(apply_rope(x, jnp.asarray([[0]]), 1e4)), np.asarray(x))


def test_rope_preserves_norm_and_is_relative():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 3, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 3, 16)), jnp.float32)
    pos = lambda p: jnp.asarray([[p]], jnp.int32)
    for p in (0, 1, 7, 100):
        np.testing.assert_allclose(
            np.linalg.norm(np.asarray(apply_rope(q, pos(p), 1e4)), axis=-1),
            np.linalg.norm(np.asarray(q), axis=-1), rtol=1e-5,
        )

    def dot(m, n):
        return np.sum(np.asarray(apply_rope(q, pos(m), 1e4) * apply_rope(k, pos(n), 1e4)), axis=-1)

    base = dot(5, 2)
    for shift in (1, 13, 40):
        np.testing.assert_allclose(dot(5 + shift, 2 + shift), base, rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(dot(6, 2) - base)) > 1e-2  # a different offset gives a different dot

"""Attention backends: blockwise "flash" attention and the max-logit side pass equal the
explicit reference (outputs, exact per-head max logits, gradients) for MHA, GQA/MQA and MLA
head shapes, packed segments, every number of blocks 1..7 and lengths that are not a
multiple of the block; its compiled memory grows linearly with the length (explicit:
quadratically); `choose_backend` picks and refuses as documented; the cuDNN branch's
plumbing (head padding, side pass) equals the reference with XLA standing in for cuDNN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, attention
from model.attention import Backend, attend, choose_backend
from model.flash_attention import flash_attention, max_logits

EXPLICIT = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, ffn_dim=64,
                       max_seq_len=64, attn_impl="explicit")


def _inputs(b, t, kv, g, dq, dv, segments, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, t, kv, g, dq)) * 1.5, dtype)
    k = jnp.asarray(rng.normal(size=(b, t, kv, dq)) * 1.5, dtype)
    v = jnp.asarray(rng.normal(size=(b, t, kv, dv)), dtype)
    seg = None
    if segments:  # several documents per row, boundaries at random places
        seg = jnp.asarray(np.cumsum(rng.random((b, t)) < 0.15, axis=1), jnp.int32)
    return q, k, v, seg


def _reference(q, k, v, seg, scale):
    return attend(EXPLICIT, q, k, v, seg, scale)


def _loss(fn, w):
    """A scalar of the output whose gradient touches every output element differently."""
    return lambda q, k, v: jnp.sum(fn(q, k, v)[0].astype(jnp.float32) * w)


CASES = [
    # b, t, kv_heads, group, d_qk, d_v, block, segments
    (2, 16, 4, 1, 8, 8, 16, False),  # MHA, one block
    (2, 37, 2, 3, 8, 8, 8, True),  # GQA, 5 blocks, ragged last block
    (1, 42, 1, 4, 16, 16, 7, True),  # MQA, 6 blocks
    (2, 24, 4, 1, 12, 6, 8, True),  # MLA shapes (d_qk != d_v), 3 blocks
    (2, 49, 2, 2, 4, 8, 7, False),  # 7 blocks
    (3, 16, 2, 1, 8, 8, 4, True),  # 4 blocks (the middle diagonal alone)
    (1, 13, 1, 1, 4, 4, 6, True),  # 3 blocks, ragged
    (2, 9, 1, 2, 4, 4, 4, False),  # 3 blocks, ragged
]


@pytest.mark.parametrize("case", CASES, ids=[f"t{c[1]}_kv{c[2]}g{c[3]}_blk{c[6]}" for c in CASES])
def test_flash_equals_explicit(case):
    b, t, kv, g, dq, dv, block, segments = case
    q, k, v, seg = _inputs(b, t, kv, g, dq, dv, segments)
    scale = dq ** -0.5
    out, ml = jax.jit(lambda q, k, v: flash_attention(q, k, v, seg, scale, block=block))(q, k, v)
    ref, ref_ml = _reference(q, k, v, seg, scale)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ml.reshape(-1), ref_ml, rtol=1e-6, atol=1e-6)
    side = jax.jit(lambda q, k: max_logits(q, k, seg, scale, block=block))(q, k)
    np.testing.assert_allclose(side.reshape(-1), ref_ml, rtol=1e-6, atol=1e-6)

    w = jnp.asarray(np.random.default_rng(1).normal(size=ref.shape), jnp.float32)
    got = jax.jit(jax.grad(_loss(
        lambda q, k, v: flash_attention(q, k, v, seg, scale, block=block), w), (0, 1, 2)))(q, k, v)
    want = jax.grad(_loss(lambda q, k, v: _reference(q, k, v, seg, scale), w), (0, 1, 2))(q, k, v)
    for a, r in zip(got, want, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_flash_bfloat16_close_to_float32():
    """bf16 inputs: the float32 online softmax keeps the result within bf16 rounding of the
    float32 reference; the max logit is the exact max of the bf16 products."""
    q, k, v, seg = _inputs(2, 40, 2, 2, 16, 16, True, dtype=jnp.bfloat16)
    out, ml = flash_attention(q, k, v, seg, 0.25, block=8)
    ref, ref_ml = _reference(q, k, v, seg, 0.25)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                               atol=3e-2)
    np.testing.assert_allclose(ml.reshape(-1), ref_ml, rtol=1e-6)


def test_max_logit_gets_no_gradient():
    q, k, v, seg = _inputs(1, 12, 1, 2, 4, 4, False)
    grads = jax.grad(lambda q: jnp.sum(flash_attention(q, k, v, seg, 0.5, block=4)[1]))(q)
    assert not np.any(np.asarray(grads))


def _temp_bytes(fn, t):
    shapes = [(2, t, 2, 2, 16), (2, t, 2, 16), (2, t, 2, 16)]
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)[0]), (0, 1, 2)))
    return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_flash_memory_grows_linearly():
    """Compiled forward + backward temporaries: x4 length -> at most ~x5 for flash (the
    block is fixed), ~x16 for the explicit path's [T, T] scores."""
    flash = functools.partial(flash_attention, segment_ids=None, scale=0.25, block=128)
    explicit = lambda q, k, v: _reference(q, k, v, None, 0.25)  # noqa: E731
    f1, f4 = _temp_bytes(flash, 1024), _temp_bytes(flash, 4096)
    e1, e4 = _temp_bytes(explicit, 1024), _temp_bytes(explicit, 4096)
    assert f4 <= 5 * f1, (f1, f4)
    assert e4 >= 12 * e1, (e1, e4)
    assert f4 < e4 / 4


# ------------------------------------------------------------------------ choose_backend


def test_auto_picks_explicit_for_short_and_flash_for_long_sequences_off_gpu():
    cfg = EXPLICIT.replace(attn_impl="auto")
    short = choose_backend(cfg, attention.EXPLICIT_MAX_LEN, "cpu")
    long = choose_backend(cfg, attention.EXPLICIT_MAX_LEN + 1, "cpu")
    assert (short.name, long.name) == ("explicit", "flash")
    assert short.max_logits and long.max_logits
    assert "auto" in long.describe() and "exact per-head max logits" in long.describe()
    # A GPU run in float32: cuDNN cannot run it, so auto says why it took flash.
    assert choose_backend(cfg, 4096, "gpu").name == "flash"


def test_requested_backends():
    for impl in ("explicit", "flash"):
        assert choose_backend(EXPLICIT.replace(attn_impl=impl), 8192, "cpu") == Backend(
            impl, True, "requested")


@pytest.mark.parametrize("impl", ["cudnn", "dot_product"])
def test_cudnn_requested_where_it_cannot_run_names_the_case(impl):
    cfg = EXPLICIT.replace(attn_impl=impl, dtype="bfloat16")
    with pytest.raises(ValueError, match=f"attn_impl='{impl}' cannot run.*NVIDIA GPU.*cpu"):
        choose_backend(cfg, 128, "cpu")
    with pytest.raises(ValueError, match="bfloat16/float16, not dtype=float32"):
        choose_backend(cfg.replace(dtype="float32"), 128, "gpu")


def test_config_rejects_unknown_backend():
    with pytest.raises(ValueError, match="attn_impl='splash' must be one of"):
        EXPLICIT.replace(attn_impl="splash")
    with pytest.raises(ValueError, match="attn_max_logits"):
        EXPLICIT.replace(attn_max_logits="yes")


@pytest.mark.parametrize("want_max", [True, None])
@pytest.mark.parametrize("shape", [(2, 20, 2, 2, 8, 8), (2, 20, 3, 1, 12, 6)], ids=["gqa", "mla"])
def test_cudnn_branch_plumbing(monkeypatch, shape, want_max):
    """The cuDNN branch (heads flattened, q/k/v zero-padded to one head size, v's padding
    dropped, the max logit from the side pass or NaN), with XLA's attention standing in for
    cuDNN (which needs a GPU), equals the explicit path."""
    cfg = EXPLICIT.replace(attn_impl="cudnn", attn_max_logits=want_max)
    q, k, v, seg = _inputs(*shape, True)
    ref, ref_ml = _reference(q, k, v, seg, 0.3)
    monkeypatch.setattr(attention, "choose_backend",
                        lambda c, t: Backend("cudnn", c.attn_max_logits is True, "test"))
    monkeypatch.setattr(attention, "cudnn_attention", lambda q, k, v, seg, scale: (
        jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="xla",
            mask=None if seg is None else (seg[:, :, None] == seg[:, None, :])[:, None])))
    out, ml = attend(cfg, q, k, v, seg, 0.3)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    if want_max:
        np.testing.assert_allclose(ml, ref_ml, rtol=1e-6)
    else:
        assert np.all(np.isnan(np.asarray(ml)))

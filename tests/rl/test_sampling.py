"""rl.sampling: greedy == argmax over the full (non-cached) forward recomputed each step,
sampler log-probs == the training forward's (MHA and MLA+MoE; layers scanned, the default,
and unrolled), scanned sampling == unrolled (stacked LoRA adapters and router biases),
top-k / top-p never emit an excluded token, the while loop stops as soon as every row has
stopped, expert-parallel MoE sampling (a model given a mesh) == single-program sampling,
generate_text."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P_

from model import LOGICAL_RULES, ModelConfig, Transformer, make_mesh
from model.transformer import stack_layers
from rl.generate import generate_text
from rl.sampling import completion_logp, filter_logits, sample, sample_token
from train.data import ByteTokenizer

EOS = 256
MHA = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, ffn_dim=64, max_seq_len=24)
# capacity_factor = n_experts / top_k: capacity == tokens, no token can be dropped.
MLA_MOE = MHA.replace(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                      v_head_dim=8, q_lora_rank=12, n_routed_experts=4, n_shared_experts=1,
                      top_k=2, moe_ffn_dim=16, first_k_dense=1, capacity_factor=2.0)
CONFIGS = {"mha": MHA, "mla_moe": MLA_MOE}

B, P, N = 3, 8, 8
LENS = np.array([5, 8, 2], np.int32)


def _prompts(seed=3):
    """Right-padded prompts; the pad slots hold random tokens (not EOS), which the decode
    mask must hide."""
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (B, P)), jnp.int32)


@functools.cache
def _sampler(model, jit, n=N, **static):
    """Jitted sampler with the stop tokens as a traced argument (one compile per config;
    always pass B stop ids, see `_stop`)."""
    def run(variables, prompts, lens, key, eos):
        return sample(model, variables, prompts, lens, key, max_new_tokens=n, eos_id=eos, **static)
    return jit(run)


def _stop(*ids):
    """B stop ids (repeating the last), so that every call has the same shapes."""
    ids = list(ids) + [ids[-1]] * (B - len(ids))
    return jnp.asarray(ids, jnp.int32)


@functools.cache
def _full_forward(model, jit):
    return jit(lambda v, t: model.apply(v, t)[0])


def _greedy_reference(model, variables, fwd, prompts, lens, n, stop=()):
    """Argmax decoding with the full forward of the whole sequence recomputed every step."""
    seqs = [list(np.asarray(prompts[b, : lens[b]])) for b in range(len(lens))]
    done = [False] * len(lens)
    out = np.full((len(lens), n), -1)
    logps = np.zeros((len(lens), n))
    for j in range(n):
        width = model.cfg.max_seq_len  # one compiled forward per model
        buf = np.zeros((len(lens), width), np.int32)
        for b, s in enumerate(seqs):
            buf[b, : len(s)] = s
        logp_all = np.asarray(jax.nn.log_softmax(fwd(variables, jnp.asarray(buf)), axis=-1))
        for b, s in enumerate(seqs):
            if done[b]:
                continue
            t = int(np.argmax(logp_all[b, len(s) - 1]))
            out[b, j], logps[b, j] = t, logp_all[b, len(s) - 1, t]
            s.append(t)
            done[b] = t in stop
    return out, logps


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("name", ["mha", "mla_moe"])
def test_greedy_equals_full_forward_argmax(tiny, jit, name, scan):
    model, variables = tiny(CONFIGS[name])
    prompts = _prompts()
    out = _sampler(model, jit, greedy=True, scan_layers=scan)(
        variables, prompts, LENS, jax.random.key(0), _stop(-1))
    ref, ref_logp = _greedy_reference(model, variables, _full_forward(model, jit), prompts, LENS, N)
    np.testing.assert_array_equal(np.asarray(out["completion"]), ref)
    np.testing.assert_array_equal(np.asarray(out["completion_mask"]), 1)
    np.testing.assert_allclose(np.asarray(out["logp_model"]), ref_logp, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["logp"]), 0.0)
    assert int(out["n_steps"]) == N - 1
    # `tokens`: each row's prompt then its completion, contiguous.
    toks = np.asarray(out["tokens"])
    for b in range(B):
        np.testing.assert_array_equal(toks[b, : LENS[b]], np.asarray(prompts[b, : LENS[b]]))
        np.testing.assert_array_equal(toks[b, LENS[b]: LENS[b] + N], ref[b])


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("name", ["mha", "mla_moe"])
def test_sampler_logp_equals_training_forward(tiny, jit, name, scan):
    """Temperature-1 sampling: the sampler's log-probs (cached decode) == the full-sequence
    forward's log-probs of the same completion (1e-5, float32), with rows of different
    lengths (row 0 stops early at a token it samples; the key schedule does not depend on
    the stop tokens, so a second run reproduces the first up to the stop)."""
    model, variables = tiny(CONFIGS[name])
    prompts, key = _prompts(seed=5), jax.random.key(1)
    run = _sampler(model, jit, scan_layers=scan)
    first = run(variables, prompts, LENS, key, _stop(-1))
    out = run(variables, prompts, LENS, key, _stop(int(first["completion"][0, 3])))
    mask = np.asarray(out["completion_mask"])
    assert 1 <= mask[0].sum() <= 4 and mask.sum() > mask[0].sum() + N
    ref = jit(completion_logp, static_argnums=(0, 4))(model, variables, out["tokens"],
                                                      jnp.asarray(LENS), N)
    np.testing.assert_allclose(np.asarray(out["logp_model"]) * mask, np.asarray(ref) * mask,
                               atol=1e-5, rtol=1e-5)
    # No temperature / filtering: the sampling distribution is the model's.
    np.testing.assert_array_equal(np.asarray(out["logp"]), np.asarray(out["logp_model"]))
    assert np.all(np.asarray(out["logp"])[mask == 1] < 0)
    # Many distinct tokens were drawn (it samples, it does not collapse to argmax).
    assert len(np.unique(np.asarray(out["completion"]))) > N


@pytest.mark.parametrize("name", ["gqa_lora", "mla_moe"])
def test_scanned_sampling_equals_unrolled(tiny, jit, name):
    """A per-layer model sampled with scanned layers (the default: its twin with
    `scan_layers=True` on `stack_layers` of its variables), unrolled (`scan_layers=False`),
    and a natively scanned model given the stacked variables draw the same tokens with the
    same log-probs; `stack_layers` gives exactly the scanned model's variable layout (LoRA
    adapters and MoE router biases, here nonzero, included)."""
    cfg = {"gqa_lora": MHA.replace(n_kv_heads=2, lora_rank=4), "mla_moe": MLA_MOE}[name]
    model, variables = tiny(cfg)
    rng = np.random.default_rng(2)
    variables = {**variables, **({"router_bias": jax.tree.map(
        lambda b: jnp.asarray(0.3 * rng.standard_normal(b.shape), b.dtype),
        variables["router_bias"])} if "router_bias" in variables else {})}
    scanned = Transformer(cfg.replace(scan_layers=True))
    stacked = stack_layers(cfg, variables)
    abstract = jax.eval_shape(scanned.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert (jax.tree.map(lambda x: (x.shape, x.dtype), stacked)
            == jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(abstract)))
    if cfg.lora_rank:
        assert "lora_b" in stacked["params"]["dense_stack"]["attn"]["q_proj"]
    prompts, key, stop = _prompts(seed=9), jax.random.key(4), _stop(-1)
    outs = [_sampler(model, jit, scan_layers=True)(variables, prompts, LENS, key, stop),
            _sampler(model, jit, scan_layers=False)(variables, prompts, LENS, key, stop),
            _sampler(scanned, jit)(stacked, prompts, LENS, key, stop)]
    for out in outs[1:]:
        np.testing.assert_array_equal(np.asarray(out["completion"]),
                                      np.asarray(outs[0]["completion"]))
        np.testing.assert_allclose(np.asarray(out["logp_model"]),
                                   np.asarray(outs[0]["logp_model"]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="scan_layers=False"):
        sample(scanned, stacked, prompts, jnp.asarray(LENS), key, max_new_tokens=N,
               scan_layers=False)


def test_expert_parallel_sampling_equals_single_program(tiny, jit):
    """A model given a mesh (`model.clone(mesh=mesh)`, i.e. `Transformer(cfg, mesh=mesh)`)
    runs the dropless MoE expert-parallel (`all_to_all` in `shard_map`) in the prefill and
    in every decode step (4 rows: the expert axis divides every forward's tokens), and
    samples what the model without a mesh samples."""
    model, variables = tiny(MLA_MOE.replace(moe_dispatch="dropless"))
    mesh = make_mesh({"expert": 2}, jax.devices()[:2])
    prompts = jnp.concatenate([_prompts(), _prompts(seed=7)[:1]])
    lens = jnp.asarray([5, 8, 2, 6], jnp.int32)

    def run(m):
        return jit(lambda v, p, n: sample(m, v, p, n, jax.random.key(0), max_new_tokens=N,
                                          greedy=True))

    ref = run(model)(variables, prompts, lens)
    args = jax.device_put((variables, prompts, lens), NamedSharding(mesh, P_()))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        f = run(model.clone(mesh=mesh))
        assert "all_to_all" in f.lower(*args).as_text()
        out = f(*args)
    np.testing.assert_array_equal(np.asarray(out["completion"]), np.asarray(ref["completion"]))
    np.testing.assert_allclose(np.asarray(out["logp_model"]), np.asarray(ref["logp_model"]),
                               atol=1e-5)


def test_stop_tokens_and_early_exit(tiny, jit):
    """Greedy decoding is deterministic, so with stop tokens chosen from an unconstrained
    run each row stops at a known step, and the loop runs exactly max_b(first stop) decode
    steps; the completion mask covers each row up to its stop token."""
    model, variables = tiny(MHA)
    run = _sampler(model, jit, greedy=True)
    prompts, key = _prompts(), jax.random.key(0)
    free = run(variables, prompts, LENS, key, _stop(-1))
    comp = np.asarray(free["completion"])
    assert int(free["n_steps"]) == N - 1 and not np.any(np.asarray(free["ended"]))
    for j_stop in (2, 0):
        stop = comp[:, j_stop]  # each row emits one of these by step j_stop
        out = run(variables, prompts, LENS, key, jnp.asarray(stop))
        first = np.array([np.flatnonzero(np.isin(comp[b], stop))[0] for b in range(B)])
        assert np.all(first <= j_stop)
        assert int(out["n_steps"]) == first.max()
        mask = np.asarray(out["completion_mask"])
        np.testing.assert_array_equal(mask, np.arange(N)[None, :] <= first[:, None])
        np.testing.assert_array_equal(np.asarray(out["lengths"]), first + 1)
        assert np.all(np.asarray(out["ended"]))
        got = np.asarray(out["completion"])
        np.testing.assert_array_equal(np.where(mask == 1, got, -1), np.where(mask == 1, comp, -1))
        np.testing.assert_array_equal(got[mask == 0], stop[0])  # padded with the first stop id
        assert np.all(np.asarray(out["logp_model"])[mask == 0] == 0)


def test_all_rows_stop_at_first_token(tiny, jit):
    """lm_head zeroed: uniform logits, argmax = token 0; with 0 as the stop token the loop
    body never runs."""
    model, variables = tiny(MHA)
    params = jax.tree.map(lambda x: x, variables["params"])
    params["lm_head"]["kernel"] = jnp.zeros_like(params["lm_head"]["kernel"])
    out = _sampler(model, jit, greedy=True)({**variables, "params": params}, _prompts(), LENS,
                                            jax.random.key(0), _stop(0))
    assert int(out["n_steps"]) == 0
    np.testing.assert_array_equal(np.asarray(out["lengths"]), 1)
    np.testing.assert_allclose(np.asarray(out["logp_model"])[:, 0], -np.log(257.0), rtol=1e-6)


def test_top_k_one_equals_greedy(tiny, jit):
    model, variables = tiny(MHA)
    prompts, key, eos = _prompts(), jax.random.key(7), _stop(EOS)
    g = _sampler(model, jit, greedy=True)(variables, prompts, LENS, key, eos)
    k1 = _sampler(model, jit, temperature=0.7, top_k=1)(variables, prompts, LENS, key, eos)
    np.testing.assert_array_equal(np.asarray(k1["completion"]), np.asarray(g["completion"]))
    np.testing.assert_allclose(np.asarray(k1["logp"]), 0.0, atol=1e-6)  # a point mass


PROBS = np.array([0.3, 0.25, 0.15, 0.1, 0.08, 0.05, 0.03, 0.02, 0.01, 0.005, 0.003, 0.002])


def _allowed(temperature, top_k, top_p):
    """The kept set, computed independently in numpy."""
    x = np.log(PROBS) / temperature
    order = np.argsort(-x)
    keep = order[: top_k] if top_k else order
    p = np.exp(x[keep] - x[keep].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    return set(keep[before < top_p].tolist()), keep[before < top_p], x


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 3, 1.0), (1.0, 0, 0.5), (1.0, 0, 0.6), (2.0, 4, 0.8), (0.5, 0, 0.9), (1.0, 5, 0.01),
])
def test_top_k_top_p_never_emit_excluded_tokens(jit, temperature, top_k, top_p):
    allowed, kept, x = _allowed(temperature, top_k, top_p)
    logits = jnp.asarray(np.broadcast_to(np.log(PROBS), (8192, len(PROBS))), jnp.float32)
    draw = jit(functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p))
    tok, logp, logp_model = draw(jax.random.key(11), logits)
    tok = np.asarray(tok)
    assert set(np.unique(tok).tolist()) == allowed  # never outside, and every kept one shows
    # Frequencies follow the renormalized distribution; logp is its log-prob.
    q = np.exp(x[kept] - x[kept].max())
    q /= q.sum()
    freq = np.array([np.mean(tok == t) for t in kept])
    np.testing.assert_allclose(freq, q, atol=0.02)
    log_q = dict(zip(kept.tolist(), np.log(q), strict=True))
    np.testing.assert_allclose(np.asarray(logp), [log_q[t] for t in tok], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logp_model), np.log(PROBS[tok]), rtol=1e-5)


def test_filter_logits_errors():
    z = jnp.zeros((1, 4))
    for kw in ({"temperature": 0.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            filter_logits(z, **kw)


def test_sequence_too_long(tiny):
    model, variables = tiny(MHA)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=24"):
        sample(model, variables, _prompts(), jnp.asarray(LENS), jax.random.key(0),
               max_new_tokens=24 - P + 1)


def test_generate_text_greedy(tiny, jit):
    model, variables = tiny(MHA)
    prompts = ["1+1=", "hello", ""]
    texts = generate_text(model, variables, prompts, max_new_tokens=6, greedy=True)
    tok = ByteTokenizer()
    ids = [tok.encode(p) if p else np.asarray([EOS]) for p in prompts]
    buf = np.zeros((3, 5), np.int32)
    for i, x in enumerate(ids):
        buf[i, : len(x)] = x
    ref, _ = _greedy_reference(model, variables, _full_forward(model, jit), jnp.asarray(buf),
                               np.array([len(x) for x in ids]), 6, stop=(EOS,))
    expected = []
    for row in ref:
        row = [t for t in row if t >= 0]
        expected.append(tok.decode(row[: row.index(EOS)] if EOS in row else row))
    assert texts == expected

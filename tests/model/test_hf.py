"""model.hf against Hugging Face transformers (PyTorch, CPU): tiny random models of every
supported architecture, saved with `save_pretrained`, loaded here; logits, the save round
trip and KV-cached greedy decoding must match transformers' own implementation.

The torch weights are redrawn at unit scale (norm gains 1 + 0.2 N(0, 1), matrices
N(0, 1/fan_in), biases and DeepSeek's `e_score_correction_bias` 0.1 N(0, 1)) so that the
logits spread out (std ~1) and any mis-mapped tensor moves them far beyond the tolerance.
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

import model.hf as hf
from model import Transformer, init_cache, make_mesh
from model.hf import safetensors_io
from model.hf.__main__ import main as cli
from model.sharding import logical_to_sharding

V = 96  # vocabulary
TOL = 1e-4

COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, max_position_embeddings=64,
              attn_implementation="eager")


def _configs():
    T = transformers
    return {
        # MLA with q LoRA, YaRN (mscale != mscale_all_dim: both the rope factor and the softmax
        # mscale are exercised), interleaved RoPE weights, 4 groups of 2 experts, top-2 groups.
        "deepseek_v3": T.DeepseekV3Config(
            **COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, moe_intermediate_size=16,
            n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
            rope_interleave=True,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                             "original_max_position_embeddings": 16, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.7}),
        # MLA without q LoRA, plain RoPE in halves, 2 groups, top-1 group, unnormalized gates.
        "deepseek_v3_no_q_lora": T.DeepseekV3Config(
            **COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=16,
            n_group=2, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.5,
            first_k_dense_replace=1, rope_interleave=False),
        # QK-norm, GQA, head_dim != d/h, softmax router, a leading dense layer, YaRN without mscale.
        "qwen3_moe": T.Qwen3MoeConfig(
            **COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
            mlp_only_layers=[0],
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                             "original_max_position_embeddings": 32}),
        "qwen3": T.Qwen3Config(**COMMON, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16),
        "llama_tied": T.LlamaConfig(**COMMON, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, tie_word_embeddings=True),
        # MQA, head_dim != d/h, Llama-3.1 RoPE scaling.
        "llama_untied": T.LlamaConfig(
            **COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32}),
        "qwen2": T.Qwen2Config(**COMMON, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2),
    }


def _randomize(m, seed):
    g = torch.Generator().manual_seed(seed)
    rand = lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.copy_(0.1 * rand(p) if name.endswith("bias") else 1 + 0.2 * rand(p))
            else:
                p.copy_(rand(p) / p.shape[-1] ** 0.5)
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * rand(b))


@pytest.fixture(scope="session")
def hf_case(tmp_path_factory):
    """`hf_case(name) -> (torch model, checkpoint dir)`, built once per session. qwen3_moe is
    saved in shards (with an index file)."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            cfg = _configs()[name]
            m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
            _randomize(m, seed=len(cache) + 1)
            path = str(tmp_path_factory.mktemp(name))
            m.save_pretrained(path, max_shard_size="40KB" if name == "qwen3_moe" else "1GB")
            cache[name] = (m, path)
        return cache[name]

    return get


def _tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, V, shape)


def _torch_logits(m, tokens):
    with torch.no_grad():
        return m(torch.as_tensor(tokens)).logits.numpy()


CASES = list(_configs())


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(hf_case, jit, name):
    m, path = hf_case(name)
    tokens = _tokens((2, 12))
    ref = _torch_logits(m, tokens)
    assert ref.std() > 0.3  # the comparison has power
    cfg, variables = hf.load(path)
    assert not cfg.scale_embeddings
    logits, _ = jit(Transformer(cfg).apply)(variables, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(logits), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_save_round_trip(hf_case, tmp_path, name):
    """load -> save -> transformers.from_pretrained: the same logits; load again: the same
    arrays. qwen3_moe is written in several files."""
    m, path = hf_case(name)
    cfg, variables = hf.load(path)
    out = str(tmp_path / "out")
    hf.save(out, cfg, variables, max_shard_bytes=30_000 if name == "qwen3_moe" else 2**30)
    if name == "qwen3_moe":
        assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    m2 = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = _tokens((2, 12), seed=1)
    np.testing.assert_allclose(_torch_logits(m2, tokens), _torch_logits(m, tokens), atol=1e-5, rtol=0)
    cfg2, variables2 = hf.load(out)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, variables2, variables)


@pytest.mark.parametrize("name", ["deepseek_v3", "llama_untied"])
def test_greedy_decode_matches_generate(hf_case, jit, name):
    """Prefill + token-by-token decoding with our KV (MLA latent) cache vs transformers'
    greedy `generate()`: the same tokens and the same logits at every step."""
    m, path = hf_case(name)
    b, prompt_len, new = 2, 5, 8
    prompt = _tokens((b, prompt_len), seed=2)
    m.generation_config.eos_token_id = None
    out = m.generate(torch.as_tensor(prompt), attention_mask=torch.ones(b, prompt_len, dtype=torch.long),
                     max_new_tokens=new, do_sample=False, pad_token_id=0, output_logits=True,
                     return_dict_in_generate=True)
    expected = out.sequences[:, prompt_len:].numpy()
    ref_logits = np.stack([s.numpy() for s in out.logits], axis=1)  # [b, new, V]

    cfg, variables = hf.load(path, max_seq_len=prompt_len + new)
    model = Transformer(cfg)
    step = jit(lambda v, tok, pos: model.apply(v, tok, pos, decode=True, mutable=["cache"]))
    cache = init_cache(model, variables, b)
    tok, pos = jnp.asarray(prompt), jnp.broadcast_to(jnp.arange(prompt_len), (b, prompt_len))
    got, logits = [], []
    for _ in range(new):
        (lg, _), upd = step(variables | {"cache": cache}, tok, pos)
        cache = upd["cache"]
        logits.append(np.asarray(lg[:, -1]))
        tok = jnp.argmax(lg[:, -1], axis=-1)[:, None]
        got.append(np.asarray(tok[:, 0]))
        pos = pos[:, -1:] + 1
    np.testing.assert_array_equal(np.stack(got, axis=1), expected)
    np.testing.assert_allclose(np.stack(logits, axis=1), ref_logits, atol=TOL, rtol=0)


def test_sharded_scanned_load(hf_case, tmp_path):
    """With a mesh, every array lands in the sharding of its logical axes (router biases
    replicated); with scan_layers=True, the stacks hold the layers in order, and saving the
    sharded, stacked arrays writes the same checkpoint back."""
    _, path = hf_case("deepseek_v3")
    _, plain = hf.load(path)
    mesh = make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
    for scan in (False, True):
        cfg, variables = hf.load(path, mesh=mesh, scan_layers=scan)
        boxed = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
        want = logical_to_sharding(nn.get_partition_spec(boxed["params"]), mesh)
        jax.tree.map(lambda a, s: assert_same_sharding(a, s), variables["params"], want)
        assert any(len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated
                   for a in jax.tree.leaves(variables["params"]))
        for a in jax.tree.leaves(variables["router_bias"]):
            assert a.sharding.is_fully_replicated
        if not scan:
            jax.tree.map(np.testing.assert_array_equal, variables, plain)
            continue
        for coll in ("params", "router_bias"):
            for stack, layers in (("dense_stack", [0]), ("moe_stack", [1, 2])):
                if stack not in variables[coll]:
                    continue
                ref = jax.tree.map(lambda *xs: np.stack(xs),
                                   *[plain[coll][f"layers_{i}"] for i in layers])
                jax.tree.map(np.testing.assert_array_equal, variables[coll][stack], ref)
        hf.save(str(tmp_path / "scan"), cfg, variables)
        jax.tree.map(np.testing.assert_array_equal, hf.load(str(tmp_path / "scan"))[1], plain)


def test_export_native_model(make_model, tmp_path):
    """A model defined here (scaled embeddings, muP output multiplier, MLA + MoE with nonzero
    balancing biases) saves as a DeepseekV3 checkpoint whose transformers logits equal ours:
    the sqrt(d) and 1/m factors are folded into the embedding and the LM head."""
    from model import ModelConfig

    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, attention="mla",
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      ffn_dim=48, n_routed_experts=4, n_shared_experts=1, moe_ffn_dim=16, top_k=2,
                      first_k_dense=1, routed_scaling_factor=1.5, mup_base_d_model=16,
                      capacity_factor=2.0)  # = experts / top_k: no drops
    assert cfg.scale_embeddings
    _, variables, fwd = make_model(cfg, seed=5, gain=1.0)
    variables = dict(variables, router_bias=jax.tree.map(
        lambda b: jnp.asarray(np.random.default_rng(6).normal(0, 0.1, b.shape), b.dtype),
        variables["router_bias"]))
    tokens = _tokens((2, 12), seed=4)
    ours = np.asarray(fwd(variables, jnp.asarray(tokens))[0])
    assert ours.std() > 0.3
    hf.save(str(tmp_path), cfg, variables)
    m = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), dtype=torch.float32, attn_implementation="eager").eval()
    np.testing.assert_allclose(_torch_logits(m, tokens), ours, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="tied embeddings"):
        hf.save(str(tmp_path / "tied"), cfg.replace(tie_embeddings=True), variables)


def assert_same_sharding(a, s):
    assert a.sharding.is_equivalent_to(s, a.ndim), (a.sharding, s)


def _rewrite(src, dst, drop=(), add=None, config=None):
    """Copies checkpoint `src` to `dst` without the tensors `drop`, plus `add` {name: array},
    with config.json entries updated from `config`."""
    reader = safetensors_io.SafetensorsReader(src)
    tensors = {k: np.asarray(reader.get(k)) for k in reader.keys() if k not in drop}
    tensors.update(add or {})
    safetensors_io.write_safetensors(dst, [(k, v.shape, v.dtype) for k, v in tensors.items()],
                                     tensors.__getitem__)
    with open(os.path.join(src, "config.json")) as f:
        hf_cfg = json.load(f)
    hf_cfg.update(config or {})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf_cfg, f)


def test_errors_list_the_problems(hf_case, tmp_path):
    _, path = hf_case("qwen2")
    bad = str(tmp_path / "arch")
    _rewrite(path, bad, config={"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ValueError, match="unsupported checkpoint.*GPT2LMHeadModel.*gpt2"):
        hf.load(bad)
    feats = str(tmp_path / "features")
    _rewrite(path, feats, config={"hidden_act": "gelu", "use_sliding_window": True})
    with pytest.raises(ValueError, match="hidden_act='gelu'.*sliding-window"):
        hf.load(feats)
    tensors = str(tmp_path / "tensors")
    _rewrite(path, tensors, drop={"model.layers.1.self_attn.k_proj.bias", "model.norm.weight"},
             add={"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)})
    with pytest.raises(ValueError) as e:
        hf.load(tensors)
    msg = str(e.value)
    assert "2 missing, 1 unexpected" in msg
    for name in ("model.layers.1.self_attn.k_proj.bias", "model.norm.weight",
                 "model.layers.0.self_attn.o_proj.bias"):
        assert name in msg
    with pytest.raises(ValueError, match="no config.json"):
        hf.load(str(tmp_path))


def test_fp8_block_dequantization(hf_case, tmp_path):
    """A DeepSeek-style FP8 checkpoint (e4m3 weights + 128x128-block `weight_scale_inv`)
    loads to the same arrays as the same weights stored dequantized in float32."""
    _, path = hf_case("deepseek_v3_no_q_lora")
    block = (4, 8)  # small blocks so the tiny matrices have several, some partial
    reader = safetensors_io.SafetensorsReader(path)
    fp8, dequant = {}, {}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
                 "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"):
        w = np.asarray(reader.get(name))
        rows, cols = -(-w.shape[0] // block[0]), -(-w.shape[1] // block[1])
        scale = np.zeros((rows, cols), np.float32)
        q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
        for i in range(rows):
            for j in range(cols):
                blk = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
                scale[i, j] = np.abs(blk).max() / 448.0
                q[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = (
                    blk / scale[i, j]).astype(ml_dtypes.float8_e4m3fn)
        fp8[name], fp8[name + "_scale_inv"] = q, scale
        ref = q.astype(np.float32)
        for i in range(rows):
            for j in range(cols):
                ref[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] *= scale[i, j]
        dequant[name] = ref
        assert np.abs(ref - w).max() < 0.1 * np.abs(w).max()  # a plausible quantization
    quant = {"quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}
    _rewrite(path, str(tmp_path / "fp8"), add=fp8, config=quant)
    _rewrite(path, str(tmp_path / "f32"), add=dequant)
    cfg_q, var_q = hf.load(str(tmp_path / "fp8"), dtype="float32")
    cfg_f, var_f = hf.load(str(tmp_path / "f32"), dtype="float32")
    assert cfg_q == cfg_f
    jax.tree.map(np.testing.assert_array_equal, var_q, var_f)
    assert hf.load(str(tmp_path / "fp8"))[0].param_dtype == "bfloat16"


def test_cli_import_export(hf_case, tmp_path):
    """`python -m model.hf import` -> Orbax (+ tokenizer) -> `export` -> transformers loads
    the same model."""
    m, path = hf_case("deepseek_v3")
    src = str(tmp_path / "src")
    shutil.copytree(path, src)
    with open(os.path.join(src, "tokenizer.json"), "w") as f:
        f.write('{"model": {"type": "BPE"}}')
    dst, out = str(tmp_path / "orbax"), str(tmp_path / "hf")
    assert cli(["import", src, dst]) == 0
    assert os.path.exists(os.path.join(dst, "tokenizer.json"))
    cfg, variables = hf.read_orbax(dst)
    cfg_ref, ref = hf.load(src)
    assert cfg == cfg_ref
    jax.tree.map(np.testing.assert_array_equal, variables, ref)
    assert cli(["export", dst, out]) == 0
    assert os.path.exists(os.path.join(out, "tokenizer.json"))
    m2 = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager").eval()
    tokens = _tokens((1, 10), seed=3)
    np.testing.assert_allclose(_torch_logits(m2, tokens), _torch_logits(m, tokens), atol=1e-5, rtol=0)
    assert cli(["import", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2

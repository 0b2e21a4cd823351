"""model.hf against Hugging Face transformers (PyTorch, CPU): tiny random models of every
supported architecture, saved with `save_pretrained`, loaded here; logits, the save round
trip and KV-cached greedy decoding must match transformers' own implementation.

The torch weights are redrawn at unit scale (norm gains 1 + 0.2 N(0, 1), matrices
N(0, 1/fan_in), biases and DeepSeek's `e_score_correction_bias` 0.1 N(0, 1)) so that the
logits spread out (std ~1) and any mis-mapped tensor moves them far beyond the tolerance.
"""

import json
import os
import re
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


# ----------------------------------------------------------------------------------------
# bad input: one `error:` line naming the file (and field / tensor), exit code 2, nothing lost


def _cli_error(capsys, argv) -> str:
    """Runs the CLI on `argv`, which must fail with exit code 2 and one `error:` line."""
    capsys.readouterr()
    assert cli(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert not out.out
    return lines[0]


def _copy(path, dst, config=None, drop=()):
    """A copy of checkpoint dir `path` with config.json entries `config` set (None: deleted)
    and `drop` deleted."""
    shutil.copytree(path, dst)
    fname = os.path.join(dst, "config.json")
    with open(fname) as f:
        c = json.load(f)
    for k in drop:
        del c[k]
    c.update(config or {})
    with open(fname, "w") as f:
        json.dump(c, f)
    return str(dst)


@pytest.mark.parametrize("drop,config,field", [
    (("hidden_size",), None, "missing required field 'hidden_size'"),
    (("num_hidden_layers",), None, "missing required field 'num_hidden_layers'"),
    ((), {"num_attention_heads": None}, "missing required field 'num_attention_heads'"),
    ((), {"hidden_size": "32"}, "field 'hidden_size' must be an integer >= 1, got '32'"),
    ((), {"rms_norm_eps": [1e-6]}, "field 'rms_norm_eps' must be a number > 0"),
    ((), {"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     "missing required field 'rope_parameters.low_freq_factor'"),
    ((), {"quantization_config": {"quant_method": "fp8", "weight_block_size": "128"}},
     "field 'quantization_config.weight_block_size' must be"),
])
def test_config_json_missing_or_bad_field(hf_case, tmp_path, capsys, drop, config, field):
    """A config.json without a required field, or with one of the wrong type: a ValueError
    naming the file and the field (not a TypeError deep in the translation)."""
    _, path = hf_case("qwen2")
    bad = _copy(path, tmp_path / "bad", config, drop)
    fname = os.path.join(bad, "config.json")
    with pytest.raises(ValueError, match=re.escape(f"{fname}: ") + ".*" + re.escape(field)):
        hf.load(bad)
    line = _cli_error(capsys, ["import", bad, str(tmp_path / "dst")])
    assert fname in line and field in line
    assert not os.path.exists(tmp_path / "dst")


def test_config_json_missing_field_mla_and_moe(hf_case, tmp_path):
    """The fields MLA and MoE need are required too (all missing ones listed)."""
    _, path = hf_case("deepseek_v3_no_q_lora")
    bad = _copy(path, tmp_path / "ds", drop=("kv_lora_rank", "num_experts_per_tok"))
    with pytest.raises(ValueError, match="missing required field 'kv_lora_rank'; missing required "
                                         "field 'num_experts_per_tok'"):
        hf.load(bad)
    _, path = hf_case("qwen3_moe")
    bad = _copy(path, tmp_path / "qm", drop=("num_local_experts",))
    with pytest.raises(ValueError, match="config.json: missing required field 'num_experts'"):
        hf.load(bad)


@pytest.mark.parametrize("content", ['{"hidden_size": 32,', "[1, 2]", "\xff\xfe"])
def test_config_json_not_json(hf_case, tmp_path, capsys, content):
    _, path = hf_case("qwen2")
    bad = str(tmp_path / "bad")
    shutil.copytree(path, bad)
    with open(os.path.join(bad, "config.json"), "w", encoding="latin-1") as f:
        f.write(content)
    with pytest.raises(ValueError, match=re.escape(os.path.join(bad, "config.json"))):
        hf.load(bad)
    assert os.path.join(bad, "config.json") in _cli_error(capsys, ["import", bad, str(tmp_path / "d")])


def _damaged(path, dst, fn):
    """A copy of checkpoint dir `path` whose model.safetensors bytes are `fn(bytes)`."""
    shutil.copytree(path, dst)
    fname = os.path.join(dst, "model.safetensors")
    with open(fname, "rb") as f:
        data = f.read()
    with open(fname, "wb") as f:
        f.write(fn(data))
    return str(dst), fname


def test_truncated_or_malformed_safetensors(hf_case, tmp_path, capsys):
    """Cut in the header, cut in the data (the last tensor's bytes missing), a header that
    is not JSON, a header length beyond the file: a ValueError naming the file (and the
    tensor), checked when the file is opened; the CLI prints it as one line."""
    _, path = hf_case("qwen2")
    header, start = safetensors_io.read_header(os.path.join(path, "model.safetensors"))
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    n = start - 8
    cases = {
        "header_cut": (lambda d: d[: 8 + n // 2], "truncated safetensors file"),
        "length_cut": (lambda d: d[:5], "truncated safetensors file"),
        "data_cut": (lambda d: d[:-1], f"truncated safetensors file: tensor {last} "),
        "not_json": (lambda d: d[:8] + b"#" + d[9:], "header is not valid JSON"),
        "huge_length": (lambda d: (2**40).to_bytes(8, "little") + d[8:], "not a safetensors file"),
    }
    for name, (fn, msg) in cases.items():
        bad, fname = _damaged(path, tmp_path / name, fn)
        with pytest.raises(ValueError, match=re.escape(f"{fname}: ") + ".*" + re.escape(msg)):
            safetensors_io.SafetensorsReader(bad)
        with pytest.raises(ValueError, match=re.escape(msg)):
            hf.load(bad)
        dst = str(tmp_path / f"{name}_dst")
        line = _cli_error(capsys, ["import", bad, dst])
        assert fname in line and msg in line
        assert not os.path.exists(dst)


def test_malformed_safetensors_entries(hf_case, tmp_path):
    """Header entries with an unknown dtype or a byte range that does not fit the shape,
    and an index that names a missing shard, name the file and the tensor."""
    _, path = hf_case("qwen2")

    def edit(entry):
        def fn(data):
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            header["model.norm.weight"].update(entry)
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (n - len(blob))
            assert len(blob) == n
            return data[:8] + blob + data[8 + n:]
        return fn

    for name, entry, msg in [
        ("dtype", {"dtype": "F4"}, "tensor model.norm.weight: unsupported dtype 'F4'"),
        ("shape", {"shape": [33]}, "tensor model.norm.weight: data_offsets"),
    ]:
        bad, fname = _damaged(path, tmp_path / name, edit(entry))
        with pytest.raises(ValueError, match=re.escape(f"{fname}: {msg}")):
            hf.load(bad)
    _, path = hf_case("qwen3_moe")  # sharded, with an index
    bad = str(tmp_path / "index")
    shutil.copytree(path, bad)
    shard = sorted(n for n in os.listdir(bad) if n.endswith(".safetensors"))[-1]
    os.remove(os.path.join(bad, shard))
    with pytest.raises(ValueError, match=re.escape(f"model.safetensors.index.json: names the shard "
                                                   f"'{shard}'")):
        hf.load(bad)


def test_weight_dtypes_are_checked(hf_case, tmp_path, capsys):
    """Every tensor read is a float weight: an int32 one (or float8 outside a block-FP8
    checkpoint, or without its scale) is an error naming the tensor, not a silent cast."""
    _, path = hf_case("qwen2")
    reader = safetensors_io.SafetensorsReader(path)
    name = "model.layers.0.self_attn.q_proj.weight"
    bad = str(tmp_path / "int")
    _rewrite(path, bad, add={name: np.asarray(reader.get(name)).astype(np.int32)})
    with pytest.raises(ValueError, match=re.escape(f"{name} (model.safetensors, int32): not a "
                                                   "floating-point dtype")):
        hf.load(bad)
    line = _cli_error(capsys, ["import", bad, str(tmp_path / "d")])
    assert name in line and "int32" in line
    fp8 = {name: np.asarray(reader.get(name)).astype(ml_dtypes.float8_e4m3fn)}
    _rewrite(path, str(tmp_path / "fp8_plain"), add=fp8)
    with pytest.raises(ValueError, match=re.escape(name) + ".*float8 without a block-FP8"):
        hf.load(str(tmp_path / "fp8_plain"))
    quant = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [4, 8]}}
    _rewrite(path, str(tmp_path / "fp8_noscale"), add=fp8, config=quant)
    with pytest.raises(ValueError, match=re.escape(f"float8 without its {name}_scale_inv")):
        hf.load(str(tmp_path / "fp8_noscale"))
    scale = {name + "_scale_inv": np.ones((2, 2), np.float32)}  # [32, 32] in 4x8 blocks: (8, 4)
    _rewrite(path, str(tmp_path / "fp8_badscale"), add=fp8 | scale, config=quant)
    with pytest.raises(ValueError, match=re.escape(f"{name}_scale_inv: shape (2, 2)") + ".*needs \\(8, 4\\)"):
        hf.load(str(tmp_path / "fp8_badscale"))


def test_stacked_tensor_shapes_are_checked(hf_case, tmp_path):
    """An expert whose shape differs from the others it is stacked with names the tensor."""
    _, path = hf_case("qwen3_moe")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    bad = str(tmp_path / "bad")
    _rewrite(path, bad, add={name: np.zeros((17, 32), np.float32)})
    with pytest.raises(ValueError, match=re.escape(f"tensor {name} (17, 32) does not match")):
        hf.load(bad)


def test_cli_bad_sources_and_destinations(hf_case, tmp_path, capsys, monkeypatch):
    """Missing or wrong SRC, a DST that is a file or already holds something (never
    overwritten: its files stay as they were), bad arguments: one `error:` line, exit 2.
    An empty DST is fine; a run that fails while writing leaves no half-written DST."""
    _, path = hf_case("qwen2")
    a_file = str(tmp_path / "a_file")
    with open(a_file, "w") as f:
        f.write("keep")
    orbax_dir = str(tmp_path / "orbax")
    os.makedirs(orbax_dir)  # empty: accepted
    assert cli(["import", path, orbax_dir]) == 0
    exported = str(tmp_path / "exported")
    assert cli(["export", orbax_dir, exported]) == 0

    def snapshot(d):
        out = {}
        for root, _, files in os.walk(d):
            for n in files:
                with open(os.path.join(root, n), "rb") as f:
                    out[os.path.relpath(os.path.join(root, n), d)] = f.read()
        return out

    before = {d: snapshot(d) for d in (orbax_dir, exported)}
    for argv, expect in [
        (["import", str(tmp_path / "nowhere"), str(tmp_path / "x")], "nowhere is not a Hugging Face"),
        (["import", a_file, str(tmp_path / "x")], "a_file is not a Hugging Face"),
        (["import", path, a_file], f"destination {a_file} exists and is not a directory"),
        (["import", path, orbax_dir], f"destination {orbax_dir} is not empty"),
        (["import", path, exported], f"destination {exported} is not empty"),
        (["import", path, os.path.join(a_file, "sub")], f"{a_file} is not a directory"),
        (["export", orbax_dir, exported], f"destination {exported} is not empty"),
        (["export", orbax_dir, a_file], f"destination {a_file} exists and is not a directory"),
        (["export", str(tmp_path / "nowhere"), str(tmp_path / "x")], "is not a model.hf Orbax"),
        (["export", exported, str(tmp_path / "x")], "is not a model.hf Orbax"),
        (["import", path, str(tmp_path / "x"), "--mesh", "fsdp=two"], "--mesh 'fsdp=two'"),
        (["import", path], "the following arguments are required: dst"),
        (["export", orbax_dir, str(tmp_path / "x"), "--dtype", "int8"], "invalid choice: 'int8'"),
        ([], "the following arguments are required: command"),
    ]:
        assert expect in _cli_error(capsys, argv), argv
    assert {d: snapshot(d) for d in before} == before
    assert not os.path.exists(tmp_path / "x")
    with open(a_file) as f:
        assert f.read() == "keep"

    # an Orbax checkpoint whose config does not fit its arrays, or whose arrays are corrupt
    mismatched = str(tmp_path / "mismatched")
    shutil.copytree(orbax_dir, mismatched)
    fname = os.path.join(mismatched, "model_config.json")
    with open(fname) as f:
        c = json.load(f)
    with open(fname, "w") as f:
        json.dump(c | {"d_model": 64}, f)
    line = _cli_error(capsys, ["export", mismatched, str(tmp_path / "x")])
    assert fname in line and "params/embed/embedding: stored (96, 32), config (96, 64)" in line
    with open(fname, "w") as f:
        json.dump(c | {"no_such_field": 1}, f)
    assert f"{fname}: unknown ModelConfig field(s): no_such_field" in _cli_error(
        capsys, ["export", mismatched, str(tmp_path / "x")])
    corrupt = str(tmp_path / "corrupt")
    shutil.copytree(orbax_dir, corrupt)
    for root, _, files in os.walk(os.path.join(corrupt, "variables")):
        for n in files:
            with open(os.path.join(root, n), "wb") as f:
                f.write(b"garbage")
    assert "corrupt" in _cli_error(capsys, ["export", corrupt, str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x")

    # a failure while writing (here: the disk fills up) removes what was written
    import model.hf.checkpoint as checkpoint

    def full(*_):
        raise OSError(28, "No space left on device", "tokenizer.json")

    monkeypatch.setattr(checkpoint, "copy_tokenizer", full)
    assert "tokenizer.json: No space left on device" in _cli_error(
        capsys, ["import", path, str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x")
    os.makedirs(tmp_path / "empty")
    assert "No space left" in _cli_error(capsys, ["export", orbax_dir, str(tmp_path / "empty")])
    assert os.listdir(tmp_path / "empty") == []

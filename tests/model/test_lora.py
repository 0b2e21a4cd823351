"""LoRA adapters (model/lora.py): the adapted model equals the base at init, a train step
moves only the adapters (no optimizer state for the frozen base), merging gives the adapted
model's logits (also in transformers after `python -m model.hf export`), sharded equals
single-device, config errors name the field, and `init_from` of a checkpoint without
adapters trains."""

from __future__ import annotations

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from model import LOGICAL_RULES, ModelConfig, Transformer, init_cache, lora, make_mesh
from model.sharding import batch_sharding, logical_to_sharding

V = 64
GQA = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                  max_seq_len=16, lora_rank=4, lora_alpha=8.0)
MLA_MOE = ModelConfig(
    vocab_size=V, d_model=32, n_layers=2, n_heads=4, ffn_dim=48, max_seq_len=16,
    attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
    v_head_dim=8, n_routed_experts=4, n_shared_experts=1, top_k=2, moe_ffn_dim=16,
    first_k_dense=1, capacity_factor=2.0, lora_rank=4, lora_alpha=8.0,
    lora_targets=r"layers/(attn|mlp|moe/shared)/\w+",
)
CASES = {"gqa": GQA, "gqa_scan": GQA.replace(scan_layers=True), "mla_moe_scan": MLA_MOE.replace(
    scan_layers=True)}


def _tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, shape), jnp.int32)


def _adapted_modules(params) -> set[str]:
    """`module_key`s of the modules holding adapters."""
    return {lora.module_key(k[:-1]) for k in flatten_dict(params) if k[-1] == "lora_a"}


def _drop_adapters(params):
    flat = flatten_dict(params)
    return {k: v for k, v in flat.items() if k[-1] not in lora.LORA_NAMES}


def _strip(params):
    """`params` without the adapters: the base model's weights."""
    return unflatten_dict(_drop_adapters(params))


@pytest.mark.parametrize("name", ["gqa", "mla_moe_scan"])
def test_init_equals_base_bitwise(name, jit):
    """Fresh adapters (A ~ N(0, 1/in), B = 0) on every targeted projection, laid out like
    the kernel (stacked under scan); the logits equal the base model's bit for bit."""
    cfg = CASES[name]
    tokens = _tokens((2, 8))
    v = nn.unbox(jit(Transformer(cfg).init)(jax.random.key(0), tokens))
    base_cfg = lora.base_config(cfg)
    base_params = _drop_adapters(v["params"])
    abstract = jax.eval_shape(Transformer(base_cfg).init, jax.random.key(0), tokens)
    assert set(flatten_dict(nn.unbox(abstract)["params"])) == set(base_params)
    assert _adapted_modules(v["params"]) == set(lora.target_paths(cfg))
    for k, x in flatten_dict(v["params"]).items():
        if k[-1] == "lora_b":
            assert not np.any(np.asarray(x))
        if k[-1] == "lora_a":
            kernel = flatten_dict(v["params"])[k[:-1] + ("kernel",)]
            assert x.shape == kernel.shape[:-1] + (cfg.lora_rank,)
            assert abs(float(np.std(x)) * np.sqrt(x.shape[-2]) - 1) < 0.3
    base = dict(v, params=lora.merge_lora(cfg, v["params"]))  # = v without its adapters
    assert set(flatten_dict(base["params"])) == set(base_params)
    ours = jit(Transformer(cfg).apply)(v, tokens)[0]
    ref = jit(Transformer(base_cfg).apply)(base, tokens)[0]
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_every_projection_can_be_targeted():
    """`projection_paths` (what `lora_targets` is validated against) lists exactly the
    modules that take adapters when everything is targeted; the router, the routed experts,
    the embedding and the LM head never do."""
    for cfg in (GQA, MLA_MOE, MLA_MOE.replace(q_lora_rank=0, scan_layers=True)):
        cfg = cfg.replace(lora_targets=".*")
        abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), _tokens((1, 4)))
        assert _adapted_modules(nn.unbox(abstract)["params"]) == set(lora.projection_paths(cfg))


@pytest.mark.parametrize("name", ["gqa_scan", "mla_moe_scan"])
def test_merge_gives_the_adapted_logits(name, make_model, jit):
    """Random (nonzero) adapters: merged weights run without adapters give the adapted
    model's logits; MLA's absorbed decoding (which reads the merged `kv_b_proj` kernel)
    gives them too."""
    cfg = CASES[name]
    _, v, fwd = make_model(cfg, seed=3, gain=1.0)
    tokens = _tokens((2, 8), seed=1)
    ours = np.asarray(fwd(v, tokens)[0])
    assert ours.std() > 0.3
    merged = dict(v, params=lora.merge_lora(cfg, nn.unbox(v["params"])))
    base_model = Transformer(lora.base_config(cfg))
    ref = np.asarray(jit(base_model.apply)(merged, tokens)[0])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    # The adapters matter: the base weights alone give other logits.
    plain = dict(v, params=_strip(nn.unbox(v["params"])))
    assert np.abs(np.asarray(jit(base_model.apply)(plain, tokens)[0]) - ours).max() > 1e-2
    if cfg.attention == "mla":
        model = Transformer(cfg)
        cache = init_cache(model, v, 2)
        step = jit(lambda c, t, p: model.apply({**v, "cache": c}, t, p, decode=True,
                                               mutable=["cache"]))
        outs = []
        for i in range(tokens.shape[1]):
            (logits, _), upd = step(cache, tokens[:, i:i + 1], jnp.full((2, 1), i, jnp.int32))
            cache = upd["cache"]
            outs.append(np.asarray(logits)[:, 0])
        np.testing.assert_allclose(np.stack(outs, 1), ours, rtol=1e-4, atol=1e-4)


def test_dropout_only_with_a_dropout_rng(make_model, jit):
    """`lora_dropout` p drops adapter inputs (kept ones scaled by 1/(1-p)) only when a
    "dropout" rng is passed; the base product is untouched."""
    from model.layers import Linear

    p = 0.25
    layer = Linear(1, 3, (None, None), lora_rank=2, lora_alpha=2.0, lora_dropout=p,
                   lora_targets=".*")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 1)), jnp.float32)
    w = nn.unbox(layer.init(jax.random.key(0), x))
    w["params"]["lora_b"] = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3)), jnp.float32)
    full = (x @ w["params"]["lora_a"] @ w["params"]["lora_b"]) * 1.0  # alpha / r = 1
    base = x @ w["params"]["kernel"]
    np.testing.assert_allclose(layer.apply(w, x), base + full, rtol=1e-5, atol=1e-6)
    delta = np.asarray(layer.apply(w, x, rngs={"dropout": jax.random.key(3)}) - base)
    ratio = delta[:, 0] / np.asarray(full[:, 0])  # per token: 0 (dropped) or 1/(1-p)
    np.testing.assert_allclose(delta, ratio[:, None] * np.asarray(full), rtol=1e-4, atol=1e-5)
    dropped = np.isclose(ratio, 0, atol=1e-4)
    assert np.all(dropped | np.isclose(ratio, 1 / (1 - p), rtol=1e-4))
    assert 0 < dropped.sum() < len(ratio)
    # In the model: random per key, deterministic without a key, nothing with p = 0.
    cfg = GQA.replace(lora_dropout=0.5)
    model, v, _ = make_model(cfg, seed=3, gain=1.0)
    tokens = _tokens((2, 8))
    apply = jit(lambda v, t, k: model.apply(v, t, rngs={"dropout": k})[0])
    plain = np.asarray(jit(model.apply)(v, tokens)[0])
    a, b = (np.asarray(apply(v, tokens, jax.random.key(i))) for i in (0, 1))
    assert np.abs(a - plain).max() > 1e-3 and np.abs(a - b).max() > 1e-3
    no_drop = Transformer(cfg.replace(lora_dropout=0.0))
    np.testing.assert_array_equal(
        np.asarray(jit(lambda v, t, k: no_drop.apply(v, t, rngs={"dropout": k})[0])(
            v, tokens, jax.random.key(0))), plain)


def _optim_config(name="adamw"):
    import optim

    c = optim.default_config()
    c.update(dict(name=name, lr=1e-2, warmup_steps=0, total_steps=10, schedule="constant"))
    return c


def test_optimizer_state_only_for_adapters():
    """With adapters in the tree, `build_optimizer` keeps moments for them alone (AdamW's
    mu and nu; with `optim.name='muon'` the adapters, not being `kernel`s, get AdamW too)."""
    from train import setup

    abstract = setup.abstract_params(Transformer(GQA), 8)
    n_adapter = sum(x.size for k, x in flatten_dict(abstract).items() if k[-1] in lora.LORA_NAMES)
    assert 0 < n_adapter < sum(x.size for x in jax.tree.leaves(abstract)) / 5
    for name in ("adamw", "muon"):
        tx, _ = setup.build_optimizer(_optim_config(name), abstract)
        state = jax.eval_shape(tx.init, abstract)
        assert sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0) == 2 * n_adapter, name
    base = jax.eval_shape(lambda p: lora.merge_lora(GQA, p), abstract)  # no adapters: all train
    tx, _ = setup.build_optimizer(_optim_config(), base)
    n_total = sum(x.size for x in jax.tree.leaves(base))
    assert sum(x.size for x in jax.tree.leaves(jax.eval_shape(tx.init, base)) if x.ndim > 0) == (
        2 * n_total)


def test_train_step_moves_only_adapters(jit):
    """One real train step (`train.step.make_train_step`, optimizer from
    `train.setup.build_optimizer`, state from `init_state`): the base weights are bitwise
    unchanged, every adapter factor B moved, the optimizer state holds moments for the
    adapters only (the start-up summary says so), and merging the trained adapters still
    gives the adapted logits."""
    from train import setup
    from train.loop import _state_summary
    from train.step import StepOptions, make_train_step

    cfg = GQA
    mesh = make_mesh({}, devices=jax.devices()[:1])
    model = Transformer(cfg, mesh=mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        tx, schedule = setup.build_optimizer(_optim_config(), setup.abstract_params(model, 8))
        state = setup.init_state(model, tx, mesh, 0, 8)
        summary = _state_summary(cfg, state, mesh)
        before = jax.tree.map(np.asarray, state.params)
        tokens = _tokens((4, 9), seed=2)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        state, metrics = jit(make_train_step(model, tx, schedule, StepOptions()))(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    n_adapter = 0
    for k, new in flatten_dict(state.params).items():
        old = flatten_dict(before)[k]
        if k[-1] in lora.LORA_NAMES:
            n_adapter += new.size
            if k[-1] == "lora_b":
                assert not np.any(old) and np.abs(np.asarray(new)).min() > 0, k  # Adam: all move
        else:
            np.testing.assert_array_equal(np.asarray(new), old, err_msg=str(k))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0) == 2 * n_adapter
    n_total = sum(x.size for x in jax.tree.leaves(state.params))
    assert f"trainable {n_adapter / 1e6:.3f}M, frozen {(n_total - n_adapter) / 1e6:.3f}M" in summary
    assert "LoRA r=4" in summary and "optimizer state" in summary
    # Merged after training (B != 0): the adapted logits to float32 rounding.
    tokens = _tokens((2, 8), seed=5)
    ours = jit(Transformer(cfg).apply)({"params": state.params}, tokens)[0]
    merged = lora.merge_lora(cfg, state.params)
    ref = jit(Transformer(lora.base_config(cfg)).apply)({"params": merged}, tokens)[0]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_sharded_equals_single_device(make_model, jit):
    """8 devices (data x fsdp x tensor): the adapters shard along their kernel's input
    (`lora_a`) and output (`lora_b`) axes, and the logits equal the single-device ones."""
    cfg = GQA.replace(scan_layers=True)
    model, v, fwd = make_model(cfg, seed=4, gain=1.0)
    tokens = _tokens((8, 8), seed=3)
    ref = np.asarray(fwd(v, tokens)[0])
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with nn.logical_axis_rules(LOGICAL_RULES):
        shardings = logical_to_sharding(nn.get_partition_spec(v), mesh)
        params = jax.device_put(nn.unbox(v), shardings)
    q = shardings["params"]["dense_stack"]["attn"]["q_proj"]
    assert tuple(q["kernel"].spec) == (None, "fsdp", "tensor")  # [layers, embed, heads]
    assert tuple(q["lora_a"].spec) == (None, "fsdp", None)  # [layers, embed, r]
    assert tuple(q["lora_b"].spec) == (None, None, "tensor")  # [layers, r, heads]
    assert not params["params"]["dense_stack"]["attn"]["q_proj"]["lora_b"].sharding.is_fully_replicated
    sharded = model.clone(mesh=mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        in_batch = batch_sharding(mesh)
        apply = jit(lambda v, t: sharded.apply(v, t)[0], in_shardings=(shardings, in_batch))
        logits = apply(params, jax.device_put(tokens, in_batch))
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes, message", [
    (dict(lora_rank=-1), "lora_rank=-1 must be >= 0"),
    (dict(lora_rank=4, lora_alpha=0.0), "lora_alpha=0.0 must be > 0"),
    (dict(lora_rank=4, lora_dropout=1.0), "lora_dropout=1.0 must be in [0, 1)"),
    (dict(lora_rank=4, lora_dropout=-0.1), "lora_dropout=-0.1 must be in [0, 1)"),
    (dict(lora_rank=4, lora_targets="layers/(attn"), "lora_targets='layers/(attn' is not a valid regex"),
    (dict(lora_rank=4, lora_targets="layers/attn/kv_b_proj"),  # an MLA name, not in GQA
     "lora_targets='layers/attn/kv_b_proj' matches none"),
    (dict(lora_rank=4, lora_targets="q_proj"), "lora_targets='q_proj' matches none"),  # full match
])
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        GQA.replace(lora_rank=0).replace(**changes)
    assert ModelConfig(lora_targets="q_proj").lora_rank == 0  # off: targets not checked


def test_qk_clip_with_lora_is_refused():
    from configs import base
    from train import setup
    from train.errors import UserError

    c = base.get_config()
    c.optim.qk_clip.enabled = True
    with pytest.raises(UserError, match="lora_rank=4"):
        setup.qk_clip_hook(c, GQA)


def test_init_from_without_adapters_trains_and_exports(tmp_path, capsys, fill, jit):
    """`init_from` an imported checkpoint (no adapters) with `lora_rank > 0`: the run starts
    from its weights with fresh adapters, trains only those (the saved base weights equal
    the imported ones), and the exported merged weights load in transformers with the
    adapted model's logits."""
    import torch
    import transformers

    from configs import tiny
    from model.hf.__main__ import main as cli
    from model.hf.checkpoint import read_orbax, write_orbax
    from train.checkpoint import Checkpointer
    from train.loop import run

    c = tiny.get_config()
    c.workdir = str(tmp_path / "run")
    c.model.update(dict(d_model=32, n_layers=2, n_heads=4, attention="mha", n_kv_heads=2,
                        n_routed_experts=0, n_shared_experts=0, ffn_dim=64, max_seq_len=32))
    c.data.update(dict(max_files=5, seq_len=16, batch_size=4))
    c.mesh.update(dict(data=2, fsdp=2, tensor=2, expert=1))  # adapters split on fsdp, tensor
    c.train.update(dict(steps=3, log_every=1, eval_every=0, progress=False))
    c.optim.update(dict(total_steps=3, warmup_steps=0, lr=1e-2, schedule="constant"))
    c.checkpoint.every = 3
    base_cfg = ModelConfig.from_dict(c.model.to_dict())
    v = nn.unbox(fill(jax.eval_shape(Transformer(base_cfg).init, jax.random.key(0),
                                     jnp.zeros((1, 8), jnp.int32)), 7, 1.0))
    write_orbax(str(tmp_path / "imported"), base_cfg, v)
    c.init_from = str(tmp_path / "imported")
    c.model.update(dict(lora_rank=4, lora_alpha=8.0, lora_targets=r"layers/attn/(q|v)_proj"))
    out = run(c)
    assert np.isfinite(out["loss"])
    printed = capsys.readouterr().out
    assert "LoRA r=4 on layers/attn/q_proj, layers/attn/v_proj; base weights frozen" in printed
    ck = Checkpointer(str(tmp_path / "run" / "checkpoints"), 3, 1, False)
    trained = ck.manager.restore(3)["params"]
    flat, imported = flatten_dict(trained), flatten_dict(v["params"])
    assert {k for k in flat if k[-1] in lora.LORA_NAMES} == {
        (f"layers_{i}", "attn", p, n) for i in range(2) for p in ("q_proj", "v_proj")
        for n in lora.LORA_NAMES}
    for k, x in flat.items():
        if k[-1] == "lora_b":
            assert np.abs(np.asarray(x)).max() > 0, k
        elif k[-1] != "lora_a":
            np.testing.assert_array_equal(np.asarray(x), np.asarray(imported[k]), err_msg=str(k))
    # The trained adapted model -> model.hf Orbax -> `export` (merged) -> transformers.
    cfg = ModelConfig.from_dict(json.load(open(tmp_path / "imported" / "model_config.json")))
    cfg = cfg.replace(lora_rank=4, lora_alpha=8.0, lora_targets=r"layers/attn/(q|v)_proj")
    write_orbax(str(tmp_path / "adapted"), cfg, {"params": trained})
    assert read_orbax(str(tmp_path / "adapted"))[0] == cfg
    assert cli(["export", str(tmp_path / "adapted"), str(tmp_path / "hf")]) == 0
    with open(tmp_path / "hf" / "config.json") as f:
        assert not any("lora" in k for k in json.load(f))
    m = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), dtype=torch.float32, attn_implementation="eager").eval()
    tokens = np.random.default_rng(0).integers(0, 257, (2, 12))
    ours = np.asarray(jit(Transformer(cfg).apply)({"params": trained}, jnp.asarray(tokens))[0])
    with torch.no_grad():
        theirs = m(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # The trained adapters matter: the base weights alone give other logits.
    base_logits = jit(Transformer(lora.base_config(cfg)).apply)(
        {"params": _strip(trained)}, jnp.asarray(tokens))[0]
    assert np.abs(np.asarray(base_logits) - ours).max() > 1e-3


def test_init_from_an_adapted_checkpoint_merges_its_adapters(tmp_path, make_model, jit):
    """`load_init_from` of a checkpoint that has adapters (rank 4 on q, v) into a run with
    other adapters (rank 2, default targets): the checkpoint's adapters are merged into its
    kernels, the run's adapters stay fresh (B = 0), so the run starts from the checkpoint's
    adapted function."""
    from model.hf.checkpoint import write_orbax
    from train import setup

    saved = GQA.replace(lora_targets=r"layers/attn/(q|v)_proj")
    _, v, fwd = make_model(saved, seed=6, gain=1.0)
    write_orbax(str(tmp_path / "ckpt"), saved, nn.unbox(v))
    cfg = GQA.replace(lora_rank=2)
    mesh = make_mesh({}, devices=jax.devices()[:1])
    model = Transformer(cfg, mesh=mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        tx, _ = setup.build_optimizer(_optim_config(), setup.abstract_params(model, 8))
        state = setup.load_init_from(str(tmp_path / "ckpt"), setup.init_state(
            model, tx, mesh, 0, 8), mesh)
    flat = flatten_dict(state.params)
    assert {k[:-1] for k in flat if k[-1] == "lora_b"} == {
        (f"layers_{i}", m, p) for i in range(2) for m, ps in
        (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj",
                                                                      "down_proj"))) for p in ps}
    assert all(not np.any(np.asarray(x)) for k, x in flat.items() if k[-1] == "lora_b")
    tokens = _tokens((2, 8), seed=7)
    ours = jit(Transformer(cfg).apply)({"params": state.params}, tokens)[0]
    np.testing.assert_allclose(np.asarray(ours), np.asarray(fwd(v, tokens)[0]),
                               rtol=1e-5, atol=1e-5)

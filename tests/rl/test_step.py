"""The RL step and loop: the 8-device sharded step equals the single-device step (metrics
and parameters), steps change the policy and keep the reference frozen, the sampler and
the training forward agree under the temperature convention, the held-out split and the
warm-up demonstrations, the loop (warm-up -> RL -> resume == uninterrupted ->
rl.generate), and the CLI error paths."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optim
from configs import rl_arith
from model import LOGICAL_RULES, ModelConfig
from model.sharding import logical_to_sharding, make_mesh
from rl import loop as rl_loop
from rl.step import (
    RLOptions,
    RLState,
    demo_batch,
    eval_prompts,
    make_rl_step,
    prompt_bucket,
    train_prompts,
)
from rl.tasks import Addition, decode
from train.errors import UserError
from train.qkclip import make_qk_clip_hook
from train.setup import model_config, opt_state_shardings

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# MLA + MoE (router biases move), QK-clip, KL to a reference, TIS, mu = 2 x 2 minibatches.
CFG = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2, ffn_dim=64, max_seq_len=16,
                  attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                  v_head_dim=8, q_lora_rank=12, n_routed_experts=4, n_shared_experts=1, top_k=2,
                  moe_ffn_dim=16, first_k_dense=1, capacity_factor=2.0, bias_update_rate=1e-2,
                  attn_max_logits=True)  # QK-clip needs them (the trainer sets this)
OPTS = RLOptions(n_prompts=8, group_size=4, max_new_tokens=4, temperature=0.8, beta=0.04,
                 tis=True, updates_per_batch=2, minibatches=2, holdout_modulus=10)


@dataclasses.dataclass(frozen=True)
class DigitFraction(Addition):
    """Addition prompts with a dense reward a random model already varies on: the
    fraction of generated tokens that are digits (so advantages are non-zero)."""

    def reward(self, completion, completion_mask, answer):
        m = completion_mask.astype(jnp.float32)
        digit = ((completion >= 48) & (completion <= 57)).astype(jnp.float32)
        return jnp.sum(digit * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def _optimizer(params):
    """AdamW from optim.build. eps = 1e-4 keeps the update Lipschitz in the gradient: with
    eps = 1e-8 an entry whose gradient is ~0 moves by ~ +-lr on float rounding alone, and
    sharded reductions round differently from unsharded ones."""
    c = optim.default_config()
    c.update(dict(name="adamw", lr=1e-3, eps=1e-4, schedule="constant", warmup_steps=0,
                  total_steps=8))
    return optim.build(c, params), optim.build_schedule(c)


def _state(model, variables, tx, mesh=None):
    """The initial RLState, sharded by logical axes on `mesh` like `train.setup.init_state`."""
    params, bias = variables["params"], variables["router_bias"]
    if mesh is not None:
        abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
        p_shard = logical_to_sharding(nn.get_partition_spec(abstract["params"]), mesh)
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params = jax.device_put(params, p_shard)
        bias = jax.device_put(bias, rep)
        o_shard = opt_state_shardings(tx, jax.eval_shape(tx.init, params), p_shard, rep)
        opt_state = jax.jit(tx.init, out_shardings=o_shard)(params)
        scalars = [jax.device_put(x, rep) for x in
                   (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0))]
    else:
        opt_state = tx.init(params)
        scalars = [jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), jax.random.PRNGKey(0)]
    ref = jax.tree.map(jnp.copy, {"params": params, "router_bias": bias})
    return RLState(step=scalars[0], params=params, opt_state=opt_state, router_bias=bias,
                   rng=scalars[2], bad_steps=scalars[1], ref=ref)


def _run_steps(jit, tiny, mesh=None, n_steps=2):
    model, variables = tiny(CFG, seed=1, gain=1.0)
    tx, schedule = _optimizer(variables["params"])
    step = make_rl_step(model, tx, DigitFraction(1, 2), OPTS, schedule,
                        make_qk_clip_hook(CFG, tau=5.0))
    state = _state(model, variables, tx, mesh)
    keys = [jax.random.PRNGKey(10 + i) for i in range(n_steps)]
    history = []
    if mesh is None:
        fn = jit(step)
        for k in keys:
            state, m = fn(state, k)
            history.append(jax.device_get(m))
        return state, history, variables
    shardings = jax.tree.map(lambda x: x.sharding, state)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        fn = jit(step, in_shardings=(shardings, rep), out_shardings=(shardings, None))
        for k in keys:
            state, m = fn(state, k)
            history.append(jax.device_get(m))
    return state, history, variables


def test_sharded_step_equals_single_device_and_learns(jit, tiny):
    single, m1, variables = _run_steps(jit, tiny)
    mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 2})
    sharded, m8, _ = _run_steps(jit, tiny, mesh)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded.params))
    for a, b in zip(m1, m8, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(np.asarray(a[k], np.float64), np.asarray(b[k], np.float64),
                                       rtol=1e-5, atol=1e-5, err_msg=k)
    for x, y in zip(jax.tree.leaves(single), jax.tree.leaves(sharded), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)

    # It learned something, and only the policy moved.
    last = m1[-1]
    assert int(single.step) == 2 and int(last["skipped"]) == 0
    assert 0 < float(last["reward_std"]) and float(last["adv_abs_mean"]) > 0.1
    assert float(last["approx_kl"]) > 0 and float(last["kl"]) > 0  # pi moved off pi_old / ref
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(single.params), jax.tree.leaves(variables["params"]), strict=True))
    assert moved > 1e-3
    for a, b in zip(jax.tree.leaves(single.ref["params"]),
                    jax.tree.leaves(variables["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    bias = jax.tree.leaves(single.router_bias)
    assert any(float(jnp.max(jnp.abs(x))) > 0 for x in bias)  # loss-free balancing ran
    # Temperature convention: the training forward of pi_T reproduces the sampler's logp.
    assert float(last["mismatch"]) < 1e-5
    assert 0 < float(last["response_len"]) <= OPTS.max_new_tokens


def test_heldout_split_and_demonstrations():
    task = Addition(1, 2)
    prompts, lens, ans = jax.jit(lambda k: train_prompts(task, k, 512, 10))(jax.random.PRNGKey(0))
    assert not np.any(np.asarray(prompt_bucket(prompts, 10)) == 0)
    p, ln, a = eval_prompts(task, 7, 64, 10)
    assert np.all(prompt_bucket(p, 10) == 0)  # numpy hash == the in-graph one
    np.testing.assert_array_equal(prompt_bucket(p, 10), np.asarray(prompt_bucket(jnp.asarray(p), 10)))
    assert len(np.unique(p, axis=0)) == 64
    train_set = {decode(r, n) for r, n in zip(np.asarray(prompts), np.asarray(lens), strict=True)}
    assert not train_set & {decode(r, n) for r, n in zip(p, ln, strict=True)}

    b = jax.device_get(demo_batch(task, jax.random.PRNGKey(3), 16, 4, 10))
    for i in range(16):
        text = decode(b["inputs"][i], mask=b["inputs"][i] != 256)
        x, y = text.split("=")[0].split("+")
        inputs, tgt, m = b["inputs"][i], b["targets"][i], b["mask"][i].astype(bool)
        answer = str(int(x) + int(y))
        assert bytes(tgt[m][:-1].tolist()).decode() == answer and tgt[m][-1] == 256
        first = np.flatnonzero(m)[0]  # the first answer token is predicted at "="
        assert inputs[first] == ord("=") and decode(inputs, first + 1) == f"{x}+{y}="


def test_options_errors_and_dapo_defaults():
    with pytest.raises(ValueError, match="minibatches"):
        RLOptions(n_prompts=6, minibatches=4)
    with pytest.raises(ValueError, match="loss"):
        RLOptions(loss="ppo")
    c = rl_arith.get_config()
    c.rl.loss = "dapo"
    o = rl_loop.make_options(c.rl, Addition(1, 2))
    assert o.dynamic_sampling and o.overlong_cache_len == 1 and o.normalize_adv_std
    c.rl.loss = "dr_grpo"
    assert not rl_loop.make_options(c.rl, Addition(1, 2)).normalize_adv_std


def _loop_config(workdir):
    c = rl_arith.get_config()
    c.workdir = str(workdir)
    c.model.update(dict(d_model=32, n_layers=1, n_heads=2, ffn_dim=64))
    c.mesh.data = -1  # 8 devices
    c.rl.update(dict(n_prompts=4, group_size=4, warmup_steps=10, warmup_batch_size=16,
                     warmup_lr=1e-2, eval_prompts=16, eval_every=5, warmup_target_accuracy=0.9,
                     prompt_pool=24, throughput_every=2))
    c.rl.curriculum.enabled = True
    c.rl.tasks.addition.format_reward = 0.5  # "digits then EOS" already varies after warm-up
    c.optim.lr = 1e-3
    c.optim.schedule = "constant"  # 3 RL steps: shorter than the config's 20-update ramp
    c.train.update(dict(steps=3, log_every=1, progress=False))
    c.checkpoint.update(dict(every=1, keep=10, async_save=False))
    return c


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_loop_warmup_rl_resume_and_generate(tmp_path, capsys):
    work = tmp_path / "run"
    c = _loop_config(work)
    last = rl_loop.run(c)
    rows = _rows(work)
    warm = _rows(work / "warmup")
    assert sorted(rows) == [0, 1, 2, 3] and last["step"] == 3
    assert sorted(warm) == list(range(1, 11)) and warm[10]["loss"] < warm[1]["loss"]
    assert "eval_accuracy" in warm[5] and "train_accuracy" in warm[10]
    assert "eval_accuracy" in rows[0] and "eval_accuracy" in rows[3]
    for k in ("reward_mean", "reward_std", "accuracy", "response_len", "clip_frac", "kl",
              "entropy", "mismatch", "lr"):
        assert k in rows[3], k
    assert rows[3]["reward_std"] > 0
    # Throughput (phases timed at RL step 2, the first after the compiling one) and the
    # curriculum over the pool of 24 prompts (4 per step).
    for k in ("mfu", "step_s", "sampling_frac", "rollout_tokens_per_s", "update_tokens_per_s",
              "curriculum/chosen_pass_rate", "curriculum/seen_frac"):
        assert k in rows[3], k
    assert 0 < rows[3]["sampling_frac"] < 1 and rows[3]["mfu"] > 0
    assert "sampling_frac" not in rows[1]
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    cur_abstract = {"curriculum": {
        "pass_rate": jax.ShapeDtypeStruct((24,), jnp.float32, sharding=one),
        "count": jax.ShapeDtypeStruct((24,), jnp.int32, sharding=one)}}
    cur3 = rl_loop.restore_variables(str(work), cur_abstract)["curriculum"]
    assert int(np.sum(cur3["count"])) == 3 * 4
    # The policy moved between RL step 0 and 3.
    abstract = {"params": jax.eval_shape(
        lambda: nn.unbox(rl_loop.Transformer(model_config(c)).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))["params"])}
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
        s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), abstract)
    p0 = rl_loop.restore_variables(str(work), abstract, step=0)
    p3 = rl_loop.restore_variables(str(work), abstract)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(p0), jax.tree.leaves(p3), strict=True))
    assert diff > 1e-5

    # Kill after step 2 (drop checkpoint 3): the same command resumes and redoes step 3.
    shutil.rmtree(work / "checkpoints" / "3")
    rl_loop.run(c)
    again = _rows(work)
    assert sorted(again) == [0, 1, 2, 3]
    timing = ("step_s", "samples_per_s", "mfu", "sampling_frac", "rollout_tokens_per_s",
              "update_tokens_per_s")
    for k, v in rows[3].items():
        if k not in timing:
            np.testing.assert_allclose(again[3][k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    # The curriculum state was restored from step 2 and stepped again, bit for bit.
    cur3_again = rl_loop.restore_variables(str(work), cur_abstract)["curriculum"]
    for k in ("pass_rate", "count"):
        np.testing.assert_array_equal(cur3_again[k], cur3[k])

    # The same size of pool but other prompts (another seed draws it): refused before
    # anything is written, config.json kept.
    saved_config = (work / "config.json").read_text()
    other = _loop_config(work)
    other.seed = int(c.seed) + 1
    with pytest.raises(UserError, match="prompt pool differs"):
        rl_loop.run(other)
    assert (work / "config.json").read_text() == saved_config
    assert sorted(_rows(work)) == [0, 1, 2, 3]

    from rl.generate import main as generate_main

    capsys.readouterr()
    generate_main(["--workdir", str(work), "--prompt", "12+34=", "--prompt", "5+5=",
                   "--max-new-tokens", "4", "--temperature", "0"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0].startswith("12+34=") and out[1].startswith("5+5=")


def _cli(module, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module, override, needle", [
    ("rl", "--config.rl.losss=grpo", "losss"),
    ("rl", "--config.rl.loss=ppo", "config.rl.loss"),
    ("train", "--config.rl.task=nope", "config.rl.task"),
    ("train", "--config.rl.n_prompts=6", "minibatches"),
])
def test_cli_bad_rl_config_is_one_line_error(tmp_path, module, override, needle):
    work = tmp_path / "w"
    extra = ["--config.rl.minibatches=4"] if "n_prompts" in override else []
    r = _cli(module, "--config", "configs/rl_arith.py", f"--config.workdir={work}", override, *extra)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and needle in lines[-1], r.stderr
    assert "Traceback" not in r.stderr and not work.exists()


def test_python_m_rl_refuses_a_pretraining_config():
    r = _cli("rl", "--config", "configs/tiny.py")
    assert r.returncode == 2 and "job" in r.stderr and "Traceback" not in r.stderr

"""rl.curriculum: the running pass-rate estimate against the formula computed by hand, the
selection keeps the candidates closest to the target, prompt pools stay in the training
split, config errors. The RL job with a pool + curriculum (metrics, bitwise resume of the
curriculum state) is tested in test_step.py's loop test."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import rl_arith
from rl import loop as rl_loop
from rl.curriculum import (
    CurriculumOptions,
    PromptPool,
    init_curriculum,
    pool_fingerprint,
    predicted_pass_rate,
    select_prompts,
    update_curriculum,
)
from rl.step import prompt_bucket
from rl.tasks import Addition
from train.errors import UserError


def test_update_is_first_value_then_ema():
    opts = CurriculumOptions(ema=0.25)
    s = init_curriculum(5)
    s = update_curriculum(s, jnp.asarray([1, 3]), jnp.asarray([0.5, 1.0]), opts)
    np.testing.assert_array_equal(s["count"], [0, 1, 0, 1, 0])
    np.testing.assert_allclose(s["pass_rate"], [0, 0.5, 0, 1.0, 0])
    s = update_curriculum(s, jnp.asarray([3, 4]), jnp.asarray([0.0, 0.25]), opts)
    # prompt 3: 1.0 + 0.25 * (0.0 - 1.0) = 0.75; prompt 4 first seen: 0.25
    np.testing.assert_allclose(s["pass_rate"], [0, 0.5, 0, 0.75, 0.25])
    np.testing.assert_array_equal(s["count"], [0, 1, 0, 2, 1])
    # unseen prompts: the mean over the seen ones (0.5 + 0.75 + 0.25) / 3, or the prior
    np.testing.assert_allclose(predicted_pass_rate(s, None), [0.5, 0.5, 0.5, 0.75, 0.25])
    np.testing.assert_allclose(predicted_pass_rate(s, 0.1), [0.1, 0.5, 0.1, 0.75, 0.25])
    np.testing.assert_allclose(predicted_pass_rate(init_curriculum(3), None), [0.5] * 3)


def test_selection_keeps_candidates_closest_to_target():
    pool = 64
    rates = np.random.default_rng(0).uniform(0, 1, pool).astype(np.float32)  # no ties
    s = {"pass_rate": jnp.asarray(rates), "count": jnp.ones((pool,), jnp.int32)}
    opts = CurriculumOptions(candidates=4, target=0.5)
    for seed in range(5):
        key = jax.random.PRNGKey(seed)
        idx, m = select_prompts(s, key, 8, opts)
        idx = np.asarray(idx)
        assert len(set(idx.tolist())) == 8
        # The candidates are the same draw the function makes: recompute them.
        cand = np.asarray(jax.random.choice(jax.random.split(key)[0], pool, (32,), replace=False))
        best = cand[np.argsort(np.abs(rates[cand] - 0.5), kind="stable")[:8]]
        assert set(idx.tolist()) == set(best.tolist())
        np.testing.assert_allclose(m["curriculum/chosen_pass_rate"], rates[idx].mean(), rtol=1e-6)
    # candidates=1: no choice, a uniform draw; the whole pool when it is smaller
    idx, _ = select_prompts(s, jax.random.PRNGKey(0), pool, CurriculumOptions(candidates=3))
    assert sorted(np.asarray(idx).tolist()) == list(range(pool))
    with pytest.raises(ValueError, match="fewer"):
        select_prompts(s, jax.random.PRNGKey(0), pool + 1, opts)


def test_options_errors():
    for bad in (dict(candidates=0), dict(target=1.5), dict(ema=0.0), dict(prior=-0.1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CurriculumOptions(**bad)


def test_pool_is_distinct_training_prompts():
    task = Addition(1, 2)
    pool = PromptPool.from_task(task, 200, seed=0, modulus=10)
    assert pool.pool_size == 200 and pool.prompt_width == task.prompt_width
    assert len(np.unique(pool.prompts, axis=0)) == 200
    assert np.all(prompt_bucket(pool.prompts, 10) != 0)
    p, lens, ans = jax.jit(pool.prompts_at)(jnp.asarray([3, 7]))
    np.testing.assert_array_equal(p, pool.prompts[[3, 7]])
    np.testing.assert_array_equal(ans["target"], pool.answer["target"][[3, 7]])
    assert pool.stop_ids == task.stop_ids and pool.pad_id == task.pad_id
    with pytest.raises(ValueError, match="distinct"):
        PromptPool.from_task(Addition(1, 1), 200, seed=0)  # 100 one-digit sums


def _config(workdir, steps):
    c = rl_arith.get_config()
    c.workdir = str(workdir)
    c.model.update(dict(d_model=32, n_layers=1, n_heads=2, ffn_dim=64))
    c.rl.update(dict(n_prompts=4, group_size=4, warmup_steps=0, eval_prompts=16, eval_every=0,
                     prompt_pool=24, throughput_every=2))
    c.rl.curriculum.enabled = True
    c.rl.tasks.addition.format_reward = 0.5
    c.optim.lr = 3e-3
    c.train.update(dict(steps=steps, log_every=1, progress=False))
    c.checkpoint.update(dict(every=1, keep=10, async_save=False))
    return c


def test_curriculum_needs_a_pool(tmp_path):
    c = _config(tmp_path / "w", 1)
    c.rl.prompt_pool = 0
    with pytest.raises(UserError, match="prompt_pool"):
        rl_loop.run(c)
    c.rl.prompt_pool = 2
    with pytest.raises(UserError, match="n_prompts"):
        rl_loop.run(c)
    assert not (tmp_path / "w").exists()


def test_experiment_arms_and_summary(tmp_path):
    """rl.curriculum_experiment: the two arms differ only in the curriculum switch (and the
    curriculum arm starts from the uniform arm's warm-up); rollouts-to-target and the figure
    from metric rows written by hand."""
    from configs import rl_curriculum
    from rl import curriculum_experiment as ce

    base = rl_curriculum.get_config()
    arms = ce.arm_configs(base, str(tmp_path))
    u, c = arms["uniform"], arms["curriculum"]
    assert not u.rl.curriculum.enabled and c.rl.curriculum.enabled
    assert int(u.rl.warmup_steps) > 0 and int(c.rl.warmup_steps) == 0
    assert c.rl.init_from == os.path.join(u.workdir, "warmup")
    diff = {k for k in u.rl.keys() if u.rl[k] != c.rl[k]}
    assert diff == {"curriculum", "warmup_steps", "init_from"}

    per_step = 4
    for arm, accs in (("uniform", [0.1, 0.2, 0.3, 0.5]), ("curriculum", [0.1, 0.4, 0.6, 0.7])):
        os.makedirs(arms[arm].workdir)
        with open(os.path.join(arms[arm].workdir, "metrics.jsonl"), "w") as f:
            for i, a in enumerate(accs):
                f.write(json.dumps({"step": 10 * i, "eval_accuracy": a}) + "\n")
                f.write(json.dumps({"step": 10 * i + 1, "groups_informative": a / 2}) + "\n")
    curves = {arm: ce.curve(arms[arm].workdir, per_step) for arm in ce.ARMS}
    assert curves["uniform"]["rollouts"] == [0, 40, 80, 120]
    s = ce.summarize(curves, 0.5)
    assert s["uniform"]["rollouts_to_target"] == 120
    assert s["curriculum"]["rollouts_to_target"] == 80 and s["rollout_ratio"] == 1.5
    assert s["curriculum"]["best_accuracy"] == 0.7
    assert ce.summarize(curves, 0.9)["rollout_ratio"] is None
    assert ce._running_mean([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    ce.figure(curves, s, str(tmp_path / "f.png"), "t")
    assert (tmp_path / "f.png").stat().st_size > 0


def test_pool_fingerprint_is_kept_and_tells_pools_apart():
    p = np.arange(12, dtype=np.int32).reshape(4, 3)
    f = pool_fingerprint(p)
    assert f == pool_fingerprint(p.copy()) and 0 <= f < 2**31
    assert f != pool_fingerprint(p[::-1]) and f != pool_fingerprint(p + (p == 5))
    s = init_curriculum(4, f)
    s = update_curriculum(s, jnp.asarray([1]), jnp.asarray([0.5]), CurriculumOptions())
    assert int(s["pool"]) == f

"""`rl.pipeline`: the demonstrations avoid the held-out prompts and match the task's
layout; pairs are built from correct vs incorrect samples; `--quick` runs SFT ->
preference -> RL, each stage from the previous stage's workdir, and writes the summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rl.pipeline import addition_demos, preference_pairs, run_pipeline
from rl.step import eval_prompts, prompt_bucket
from rl.tasks import Addition, decode
from train.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demos_are_the_training_split_in_the_tasks_layout():
    task = Addition(min_digits=2, max_digits=2)
    demos = addition_demos(task, 10)
    assert 0.85 * 8100 < len(demos) < 0.95 * 8100  # 1/10 of 90 x 90 problems held out
    assert all(str(eval(p[:-1])) == c for p, c in demos[:50])  # noqa: S307 (a+b)
    prompts, lens, _ = eval_prompts(task, 1234, 256, 10)
    held = {decode(p, int(n)) for p, n in zip(prompts, lens, strict=True)}
    assert not held & {p for p, _ in demos}
    # Same tokens as the task samples: its held-out prompts hash to bucket 0 as ours do.
    p, n, _ = jax.device_get(task.sample_prompts(jax.random.PRNGKey(0), 64))
    ours = {q for q, _ in demos}
    for row, k, b in zip(np.asarray(p), n, prompt_bucket(np.asarray(p), 10), strict=True):
        assert (decode(row, int(k)) in ours) == (b != 0)


def test_pairs_are_correct_vs_incorrect_of_one_prompt():
    completions = [["85", "84", "85", ""], ["1", "2"], ["7", "7"], ["3", "4"]]
    correct = [[1, 0, 1, 0], [0, 0], [1, 1], [0, 1]]
    pairs, demo = preference_pairs(["47+38=", "a", "b", "c"], ["85", "9", "7", "4"],
                                   completions, correct)
    assert pairs == [{"prompt": "47+38=", "chosen": "85", "rejected": "84"},
                     {"prompt": "c", "chosen": "4", "rejected": "3"}] and demo == 0
    pairs, demo = preference_pairs(["a"], ["9"], [["1", "2"]], np.zeros((1, 2), bool),
                                   demo_chosen=True)
    assert pairs == [{"prompt": "a", "chosen": "9", "rejected": "1"}] and demo == 1


def test_quick_pipeline_chains_the_workdirs(tmp_path):
    """`python -m rl.pipeline --quick` (one CPU device: the 8 fake ones of the tests would
    only slow the compiles down)."""
    root = str(tmp_path / "p")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.run([sys.executable, "-m", "rl.pipeline", "--workdir", root, "--quick",
                           "--no-compare"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(root, "summary.json")) as f:
        s = json.load(f)
    stages = {r["stage"]: r for r in s["stages"]}
    assert list(stages) == ["sft", "preference", "rl"]
    assert stages["sft"]["init_from"] == ""
    assert stages["preference"]["init_from"] == stages["sft"]["workdir"]
    assert stages["rl"]["init_from"] == stages["preference"]["workdir"]
    for name, r in stages.items():
        with open(os.path.join(r["workdir"], "config.json")) as f:
            saved = json.load(f)
        assert saved["job"] == name and saved["init_from"] == r["init_from"]
        assert os.listdir(os.path.join(r["workdir"], "checkpoints"))
        assert 0.0 <= r["eval_accuracy"] <= 1.0
    # The RL run starts from the preference model: its logged step-0 accuracy (the RL
    # evaluator, same prompts) is what the pipeline measured for the preference stage.
    assert stages["rl"]["curve"][0] == [0, pytest.approx(stages["preference"]["eval_accuracy"])]
    assert s["pairs"]["pairs"] > 0 and s["demonstrations"] > 7000
    assert os.path.getsize(os.path.join(root, "pipeline.png")) > 0
    with pytest.raises(UserError, match="already holds a pipeline"):
        run_pipeline(root, quick=True)

"""`kill -9` at an arbitrary moment, then the same command again: the loss curve equals an
uninterrupted run's (bitwise on CPU with the same mesh)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ARGS = [
    "--config.train.steps=14", "--config.train.log_every=1", "--config.train.eval_every=0",
    "--config.checkpoint.every=3",
    "--config.optim.total_steps=14", "--config.optim.warmup_steps=2",
    "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.expert=2",
]


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def test_kill_9_then_rerun_matches_uninterrupted(tmp_path, tiny_args, cpu_env, root):
    args = tiny_args + ARGS
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, "-m", "train", *args, f"--config.workdir={ref}"],
                       cwd=root, env=cpu_env(8), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    work = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "train", *args, f"--config.workdir={work}"],
                         cwd=root, env=cpu_env(8), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    metrics = work / "metrics.jsonl"
    deadline = time.time() + 600
    # Kill between checkpoints: after step 7 is logged (checkpoint 6 exists, 9 does not yet).
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 7:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    r = subprocess.run([sys.executable, "-m", "train", *args, f"--config.workdir={work}"],
                       cwd=root, env=cpu_env(8), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert _losses(work) == _losses(ref)

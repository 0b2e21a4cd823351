"""`kill -9` at an arbitrary moment, then the same command again: the loss curve equals an
uninterrupted run's (bitwise on CPU with the same mesh)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARGS = [
    "--config", "configs/tiny.py",
    "--config.model.d_model=48", "--config.model.n_layers=2", "--config.model.n_heads=2",
    "--config.model.q_lora_rank=0", "--config.model.kv_lora_rank=16",
    "--config.model.qk_nope_head_dim=16", "--config.model.qk_rope_head_dim=8",
    "--config.model.v_head_dim=16", "--config.model.ffn_dim=96",
    "--config.model.n_routed_experts=4", "--config.model.moe_ffn_dim=32",
    "--config.model.max_seq_len=64",
    "--config.data.max_files=40", "--config.data.seq_len=32", "--config.data.batch_size=8",
    "--config.train.steps=14", "--config.train.log_every=1", "--config.train.eval_every=0",
    "--config.train.progress=False", "--config.checkpoint.every=3",
    "--config.optim.total_steps=14", "--config.optim.warmup_steps=2",
    "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.expert=2",
]


def _env() -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
                JAX_PLATFORMS="cpu")


def _losses(workdir) -> dict[int, float]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def test_kill_9_then_rerun_matches_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    r = subprocess.run([sys.executable, "-m", "train", *ARGS, f"--config.workdir={ref}"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    work = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "train", *ARGS, f"--config.workdir={work}"],
                         cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
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
    r = subprocess.run([sys.executable, "-m", "train", *ARGS, f"--config.workdir={work}"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    assert _losses(work) == _losses(ref)

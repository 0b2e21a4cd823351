"""2 processes x 4 CPU devices on localhost train exactly like 1 process x 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np

STEPS = [
    "--config.train.steps=6", "--config.train.log_every=2", "--config.train.eval_every=6",
    "--config.train.eval_batches=1",
    "--config.optim.total_steps=16", "--config.optim.warmup_steps=2",
    "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.expert=2",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_processes_match_one(tmp_path, tiny_args, cpu_env, root):
    common = tiny_args + STEPS
    single = tmp_path / "single"
    r = subprocess.run([sys.executable, "-m", "train", *common, f"--config.workdir={single}"],
                       cwd=root, env=cpu_env(8), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    multi = tmp_path / "multi"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "train", *common, f"--config.workdir={multi}",
             f"--config.distributed.coordinator_address=127.0.0.1:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
            cwd=root, env=cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "8 cpu device(s)" in outs[0][0]
    a, b = _metrics(single), _metrics(multi)
    assert [x["step"] for x in a] == [x["step"] for x in b] == [2, 4, 6]
    np.testing.assert_allclose([x["loss"] for x in a], [x["loss"] for x in b], rtol=1e-5)
    np.testing.assert_allclose(a[-1]["eval_loss"], b[-1]["eval_loss"], rtol=1e-5)

    # The checkpoint saved on 8 devices restores onto 4 (another mesh) and training goes on.
    args = [x for x in common if not x.startswith(("--config.train.steps", "--config.mesh"))]
    r = subprocess.run(
        [sys.executable, "-m", "train", *args, f"--config.workdir={single}",
         "--config.train.steps=8", "--config.mesh.data=2", "--config.mesh.fsdp=2"],
        cwd=root, env=cpu_env(4), capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "4 cpu device(s)" in r.stdout
    c = _metrics(single)
    assert [x["step"] for x in c] == [2, 4, 6, 8]
    assert np.isfinite(c[-1]["loss"]) and c[-1]["loss"] < c[0]["loss"]

"""`python -m train` error paths: one line naming the problem, exit code 2, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "train", *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize(
    "override, needle",
    [
        ("--config.optim.lrr=3", "lrr"),
        ("--config.model.top_k=99", "top_k"),
        ("--config.model.d_model=abc", "d_model"),
        ("--config.data.source=nowhere", "config.data.source"),
    ],
)
def test_bad_config_is_one_line_error(tmp_path, override, needle):
    work = tmp_path / "w"
    r = run_cli("--config", "configs/tiny.py", f"--config.workdir={work}", override)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and needle in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert not work.exists()


def test_missing_config_file(tmp_path):
    r = run_cli("--config", "configs/does_not_exist.py")
    assert r.returncode == 2
    assert "does_not_exist.py" in r.stderr and "Traceback" not in r.stderr

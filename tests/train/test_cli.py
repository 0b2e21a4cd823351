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


def test_user_error_inside_a_host_callback_is_one_line(capsys):
    """A `UserError` raised by a host callback inside a compiled step (a verifier's reward)
    is printed as its one `error:` line, exit 2; another callback failure stays a bug."""
    import jax
    import jax.numpy as jnp

    from train.cli import user_errors
    from train.errors import UserError

    def host(x):
        raise UserError("verifier f returned nan for the record at a.jsonl:3: rewards must be "
                        "finite")

    f = jax.jit(lambda x: jax.pure_callback(host, jax.ShapeDtypeStruct((2,), jnp.float32), x))
    with pytest.raises(SystemExit) as e, user_errors():
        jax.block_until_ready(f(jnp.zeros(2)))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: verifier f returned nan for the record at a.jsonl:3: rewards must be "
                   "finite"]

    def buggy(x):
        raise ZeroDivisionError("a bug")

    g = jax.jit(lambda x: jax.pure_callback(buggy, jax.ShapeDtypeStruct((2,), jnp.float32), x))
    with pytest.raises(jax.errors.JaxRuntimeError, match="ZeroDivisionError"), user_errors():
        jax.block_until_ready(g(jnp.zeros(2)))

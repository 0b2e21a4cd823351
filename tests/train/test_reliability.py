"""What users and clusters do to a run, through the real command line: corrupt checkpoints,
two runs on one workdir, preemption, kill -9 before the first checkpoint, reruns of a
finished run, and bad command lines. Each case checks the exit code, the one `error:` line
and that no file was lost. One tiny run's checkpoints are reused across cases (copied)."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

_spec = importlib.util.spec_from_file_location(
    "_train_conftest", os.path.join(os.path.dirname(__file__), "conftest.py"))
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
ROOT, TINY = _conftest.ROOT, list(_conftest.TINY_MODEL_ARGS)

ARGS = ["--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.checkpoint.every=4", "--config.checkpoint.async_save=False",
        "--config.optim.warmup_steps=2", "--config.mesh.data=1"]
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
           JAX_PLATFORMS="cpu")


def _cmd(workdir, *extra, steps=8):
    return [sys.executable, "-m", "train", *TINY, *ARGS, f"--config.workdir={workdir}",
            f"--config.train.steps={steps}", f"--config.optim.total_steps={max(steps, 8)}",
            *extra]


def _train(workdir, *extra, steps=8):
    return subprocess.run(_cmd(workdir, *extra, steps=steps), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def _error_line(r, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return lines[-1]


def _tree(d) -> dict[str, int]:
    return {os.path.relpath(p, d): os.path.getsize(p)
            for p in glob.glob(os.path.join(d, "**"), recursive=True) if os.path.isfile(p)}


def _rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 8-step run with checkpoints 4 and 8 (one CPU device)."""
    work = tmp_path_factory.mktemp("base") / "run"
    r = _train(work)
    assert r.returncode == 0, r.stderr[-3000:]
    return work


@pytest.fixture
def run_copy(base_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


def test_flipped_bytes_in_the_latest_checkpoint_are_reported_never_resumed(run_copy):
    files = [p for p in glob.glob(str(run_copy / "checkpoints" / "8" / "default" / "**"),
                                  recursive=True)
             if os.path.isfile(p) and os.sep + "d" + os.sep in p]
    big = max(files, key=os.path.getsize)
    data = bytearray(open(big, "rb").read())
    for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0xFF
    open(big, "wb").write(bytes(data))
    before = _tree(run_copy / "checkpoints")
    line = _error_line(_train(run_copy, steps=12))
    assert "step 8" in line and ("corrupt" in line or "cannot restore" in line), line
    assert "Earlier checkpoints: 4" in line and "restore_step=4" in line, line
    assert _tree(run_copy / "checkpoints") == before  # nothing deleted or rewritten

    # Explicitly from the earlier step: step 8 is set aside (kept), the run goes on.
    r = _train(run_copy, "--config.checkpoint.restore_step=4", steps=12)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 4" in r.stdout
    assert (run_copy / "checkpoints" / "8.set-aside").is_dir()
    assert [x["step"] for x in _rows(run_copy)] == list(range(1, 13))


def test_tampered_fingerprint_names_the_array(run_copy):
    path = run_copy / "checkpoints" / "8" / "fingerprints.json"
    fps = json.loads(path.read_text())
    key = next(k for k in fps if k.startswith("params/"))
    fps[key][0] ^= 1
    path.write_text(json.dumps(fps))
    line = _error_line(_train(run_copy, steps=12))
    assert "corrupt" in line and key in line and "restore_step=4" in line, line


def test_second_run_on_a_live_workdir_refuses_and_a_killed_holder_is_taken_over(tmp_path):
    work = tmp_path / "run"
    p = subprocess.Popen(_cmd(work, steps=5000), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        metrics = work / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and p.poll() is None and not (
                metrics.exists() and metrics.stat().st_size > 0):
            time.sleep(0.05)
        assert p.poll() is None, p.communicate()[1][-3000:]
        line = _error_line(_train(work, steps=5000))
        assert "in use by another run" in line and f"pid {p.pid}" in line, line

        # SIGTERM: saved, exit 75 (preempted, rerun to resume), lock released.
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=300)
        assert p.returncode == 75, err[-3000:]
        assert "preempted: received SIGTERM: saved step" in err and "Traceback" not in err
    finally:
        if p.poll() is None:
            p.kill()
    saved = max(int(d) for d in os.listdir(work / "checkpoints") if d.isdigit())
    assert saved == _rows(work)[-1]["step"]

    # kill -9 leaves the lock file's text behind but not the lock: the next run takes over.
    p = subprocess.Popen(_cmd(work, steps=5000), cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and len(_rows(work)) <= saved + 1:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    r = _train(work, steps=saved + 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "taking over" in r.stdout and "resumed from" in r.stdout


def test_rerun_of_a_finished_run_is_a_no_op(run_copy):
    final = (run_copy / "final_metrics.json").read_text()
    rows = _rows(run_copy)
    r = _train(run_copy)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nothing to do" in r.stdout
    assert (run_copy / "final_metrics.json").read_text() == final
    assert _rows(run_copy) == rows


def test_rows_of_a_run_killed_before_its_first_checkpoint_are_set_aside(tmp_path):
    work = tmp_path / "run"
    work.mkdir()
    (work / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 9.0}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    r = _train(work, steps=3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["step"] for x in _rows(work)] == [1, 2, 3]
    assert all(x["loss"] != 9.0 for x in _rows(work))
    assert len((work / "metrics.jsonl.stale").read_text().splitlines()) == 4


@pytest.mark.parametrize("case", ["syntax", "no_config", "workdir_is_file"])
def test_bad_command_lines_are_one_line_errors(tmp_path, case):
    env = ENV
    if case == "syntax":
        bad = tmp_path / "bad.py"
        bad.write_text("def get_config(:\n    pass\n")
        cmd = [sys.executable, "-m", "train", "--config", str(bad)]
        needle = "syntax error"
    elif case == "no_config":
        cmd = [sys.executable, "-m", "train", "--config.train.steps=3"]
        needle = "--config is required"
    else:
        f = tmp_path / "file"
        f.write_text("not a directory")
        cmd = _cmd(f / "sub")
        needle = "cannot be created"
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    line = _error_line(r)
    assert line.startswith("error:") and needle in line, line


@pytest.mark.parametrize("damage", ["changed_shape", "deleted_file", "empty_step_dir",
                                    "missing_manifest"])
def test_damaged_or_foreign_checkpoints_are_one_line_errors(run_copy, damage):
    ckpts = run_copy / "checkpoints"
    extra = []
    if damage == "changed_shape":
        extra = ["--config.model.d_model=64"]
    elif damage == "deleted_file":
        files = [p for p in glob.glob(str(ckpts / "8" / "default" / "**"), recursive=True)
                 if os.path.isfile(p) and os.sep + "d" + os.sep in p]
        os.remove(max(files, key=os.path.getsize))
    elif damage == "empty_step_dir":
        (ckpts / "12").mkdir()  # a save that died before writing anything
    else:
        os.remove(ckpts / "8" / "default" / "_METADATA")
        os.remove(ckpts / "8" / "default" / "manifest.ocdbt")
    before = _tree(ckpts)
    r = _train(run_copy, *extra, steps=16)
    if damage == "empty_step_dir" and r.returncode == 0:
        # Orbax ignores a step directory without its commit marker: resumed from 8.
        assert "at step 8" in r.stdout
        return
    line = _error_line(r)
    assert line.startswith("error:") and "checkpoint" in line, line
    assert "Event loop is closed" not in r.stderr
    assert _tree(ckpts) == before

"""train.runner: the cadence predicate and the loop mechanics every job shares, with a fake
step (a counter state) so that only the runner is under test."""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
import pytest

from train.checkpoint import Checkpointer
from train.errors import Preempted, UserError
from train.metrics import MetricWriter, read_metrics
from train.runner import Cadence, Job, itstime, run_steps


class Counter(flax.struct.PyTreeNode):
    step: jnp.ndarray
    bad_steps: jnp.ndarray
    total: jnp.ndarray


def _state():
    return Counter(step=jnp.zeros((), jnp.int32), bad_steps=jnp.zeros((), jnp.int32),
                   total=jnp.zeros((), jnp.float32))


def _step(bad_from: int = 10**9):
    def step(s: Counter, i: int):
        bad = jnp.where(i + 1 >= bad_from, s.bad_steps + 1, 0)
        new = s.replace(step=s.step + 1, bad_steps=bad, total=s.total + i)
        return new, {"loss": jnp.float32(100.0 - i)}
    return step


def _run(tmp_path, job, cadence, preempted=None):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), cadence.checkpoint_every, keep=None,
                        async_save=False)
    return run_steps(_state(), job, cadence, ckpt, MetricWriter(str(tmp_path)),
                     preempted=preempted if preempted is not None else [], progress=False)


def test_itstime_every_n_and_the_last_never_when_zero():
    assert [s for s in range(1, 11) if itstime(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if itstime(s, 5, 10)] == [5, 10]
    assert not any(itstime(s, 0, 10) for s in range(1, 11))
    assert [s for s in range(1, 4) if itstime(s, 1, 3)] == [1, 2, 3]


def test_logs_evaluates_and_checkpoints_on_cadence(tmp_path):
    evaluated = []

    def evaluate(s):
        evaluated.append(int(s.step))
        return {"eval_loss": 1.0}

    job = Job(step=_step(), row=lambda m, n, dt: {**m, "n": n}, evaluate=evaluate)
    out = _run(tmp_path, job, Cadence(total=10, log_every=4, eval_every=3, checkpoint_every=5))
    rows = read_metrics(tmp_path)
    # Logged at log steps and eval steps; the throughput hook sees the steps since the last row.
    assert [r["step"] for r in rows] == [3, 4, 6, 8, 9, 10]
    assert [r["n"] for r in rows] == [3, 1, 2, 2, 1, 1]
    assert evaluated == [3, 6, 9, 10] and "eval_loss" not in rows[1]
    assert [r["loss"] for r in rows] == [98.0, 97.0, 95.0, 93.0, 92.0, 91.0]
    assert Checkpointer(str(tmp_path / "ckpt"), 1).all_steps() == [5, 10]
    assert out.last["step"] == 10 and int(out.state.step) == 10 and float(out.state.total) == 45
    assert not out.preempted and not out.finished


def test_resumes_from_the_states_step(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), 1, async_save=False)
    start = _state().replace(step=jnp.asarray(7, jnp.int32))
    seen = []

    def step(s, i):
        seen.append(i)
        return _step()(s, i)

    out = run_steps(start, Job(step=step), Cadence(total=9, log_every=1), ckpt,
                    MetricWriter(str(tmp_path)), preempted=[], progress=False)
    assert seen == [7, 8] and [r["step"] for r in read_metrics(tmp_path)] == [8, 9]
    assert out.last["step"] == 9


def test_bad_steps_abort_with_a_named_error_and_keep_checkpoints(tmp_path):
    job = Job(step=_step(bad_from=5))
    with pytest.raises(UserError, match="aborting at step 8: 4 steps in a row.*max_bad_steps"):
        _run(tmp_path, job, Cadence(total=20, log_every=4, checkpoint_every=2, max_bad_steps=3))
    assert Checkpointer(str(tmp_path / "ckpt"), 1).all_steps() == [2, 4, 6]


def test_preemption_saves_and_stops(tmp_path, capsys):
    flag: list[str] = []

    def step(s, i):
        if i == 2:
            flag.append("SIGTERM")  # as the signal handler does
        return _step()(s, i)

    with pytest.raises(Preempted, match="received SIGTERM: saved step 3; rerun"):
        _run(tmp_path, Job(step=step), Cadence(total=10, log_every=5, checkpoint_every=100),
             preempted=flag)
    assert Checkpointer(str(tmp_path / "ckpt"), 1).all_steps() == [3]


def test_a_finished_run_does_nothing(tmp_path, capsys):
    ckpt = Checkpointer(str(tmp_path / "ckpt"), 1, async_save=False)
    start = _state().replace(step=jnp.asarray(5, jnp.int32))
    out = run_steps(start, Job(step=_step()), Cadence(total=5), ckpt,
                    MetricWriter(str(tmp_path)), preempted=[], progress=False)
    assert out.last == {} and read_metrics(tmp_path) == []
    assert "nothing to do" in capsys.readouterr().out


def test_done_stops_early_after_a_saved_row(tmp_path):
    job = Job(step=_step(), done=lambda m: "low enough" if m["loss"] <= 96 else "")
    out = _run(tmp_path, job, Cadence(total=10, log_every=2, checkpoint_every=100))
    assert out.finished == "low enough" and out.last["step"] == 6
    assert Checkpointer(str(tmp_path / "ckpt"), 1).all_steps() == [6]


def test_a_nan_loss_is_logged_and_shown_not_a_crash(tmp_path):
    def step(s, i):
        return s.replace(step=s.step + 1), {"loss": jnp.float32(jnp.nan), "tok": 1234.5}

    job = Job(step=step, postfix={"loss": "loss", "tok_s": "tok"})
    out = _run(tmp_path, job, Cadence(total=2, log_every=1))
    assert [r["loss"] for r in read_metrics(tmp_path)] == ["nan", "nan"]
    assert out.last["tok"] == 1234.5

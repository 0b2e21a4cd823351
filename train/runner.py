"""The step runner: the loop mechanics every job shares, written once.

A job (pretraining, RL, the RL warm-up, ...) is setup plus one call of `run_steps`: it
supplies a jitted `step(state, i) -> (state, metrics)` and, optionally, how to evaluate,
what to add to a logged row and when to stop early; the runner owns the progress bar, the
log / eval / checkpoint cadence (one predicate, `itstime`), the preemption save, the
bad-step abort, the metric rows and the profiler window.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from train.checkpoint import Checkpointer
from train.errors import Preempted, UserError
from train.metrics import MetricWriter, to_python

Metrics = dict[str, Any]


def itstime(step: int, every: int, total: int) -> bool:
    """Every `every` steps and at the last one (`step` counts finished steps, 1-based);
    never when `every` <= 0 (big_vision's `itstime`)."""
    return every > 0 and (step % every == 0 or step == total)


@dataclasses.dataclass(frozen=True)
class Cadence:
    """How often the runner logs, evaluates and checkpoints (0: never, but checkpoints are
    always written at the last step and on preemption), and after how many non-finite
    steps in a row it aborts (0: never)."""

    total: int
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 100
    max_bad_steps: int = 10

    @classmethod
    def from_config(cls, config, total: int, eval_every: int) -> Cadence:
        """The cadence of `config.train` / `config.checkpoint` over `total` steps (their
        ranges are checked by `train.validate`)."""
        return cls(total=total, log_every=int(config.train.log_every),
                   eval_every=eval_every,
                   checkpoint_every=int(config.checkpoint.every),
                   max_bad_steps=int(config.train.max_bad_steps))


@dataclasses.dataclass(frozen=True)
class Job:
    """What a job supplies to the runner.

    step: `step(state, i) -> (state, metrics)` for step index i (0-based).
    name: what a step is called in messages ('step', 'RL step', 'warm-up step').
    row: `row(metrics, n_steps, seconds) -> metrics` adds fields (throughput) to a logged
      row computed over the `n_steps` steps since the last one.
    evaluate: `evaluate(state) -> metrics` merged into the row at eval steps.
    postfix: the progress bar's fields, {label: key of the row} (absent keys are left out;
      non-finite values, which `to_python` writes as strings, show as they are).
    done: `done(row) -> message` to stop early after this row ('' to go on).
    """

    step: Callable[[Any, int], tuple[Any, Metrics]]
    name: str = "step"
    row: Callable[[Metrics, int, float], Metrics] | None = None
    evaluate: Callable[[Any], Metrics] | None = None
    postfix: dict[str, str] = dataclasses.field(default_factory=dict)
    done: Callable[[Metrics], str] | None = None


@dataclasses.dataclass
class Outcome:
    """What `run_steps` ends with: the state, the last logged row (with its `step`), the
    preemption signal that stopped it and the message of `Job.done` that ended it early
    (both '' when it ran to `total`)."""

    state: Any
    last: Metrics
    preempted: str = ""
    finished: str = ""


def run_steps(
    state: Any,
    job: Job,
    cadence: Cadence,
    checkpointer: Checkpointer,
    writer: MetricWriter,
    *,
    preempted: list[str],
    progress: bool = True,
    lead: bool = True,
    profile: tuple[int, ...] = (),
    profile_dir: str = "",
    desc: str = "train",
) -> Outcome:
    """Runs `job.step` from `state.step` to `cadence.total`, logging, evaluating and
    checkpointing per `cadence`; closes `checkpointer` and `writer`.

    A preemption signal (`preempted`, see `on_preemption`) saves a checkpoint after the
    current step and raises `Preempted` (the command line exits 75);
    `cadence.max_bad_steps` non-finite steps in a row (counted by the step in
    `state.bad_steps`) raise `UserError` at the next logged step, checkpoints kept.
    `profile=(start, stop)` traces steps [start, stop) to `profile_dir`.
    """
    total = cadence.total
    first = int(state.step)
    if first >= total and lead:
        print(f"nothing to do: the run is at {job.name} {first} of {total} (raise "
              "config.train.steps to go on)")
    bar = tqdm(total=total, initial=first, disable=not (progress and lead),
               dynamic_ncols=True, desc=desc)
    out = Outcome(state, {})
    t0, n0 = time.perf_counter(), 0
    try:
        for i in range(first, total):
            if profile and lead and i == profile[0]:
                jax.profiler.start_trace(profile_dir)
            if profile and lead and i == profile[1]:
                jax.profiler.stop_trace()
            state, metrics = job.step(state, i)
            out.state, n0, done = state, n0 + 1, i + 1
            is_eval = job.evaluate is not None and itstime(done, cadence.eval_every, total)
            finished = ""
            if itstime(done, cadence.log_every, total) or is_eval:
                _check_bad_steps(state, cadence, job.name, done)
                row = to_python(jax.device_get(metrics))
                if job.row is not None:
                    row = job.row(row, n0, time.perf_counter() - t0)
                if is_eval:
                    row.update(job.evaluate(state))
                writer.write(done, row)
                out.last = {"step": done, **row}
                if job.postfix:
                    bar.set_postfix({label: _fmt(row[k]) for label, k in job.postfix.items()
                                     if k in row})
                finished = job.done(row) if job.done is not None else ""
                t0, n0 = time.perf_counter(), 0
            bar.update(1)
            stop = should_stop(preempted, done % cadence.log_every == 0)
            if itstime(done, cadence.checkpoint_every, total) or stop or finished:
                checkpointer.save(done, state, force=True)
            if finished or stop:
                out.finished, out.preempted = finished, stop
                if finished and lead:
                    print(f"\n{finished} at {job.name} {done}")
                break
    finally:
        bar.close()
        checkpointer.close()
        writer.close()
    if out.preempted:
        raise Preempted(f"received {out.preempted}: saved {job.name} {int(out.state.step)}; "
                        "rerun the command to resume")
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def _check_bad_steps(state: Any, cadence: Cadence, name: str, done: int) -> None:
    bad = int(state.bad_steps)
    if cadence.max_bad_steps and bad >= cadence.max_bad_steps:
        raise UserError(
            f"aborting at {name} {done}: {bad} steps in a row had a non-finite loss or "
            "gradient (updates skipped; checkpoints kept). Lower config.optim.lr or change "
            "config.train.max_bad_steps")


def should_stop(flag: list[str], sync_point: bool) -> str:
    """The preemption decision, identical on every process: single-process runs read the
    local flag every step; multi-process runs agree (any process signalled) at log steps."""
    if jax.process_count() == 1:
        return flag[0] if flag else ""
    if not sync_point:
        return ""
    from jax.experimental import multihost_utils

    any_flag = multihost_utils.process_allgather(np.array([1 if flag else 0], np.int32))
    return "a preemption signal" if int(np.max(any_flag)) else ""


@contextlib.contextmanager
def on_preemption() -> Iterator[list[str]]:
    """Within the block, SIGTERM/SIGINT append their name to the yielded list (the runner
    saves a checkpoint and stops after the current step) instead of killing the process;
    the old handlers come back on exit."""
    flag: list[str] = []
    old = {}

    def handler(signum, frame):
        flag.append(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def write_final_metrics(workdir: str, last: Metrics) -> None:
    """`workdir/final_metrics.json`: the last logged row."""
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
        json.dump(last, f, indent=2)

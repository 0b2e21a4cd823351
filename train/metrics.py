"""Metric sinks: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events,
and the one reader of `metrics.jsonl` (:func:`read_metrics`)."""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import numpy as np


def to_python(metrics: dict[str, Any]) -> dict[str, Any]:
    """Device arrays -> floats / lists (per-layer vectors stay lists)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        if a.ndim == 0:
            x = a.item()
            out[k] = x if not isinstance(x, float) or math.isfinite(x) else str(x)
        else:
            out[k] = [float(y) for y in a.reshape(-1)]
    return out


class MetricWriter:
    """Appends to `workdir/metrics.jsonl` and writes TensorBoard scalars to `workdir/tb`."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **to_python(metrics)}
        self._jsonl.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k == "step":
                continue
            if isinstance(v, list):
                for i, x in enumerate(v):
                    self._tb.add_scalar(f"{k}/{i}", x, step)
            elif isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_metrics(workdir_or_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a `metrics.jsonl`, in the order they were written.

    Args:
      workdir_or_path: a run directory (its `metrics.jsonl` is read) or the file itself.

    Returns:
      One dict per logged row (values as `MetricWriter` wrote them: numbers, per-layer
      lists, non-finite floats as strings). Rows are neither merged nor sorted by step.
      A file that does not exist (a run that has not logged yet) gives [].

    Bad lines never fail the read. The last line, when it is not a JSON object with a
    `step`, is a row cut short by a kill and is skipped silently. Any other such line (a
    cut row that a resumed run appended after, a hand edit) is skipped as well, with one
    warning per file giving the count and the first line number. Blank lines are ignored.
    """
    path = os.fspath(workdir_or_path)
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.readlines()
    rows: list[dict[str, Any]] = []
    bad: list[int] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        elif i < len(lines) - 1:
            bad.append(i + 1)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} malformed line(s), the first at line "
                      f"{bad[0]}", stacklevel=2)
    return rows


def drop_metrics_after(workdir: str, step: int) -> None:
    """On resume, rows logged after the restored step (by a run that died before its next
    checkpoint) are moved to `metrics.jsonl.stale` so that the curve is not duplicated."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep, stale = [], []
    for line in lines:
        try:
            (keep if json.loads(line)["step"] <= step else stale).append(line)
        except (ValueError, KeyError):
            stale.append(line)  # a line cut short by a kill
    if stale:
        with open(path + ".stale", "a") as f:
            f.writelines(stale)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)

"""Metric sinks: `metrics.jsonl` (one JSON object per logged step) and TensorBoard events."""

from __future__ import annotations

import json
import math
import os
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

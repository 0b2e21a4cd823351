"""Multi-host start-up: `jax.distributed.initialize` from `config.distributed`.

Explicit: `coordinator_address=HOST:PORT`, `num_processes=N`, `process_id=I` (every
process runs the same command with its own id). Automatic: when nothing is set and the
environment is a multi-process cluster JAX knows (TPU pod slice, SLURM with more than one
task, Open MPI), `jax.distributed.initialize()` detects the values itself. Single-process
runs do nothing. Must run before anything touches a JAX device.
"""

from __future__ import annotations

import os

import jax
from ml_collections import ConfigDict

from train.errors import UserError

_AUTO_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def _cluster_detected() -> bool:
    for var in _AUTO_ENV:
        value = os.environ.get(var, "")
        if var == "TPU_WORKER_HOSTNAMES":
            if len([h for h in value.split(",") if h]) > 1:
                return True
        elif value.isdigit() and int(value) > 1:
            return True
    return False


def initialize(dist: ConfigDict | None) -> bool:
    """Initializes the multi-process runtime when configured or detected; returns whether
    it did. Raises `UserError` for an incomplete explicit setting."""
    if dist is None:
        return False
    address = str(dist.get("coordinator_address", "") or "")
    n = int(dist.get("num_processes", 0) or 0)
    pid = int(dist.get("process_id", -1))
    if address or n > 1 or pid >= 0:
        missing = [k for k, bad in (("coordinator_address", not address),
                                    ("num_processes", n < 1), ("process_id", pid < 0)) if bad]
        if missing:
            raise UserError(
                "config.distributed: set coordinator_address, num_processes and process_id "
                f"together (missing: {', '.join('config.distributed.' + m for m in missing)})"
            )
        if pid >= n:
            raise UserError(
                f"config.distributed.process_id={pid} must be < num_processes={n}"
            )
        if n == 1:
            return False
        jax.distributed.initialize(coordinator_address=address, num_processes=n, process_id=pid)
        return True
    if dist.get("auto", True) and _cluster_detected():
        jax.distributed.initialize()
        return True
    return False

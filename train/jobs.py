"""The job registry: `config.job` -> the function that runs it.

Jobs are entry points of the group `jaxstack.jobs` declared in `pyproject.toml`
(`pretrain = "train.loop:run"`, `rl = "rl.loop:run"`, ...), so a package that builds on
`train` adds its jobs there and `train` never imports it. After adding one, reinstall the
project (`python -m pip install -e .`) so that the entry point is registered.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from ml_collections import ConfigDict

from train.errors import UserError

GROUP = "jaxstack.jobs"


def available() -> dict[str, Any]:
    """Registered jobs: name -> entry point (not loaded)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def get(name: str) -> Callable[[ConfigDict], Any]:
    """The `run(config)` function of job `name`; `UserError` naming the registered ones."""
    jobs = available()
    if name not in jobs:
        known = ", ".join(repr(k) for k in sorted(jobs)) or "none (is the project installed?)"
        raise UserError(f"config.job={name!r} is not a known job (available: {known})")
    return jobs[name].load()


def dispatch(config: ConfigDict) -> Any:
    """Runs `config.job` (default 'pretrain')."""
    return get(str(config.get("job", "pretrain")))(config)

"""Routes a config to its job (`config.job`): pretraining here; RL jobs register in `rl`."""

from __future__ import annotations

from ml_collections import ConfigDict

from train.errors import UserError


def dispatch(config: ConfigDict):
    job = config.get("job", "pretrain")
    if job == "pretrain":
        from train.loop import run

        return run(config)
    if job == "rl":
        from rl.loop import run as run_rl

        return run_rl(config)
    raise UserError(f"config.job={job!r} is not a known job (available: 'pretrain', 'rl')")

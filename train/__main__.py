"""`python -m train --config configs/tiny.py [--config.key=value ...]`: runs the config's
job (`config.job`: pretrain, rl, ... see `train.jobs`).

A user mistake (unknown config key, bad value, missing file, impossible mesh) is printed
as one line `error: ...` with exit code 2; bugs keep their traceback.
"""

from __future__ import annotations

import sys

from train import jobs
from train.cli import parse_config, user_errors


def main(argv: list[str] | None = None) -> None:
    with user_errors():
        jobs.dispatch(parse_config(sys.argv if argv is None else argv))


if __name__ == "__main__":
    main()

"""`python -m rl --config configs/rl_arith.py [--config.key=value ...]`: the same as
`python -m train` with an RL config, refusing configs whose `job` is not 'rl'."""

from __future__ import annotations

import sys

from train.cli import parse_config, user_errors
from train.errors import UserError


def main(argv: list[str] | None = None) -> None:
    with user_errors():
        config = parse_config(sys.argv if argv is None else argv)
        if config.get("job") != "rl":
            raise UserError(
                f"config.job={config.get('job')!r}: python -m rl runs RL configs (job='rl', "
                "e.g. configs/rl_arith.py); use python -m train for pretraining")
        from rl.loop import run

        run(config)


if __name__ == "__main__":
    main()

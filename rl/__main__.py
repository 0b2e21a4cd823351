"""`python -m rl --config configs/rl_arith.py [--config.key=value ...]`: the same as
`python -m train` with an RL config (flag parsing and the one-line errors of
`train.__main__`), refusing configs whose `job` is not 'rl'."""

from __future__ import annotations

import sys

from absl import logging

from train.__main__ import _fail, parse


def main(argv: list[str] | None = None) -> None:
    from train.errors import UserError

    config = parse(sys.argv if argv is None else argv)
    if config.get("job") != "rl":
        _fail(f"error: config.job={config.get('job')!r}: python -m rl runs RL configs "
              "(job='rl', e.g. configs/rl_arith.py); use python -m train for pretraining")
    logging.set_verbosity(logging.WARNING)
    try:
        from rl.loop import run

        run(config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

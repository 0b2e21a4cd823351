"""`python -m train --config configs/tiny.py [--config.key=value ...]`."""

from __future__ import annotations

import sys

from absl import app, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
    from train.errors import UserError

    config = _CONFIG.value
    if config is None:
        print("error: --config is required, e.g. --config configs/tiny.py", file=sys.stderr)
        sys.exit(2)
    try:
        from train.entry import dispatch

        dispatch(config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)

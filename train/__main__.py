"""`python -m train --config configs/tiny.py [--config.key=value ...]`.

A user mistake (unknown config key, bad value, missing file, impossible mesh) is printed
as one line `error: ...` with exit code 2; bugs keep their traceback.
"""

from __future__ import annotations

import sys

from absl import flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if e.args else str(e)
    return " ".join(text.replace("\\n", " ").replace("\\'", "'").strip("'\" ").split())


def _fail(msg: str) -> None:
    print(msg, file=sys.stderr)
    sys.exit(2)


def parse(argv: list[str]):
    """Parses flags; returns the config or exits with a one-line error."""
    try:
        flags.FLAGS(argv)
        config = _CONFIG.value
        if config is not None:
            config.keys()  # a config file that failed to load raises here
    except OSError as e:
        _fail(f"error: cannot load the --config file: {_one_line(e)}")
    except flags.Error as e:
        _fail(f"error: {_one_line(e)}")
    except (AttributeError, KeyError) as e:
        _fail(f"error: unknown config key in an override: {_one_line(e)}")
    except (ValueError, TypeError) as e:
        _fail(f"error: bad config override: {_one_line(e)}")
    if config is None:
        _fail("error: --config is required, e.g. --config configs/tiny.py")
    return config


def main(argv: list[str] | None = None) -> None:
    from train.errors import UserError

    config = parse(sys.argv if argv is None else argv)
    logging.set_verbosity(logging.WARNING)  # keep Orbax's per-save INFO lines off the console
    try:
        from train.entry import dispatch

        dispatch(config)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""The one command-line boundary of every entry point (`python -m train`, `python -m rl`,
`python -m train.sweep`, `python -m rl.generate`, ...).

`parse_config(argv)` reads `--config FILE [--config.key=value ...]` (ml_collections) and
turns every way that can go wrong into a `UserError` naming the key or the file;
`user_errors()` is the single place where a `UserError` becomes one line `error: ...` on
stderr and exit code 2. Bugs keep their traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from absl import flags, logging
from ml_collections import ConfigDict, config_flags

from train.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.", lock_config=True)


def _one_line(e: BaseException) -> str:
    text = str(e.args[0]) if e.args else str(e)
    return " ".join(text.replace("\\n", " ").replace("\\'", "'").strip("'\" ").split())


def parse_config(argv: list[str]) -> ConfigDict:
    """The config named by `--config` with its `--config.key=value` overrides applied.

    Raises:
      UserError: a missing or unloadable config file, an unknown key, a bad value.
    """
    try:
        flags.FLAGS(argv)
        config = _CONFIG.value
        if config is not None:
            config.keys()  # a config file that failed to load raises here
    except OSError as e:
        raise UserError(f"cannot load the --config file: {_one_line(e)}") from e
    except flags.Error as e:
        raise UserError(_one_line(e)) from e
    except (AttributeError, KeyError) as e:
        raise UserError(f"unknown config key in an override: {_one_line(e)}") from e
    except (ValueError, TypeError) as e:
        raise UserError(f"bad config override: {_one_line(e)}") from e
    if config is None:
        raise UserError("--config is required, e.g. --config configs/tiny.py")
    return config


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Runs the body of a command; a `UserError` is printed as one `error:` line, exit 2.

    Also keeps Orbax's and absl's per-save INFO lines off the console.
    """
    logging.set_verbosity(logging.WARNING)
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

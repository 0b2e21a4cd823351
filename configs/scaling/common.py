"""The tiny dense model and the `sweep` section shared by the scaling experiments.

Sized for a CPU (each figure in minutes): 2 layers, sequences of 64 bytes, 16 sequences a
step, 200 files of the Python standard library. At scale, override the model, data and
steps on the command line or in a copy of the experiment config; the grid stays.
"""

from ml_collections import ConfigDict

from configs import base
from train.sweep import default_sweep


def grid(values: dict) -> ConfigDict:
    """A `sweep.grid`: config-key paths (dotted) -> lists of values."""
    return ConfigDict(values, allow_dotted_keys=True)


def get_config(name: str) -> ConfigDict:
    c = base.get_config()
    c.workdir = f"runs/scaling/{name}"
    c.model.update(dict(ffn_dim=512, max_seq_len=64))  # base: d=128, 2 layers, 4 heads
    c.data.update(dict(max_files=200, seq_len=64))
    c.train.update(dict(log_every=5, eval_every=0))
    c.checkpoint.update(dict(every=100000, keep=1, async_save=False))
    c.sweep = default_sweep()
    c.sweep.name = name
    return c

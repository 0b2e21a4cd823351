"""Shared defaults for every run; experiment configs override only what differs.

A default is written once: the `model` section is every field of `model.ModelConfig` with
its dataclass default (an unknown key there is an error naming the key), and the `optim`
section is `optim.default_config()`. A `None` default is an `ml_collections` placeholder of
the field's type, so `--config.model.n_kv_heads=2` or `--config.optim.total_steps=100`
parses as an int.
"""

import dataclasses
import typing

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

import optim
from model import ModelConfig


def model_defaults() -> ConfigDict:
    """Every field of `model.ModelConfig` with its default (`None` -> a typed placeholder)."""
    hints = typing.get_type_hints(ModelConfig)
    out = {}
    for f in dataclasses.fields(ModelConfig):
        if f.default is None:  # `T | None`: a placeholder of T
            (kind,) = (t for t in typing.get_args(hints[f.name]) if t is not type(None))
            out[f.name] = placeholder(kind)
        else:
            out[f.name] = f.default
    return ConfigDict(out)


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.job = "pretrain"
    c.workdir = "runs/default"
    c.seed = 0
    # An imported checkpoint (`python -m model.hf import SRC DST`) or a training run's
    # workdir (any job's: its latest checkpoint's params) to start from; its architecture
    # replaces config.model (but for train.setup.RUNTIME_FIELDS).
    c.init_from = ""

    c.model = model_defaults()
    c.model.vocab_size = 320  # the byte tokenizer's 257 tokens, padded (ModelConfig: 256)

    c.data = ConfigDict(
        dict(
            source="stdlib",  # stdlib | text | bin | arrayrecord (see train/data.py)
            paths=(),  # text/bin/arrayrecord: files, directories, globs
            tokenizer="byte",  # byte | path to tokenizer.json | path to SentencePiece .model
            eos_token="",  # tokenizer file: EOS token ("" -> the tokenizer's own)
            cache_dir="",  # tokenizer file: cache the tokenized corpus here ("" -> none)
            record_format="text",  # arrayrecord records: text (UTF-8) | tokens (raw dtype)
            dtype="uint16",  # token files/records: uint16 | uint32 | int32
            # token sources: None -> the tokenizer file's vocabulary, else max token + 1
            vocab_size=placeholder(int),
            eos_id=placeholder(int),  # token sources: None -> the tokenizer file's EOS, else none
            max_files=0,  # stdlib: 0 -> all files
            eval_permille=20,  # held-out thousandths (documents by crc32 of the name)
            seq_len=128,
            batch_size=16,
        )
    )

    c.optim = optim.default_config()  # see optim/build.py

    c.train = ConfigDict(
        dict(
            steps=200,
            log_every=10,
            eval_every=100,
            eval_batches=4,
            progress=True,
            grad_accum=1,
            z_loss=0.0,
            max_bad_steps=10,  # abort after this many non-finite steps in a row (0: never)
            profile_steps=(),  # (start, stop): write a JAX profiler trace to workdir/profile
            # > 0: log the gradient noise scale's inputs (noise/*, see train/noise_scale.py)
            # in the rows of steps that are multiples of this; needs grad_accum >= 2.
            noise_scale_every=0,
        )
    )

    # restore_step: resume from this saved step instead of the latest (e.g. when the latest
    # is reported corrupt); later steps are set aside as `<step>.set-aside`, never deleted.
    c.checkpoint = ConfigDict(dict(every=100, keep=3, async_save=True,
                                   restore_step=placeholder(int)))

    # Multi-host: every process runs the same command with its own process_id.
    c.distributed = ConfigDict(
        dict(coordinator_address="", num_processes=0, process_id=-1, auto=True)
    )

    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
    return c

"""`train.validate.validate`: every shipped config passes; each class of bad value is a
`UserError` naming the key, the value and the allowed range."""

from __future__ import annotations

import glob
import importlib
import os

import pytest
from ml_collections import ConfigDict

from configs import base, rl_arith, rl_base
from train.errors import UserError
from train.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCALING = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "scaling", "*.py"))
    if os.path.basename(p) not in ("__init__.py", "common.py"))
CONFIGS = ["configs.base", "configs.tiny", "configs.rl_base", "configs.rl_arith",
           *(f"configs.scaling.{name}" for name in SCALING)]


def _set(config, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


@pytest.mark.parametrize("module", CONFIGS)
def test_shipped_configs_pass(module):
    assert len(SCALING) >= 6
    validate(importlib.import_module(module).get_config())


def test_derived_placeholders_and_edge_values_pass():
    c = rl_arith.get_config()
    assert c.optim.total_steps is None and c.optim.muon.lr is None and c.rl.eps_lo is None
    for key, value in [
        ("checkpoint.keep", None), ("checkpoint.keep", 1), ("checkpoint.restore_step", 0),
        ("optim.total_steps", 0), ("optim.total_steps", 100), ("optim.b1", 0.0), ("optim.clip_norm", 0.0),
        ("optim.weight_decay", 0.0), ("optim.min_lr_frac", 1.0), ("optim.muon.lr", 0.02),
        ("optim.muon.weight_decay", 0.0), ("mesh.data", 1), ("mesh.fsdp", -1),
        ("train.eval_every", 0), ("train.max_bad_steps", 0), ("train.profile_steps", (2, 4)),
        ("data.max_files", 0), ("data.eval_permille", 0), ("data.vocab_size", 300),
        ("data.eos_id", 0), ("seed", 2**32 - 1), ("rl.top_p", 1.0), ("rl.top_k", 5),
        ("rl.holdout_modulus", 0), ("rl.holdout_modulus", 2), ("rl.eps_hi", 0.28),
        ("rl.max_new_tokens", 4), ("rl.dynamic_sampling", True), ("rl.adv_std", False),
        ("rl.overlong_cache_len", 0), ("rl.eval_every", 0), ("rl.warmup_steps", 0),
    ]:
        _set(c, key, value)
    validate(c)


BAD = [
    # (key, bad value, needle in the message)
    ("checkpoint.keep", 0, "config.checkpoint.keep=0 must be >= 1"),
    ("checkpoint.every", 0, "config.checkpoint.every=0 must be >= 1"),
    ("checkpoint.restore_step", -1, "config.checkpoint.restore_step=-1 must be >= 0"),
    ("checkpoint.async_save", None, "config.checkpoint.async_save=None must be True or False"),
    ("train.grad_accum", 0, "config.train.grad_accum=0 must be >= 1"),
    ("train.steps", 0, "config.train.steps=0 must be >= 1"),
    ("train.steps", None, "config.train.steps=None must be an int >= 1"),
    ("train.log_every", 0, "config.train.log_every=0 must be >= 1"),
    ("train.eval_every", -1, "config.train.eval_every=-1 must be >= 0"),
    ("train.eval_batches", 0, "config.train.eval_batches=0 must be >= 1"),
    ("train.z_loss", -1e-4, "config.train.z_loss=-0.0001 must be >= 0"),
    ("train.max_bad_steps", -1, "config.train.max_bad_steps=-1 must be >= 0"),
    ("train.profile_steps", (5, 2), "config.train.profile_steps=(5, 2) must be () (off) or "
                                    "(start, stop) with 0 <= start < stop"),
    ("train.profile_steps", (3,), "config.train.profile_steps=(3,)"),
    ("data.seq_len", 0, "config.data.seq_len=0 must be >= 1"),
    ("data.batch_size", -8, "config.data.batch_size=-8 must be >= 1"),
    ("data.eval_permille", 1001, "config.data.eval_permille=1001 must be in [0, 1000]"),
    ("data.max_files", -1, "config.data.max_files=-1 must be >= 0"),
    ("data.vocab_size", 0, "config.data.vocab_size=0 must be >= 1"),
    ("data.eos_id", -1, "config.data.eos_id=-1 must be >= 0"),
    ("seed", -1, "config.seed=-1 must be in [0, 4294967295]"),
    ("seed", 2**32, "config.seed=4294967296 must be in [0, 4294967295]"),
    ("optim.lr", -1.0, "config.optim.lr=-1.0 must be >= 0"),
    ("optim.lr", float("nan"), "config.optim.lr=nan must be a finite number >= 0"),
    ("optim.lr", float("inf"), "config.optim.lr=inf must be a finite number >= 0"),
    ("optim.warmup_steps", -1, "config.optim.warmup_steps=-1 must be >= 0"),
    ("optim.total_steps", -5, "config.optim.total_steps=-5 must be >= 0"),
    ("optim.min_lr_frac", 1.5, "config.optim.min_lr_frac=1.5 must be in [0, 1]"),
    ("optim.b1", 1.0, "config.optim.b1=1.0 must be in [0, 1)"),
    ("optim.b2", -0.1, "config.optim.b2=-0.1 must be in [0, 1)"),
    ("optim.eps", 0.0, "config.optim.eps=0.0 must be > 0"),
    ("optim.weight_decay", -0.1, "config.optim.weight_decay=-0.1 must be >= 0"),
    ("optim.clip_norm", -1.0, "config.optim.clip_norm=-1.0 must be >= 0"),
    ("optim.muon.beta", 1.0, "config.optim.muon.beta=1.0 must be in [0, 1)"),
    ("optim.muon.ns_steps", 0, "config.optim.muon.ns_steps=0 must be >= 1"),
    ("optim.muon.lr", -0.02, "config.optim.muon.lr=-0.02 must be >= 0"),
    ("optim.muon.weight_decay", -0.1, "config.optim.muon.weight_decay=-0.1 must be >= 0"),
    ("optim.muon.nesterov", None, "config.optim.muon.nesterov=None must be True or False"),
    ("optim.wsd.decay_frac", 1.2, "config.optim.wsd.decay_frac=1.2 must be in [0, 1]"),
    ("optim.qk_clip.tau", 0.0, "config.optim.qk_clip.tau=0.0 must be > 0"),
    ("optim.mup.width_multiplier", 0.0, "config.optim.mup.width_multiplier=0.0 must be > 0"),
    ("mesh.data", 0, "config.mesh.data=0 must be -1 (the remaining devices) or >= 1"),
    ("mesh.tensor", -2, "config.mesh.tensor=-2 must be -1 (the remaining devices) or >= 1"),
    ("mesh.expert", None, "config.mesh.expert=None must be -1 (the remaining devices) or an "
                          "int >= 1"),
    # the rl section
    ("rl.n_prompts", 0, "config.rl.n_prompts=0 must be >= 1"),
    ("rl.group_size", 1, "config.rl.group_size=1 must be >= 2"),
    ("rl.max_new_tokens", 0, "config.rl.max_new_tokens=0 must be >= 1"),
    ("rl.temperature", 0.0, "config.rl.temperature=0.0 must be > 0"),
    ("rl.top_p", 0.0, "config.rl.top_p=0.0 must be in (0, 1]"),
    ("rl.top_p", 1.5, "config.rl.top_p=1.5 must be in (0, 1]"),
    ("rl.top_k", -1, "config.rl.top_k=-1 must be >= 0"),
    ("rl.eps_lo", -0.2, "config.rl.eps_lo=-0.2 must be >= 0"),
    ("rl.eps_hi", -0.1, "config.rl.eps_hi=-0.1 must be >= 0"),
    ("rl.beta", -0.01, "config.rl.beta=-0.01 must be >= 0"),
    ("rl.tis_cap", 0.0, "config.rl.tis_cap=0.0 must be > 0"),
    ("rl.updates_per_batch", 0, "config.rl.updates_per_batch=0 must be >= 1"),
    ("rl.minibatches", 0, "config.rl.minibatches=0 must be >= 1"),
    ("rl.overlong_cache_len", -1, "config.rl.overlong_cache_len=-1 must be >= 0"),
    ("rl.holdout_modulus", 1, "config.rl.holdout_modulus=1 must be 0 (no split) or >= 2"),
    ("rl.eval_every", -1, "config.rl.eval_every=-1 must be >= 0"),
    ("rl.eval_prompts", 0, "config.rl.eval_prompts=0 must be >= 1"),
    ("rl.eval_seed", -1, "config.rl.eval_seed=-1 must be in [0, 4294967295]"),
    ("rl.warmup_steps", -1, "config.rl.warmup_steps=-1 must be >= 0"),
    ("rl.warmup_batch_size", 0, "config.rl.warmup_batch_size=0 must be >= 1"),
    ("rl.warmup_lr", 0.0, "config.rl.warmup_lr=0.0 must be > 0"),
    ("rl.warmup_target_accuracy", 1.5, "config.rl.warmup_target_accuracy=1.5 must be in [0, 1]"),
]


@pytest.mark.parametrize("key, value, needle", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_bad_value_names_key_and_range(key, value, needle):
    c = rl_base.get_config()
    _set(c, key, value)
    with pytest.raises(UserError) as e:
        validate(c)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert msg.count("config.") == 1, msg  # only the bad key is reported


def test_wrong_types_are_reported():
    # ml_collections refuses most type changes on assignment; a config built from a dict
    # (or a JSON file) can hold anything.
    d = base.get_config().to_dict()
    d["train"]["steps"], d["optim"]["lr"], d["train"]["progress"] = 1.5, "fast", 1
    with pytest.raises(UserError) as e:
        validate(ConfigDict(d))
    msg = str(e.value)
    assert "config.train.steps=1.5 must be an int >= 1" in msg
    assert "config.optim.lr='fast' must be a finite number >= 0" in msg
    assert "config.train.progress=1 must be True or False" in msg


def test_several_bad_values_one_line_and_no_rl_section_in_pretraining():
    c = base.get_config()
    c.checkpoint.keep, c.optim.lr, c.train.grad_accum = 0, -1.0, 0
    with pytest.raises(UserError) as e:
        validate(c)
    msg = str(e.value)
    assert "\n" not in msg and msg.count("; ") == 2
    for key in ("checkpoint.keep", "optim.lr", "train.grad_accum"):
        assert f"config.{key}=" in msg
    assert "rl" not in base.get_config()  # no rl section: no rl rules
    validate(base.get_config())


def test_missing_keys_are_skipped():
    c = base.get_config()
    del c.checkpoint
    del c.optim.muon
    validate(c)

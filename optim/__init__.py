"""Optax transforms for the training stack: Muon, muP scaling, QK-clip, schedules, build(config).

Everything here is a plain `optax.GradientTransformation` or a pure function over any
pytree; `optim` knows parameter *names and shapes* (see `optim.partition`), never model code.
Importing `optim` costs about as much as importing optax: nothing is computed, compiled or
placed on a device at import time (`ml_collections` is imported only by `default_config`).
"""

from optim.build import build, build_schedule, default_config
from optim.muon import ScaleByMuonState, muon, scale_by_muon
from optim.mup import mup_init_std, mup_kind, mup_lr_multipliers, scale_by_mup
from optim.newton_schulz import newton_schulz
from optim.partition import default_label, label_params
from optim.qk_clip import QKClipTarget, clip_mha, clip_mla, qk_clip
from optim.schedules import average_checkpoints, constant, warmup_cosine, warmup_stable_decay

__all__ = [
    "QKClipTarget",
    "ScaleByMuonState",
    "average_checkpoints",
    "build",
    "build_schedule",
    "clip_mha",
    "clip_mla",
    "constant",
    "default_config",
    "default_label",
    "label_params",
    "muon",
    "mup_init_std",
    "mup_kind",
    "mup_lr_multipliers",
    "newton_schulz",
    "qk_clip",
    "scale_by_muon",
    "scale_by_mup",
    "warmup_cosine",
    "warmup_stable_decay",
]

"""QK-clip (Kimi K2, MuonClip) at a deliberately high LR: the max attention logit and the
loss with and without the clip.

    python -m train.sweep --config configs/scaling/qk_clip.py
"""

from configs.scaling import common


def get_config():
    c = common.get_config("qk_clip")
    c.optim.update(dict(name="muon", lr=3e-2))
    c.optim.qk_clip.tau = 30.0
    c.train.log_every = 2
    c.sweep.grid = common.grid({"optim.qk_clip.enabled": [False, True]})
    c.sweep.plot = dict(
        kind="curves", series="optim.qk_clip.enabled", metrics=("max_logit", "loss"),
        labels=("no clip", "QK-clip"), hlines={"max_logit": 30.0},
        report=("max_logit", "qk_clip_frac", "loss", "eval_loss"), ylim={"loss": (1.3, 3.0)},
        title="QK-clip: Muon at lr 3e-2, d=128, tau=30",
    )
    return c

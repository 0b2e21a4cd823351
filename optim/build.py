"""`build(config.optim, params)`: the training optimizer from a config section.

Layout of the optimizer (one `optax.GradientTransformation`):

    clip_by_global_norm(clip_norm)              # over all gradients, first
    partition by label (optim.label_params):
      'muon' -> optim.muon(muon lr schedule, decoupled wd)          (name='muon' only)
      'adam' -> scale_by_adam, add_decayed_weights, [scale_by_mup], scale_by_learning_rate
      'none' -> set_to_zero                                          (e.g. MoE router biases)

With `name='adamw'` the 'muon' leaves go to AdamW as well. Weight decay (decoupled,
`lr * wd * W`) skips norm gains, biases, other vectors and embeddings: decaying gains pulls
them towards 0 instead of their natural value 1, and embeddings see sparse gradients (rows
of rare tokens would be decayed on every step but updated rarely). Hidden matrices, the LM
head and the router kernel are decayed. QK-clip (`optim.qk_clip`) is applied by the trainer
after the update (it needs the step's max logits), so `config.qk_clip` is not used here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import optax

from optim._tree import Path, map_with_names
from optim.muon import UPDATE_SCALES, muon
from optim.mup import scale_by_mup
from optim.partition import is_embedding, is_router_bias, is_vector, label_params
from optim.schedules import constant, warmup_cosine, warmup_stable_decay

if TYPE_CHECKING:
    import ml_collections

OPTIMIZERS: tuple[str, ...] = ("adamw", "muon")
SCHEDULES: tuple[str, ...] = ("warmup_cosine", "wsd", "constant")
#: Other accepted names of a schedule.
SCHEDULE_ALIASES: dict[str, str] = {"warmup_stable_decay": "wsd"}


def default_config() -> ml_collections.ConfigDict:
    """The `optim` section of a training config, with its defaults (`configs/base.py` uses it).

    `None` means "derived": `total_steps` is filled in by the trainer (`train.steps`
    optimizer steps); `muon.lr` / `muon.weight_decay` default to `lr` / `weight_decay`. They
    are `ml_collections` placeholders, so `--config.optim.total_steps=100` still parses (as
    an int). `labels` is a sequence of `(regex, label)` overrides for `optim.label_params`;
    `wsd` configures `schedule='wsd'`; `qk_clip` is read by the trainer.
    """
    import ml_collections
    from ml_collections.config_dict import placeholder

    return ml_collections.ConfigDict(
        dict(
            name="adamw",  # adamw | muon
            lr=3e-3,
            schedule="warmup_cosine",  # warmup_cosine | wsd | constant
            warmup_steps=20,
            total_steps=placeholder(int),  # None -> train.steps (set by the trainer)
            min_lr_frac=0.1,  # final LR / peak LR (warmup_cosine, wsd)
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            clip_norm=1.0,  # global gradient-norm clip (0: off)
            muon=dict(
                beta=0.95,
                nesterov=True,
                ns_steps=5,
                update_scale="moonlight",
                lr=placeholder(float),  # None -> optim.lr
                weight_decay=placeholder(float),  # None -> optim.weight_decay
            ),
            wsd=dict(decay_frac=0.2, decay="linear"),  # decay: linear | sqrt | cosine
            labels=(),
            # Filled in by the trainer from config.model.mup_base_d_model (muP on the model side).
            mup=dict(enabled=False, width_multiplier=1.0),
            qk_clip=dict(enabled=False, tau=100.0),
        )
    )


def _sub(config: Any, key: str) -> Any:
    return getattr(config, key, None)


def build_schedule(config: Any, peak: float | None = None) -> optax.Schedule:
    """The LR schedule of `config` (an `optim` section), peaking at `peak` (default `lr`).

    `schedule` is one of :data:`SCHEDULES` (or an alias in :data:`SCHEDULE_ALIASES`).
    Raises a ValueError naming the offending key for an unknown `optim.schedule` or an
    unset (None) / too small `optim.total_steps`.
    """
    peak = float(config.lr if peak is None else peak)
    warmup = int(config.warmup_steps)
    name = SCHEDULE_ALIASES.get(config.schedule, config.schedule)
    if name == "constant":
        return constant(peak, warmup)
    if name not in SCHEDULES:
        raise ValueError(
            f"optim.schedule={config.schedule!r} is not one of {SCHEDULES} "
            f"(aliases: {SCHEDULE_ALIASES})"
        )
    total = None if config.total_steps is None else int(config.total_steps)
    if total is None or total <= warmup:
        raise ValueError(
            f"optim.total_steps={total} must be set and exceed optim.warmup_steps={warmup} "
            f"for optim.schedule={config.schedule!r}"
        )
    if name == "warmup_cosine":
        return warmup_cosine(peak, warmup, total, float(config.min_lr_frac))
    wsd = _sub(config, "wsd")
    return warmup_stable_decay(
        peak,
        warmup,
        total,
        decay_frac=float(wsd.decay_frac) if wsd is not None else 0.2,
        decay=wsd.decay if wsd is not None else "linear",
        end_value_frac=float(config.min_lr_frac),
    )


def decays(path: Path, shape: tuple[int, ...]) -> bool:
    """Whether decoupled weight decay applies: not to vectors, gains, biases, embeddings."""
    return not (is_vector(path, shape) or is_embedding(path) or is_router_bias(path))


def weight_decay_mask(params: Any) -> Any:
    """Pytree of bools (see :func:`decays`); works on partition-masked trees too."""
    return map_with_names(lambda path, x: decays(path, x.shape), params)


def build(config: Any, params: Any) -> optax.GradientTransformation:
    """Builds the optimizer described by an `optim` config section for `params`.

    Args:
      config: an `ml_collections.ConfigDict` like :func:`default_config` (any object with
        the same attributes works).
      params: the parameter pytree (arrays or `jax.ShapeDtypeStruct`s; only names and
        shapes are read).

    Returns:
      An `optax.GradientTransformation` (see the module docstring for its layout).

    Raises:
      ValueError: unknown `optim.name`, `optim.schedule` or `optim.muon.update_scale`,
        unset `optim.total_steps`, a negative `optim.muon.lr` / `weight_decay`, bad
        label overrides, or muP with a non-spectral Muon.

    References:
      Loshchilov & Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019;
      Liu et al., `Muon is Scalable for LLM Training <https://arxiv.org/abs/2502.16982>`_, 2025
    """
    name = config.name
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r} is not a known optimizer; expected one of {OPTIMIZERS}")
    schedule = build_schedule(config)
    labels = label_params(params, tuple(tuple(o) for o in (_sub(config, "labels") or ())))
    if name == "adamw":
        labels = jax.tree.map(lambda lab: "adam" if lab == "muon" else lab, labels)

    mup = _sub(config, "mup")
    mup_on = bool(mup is not None and mup.enabled)
    adam_parts = [
        optax.scale_by_adam(b1=float(config.b1), b2=float(config.b2), eps=float(config.eps)),
        optax.add_decayed_weights(float(config.weight_decay), weight_decay_mask),
    ]
    if mup_on:
        adam_parts.append(scale_by_mup(float(mup.width_multiplier)))
    adam_parts.append(optax.scale_by_learning_rate(schedule))
    transforms: dict[str, optax.GradientTransformation] = {
        "adam": optax.chain(*adam_parts),
        "none": optax.set_to_zero(),
    }

    if name == "muon":
        mc = config.muon
        if mc.update_scale not in UPDATE_SCALES:
            raise ValueError(
                f"optim.muon.update_scale={mc.update_scale!r} is not one of {UPDATE_SCALES}"
            )
        if mup_on and mc.update_scale != "spectral":
            raise ValueError(
                f"optim.mup.enabled with optim.name='muon' needs optim.muon.update_scale="
                f"'spectral' (width-independent Muon LR), got {mc.update_scale!r}"
            )
        for key in ("lr", "weight_decay"):
            value = getattr(mc, key)
            if value is not None and float(value) < 0:
                raise ValueError(
                    f"optim.muon.{key}={value} must be >= 0 (None: optim.{key}, the AdamW one)"
                )
        muon_lr = float(config.lr if mc.lr is None else mc.lr)
        muon_wd = float(config.weight_decay if mc.weight_decay is None else mc.weight_decay)
        transforms["muon"] = muon(
            build_schedule(config, peak=muon_lr),
            beta=float(mc.beta),
            nesterov=bool(mc.nesterov),
            ns_steps=int(mc.ns_steps),
            weight_decay=muon_wd,
            weight_decay_mask=weight_decay_mask,
            update_scale=mc.update_scale,
        )

    tx = optax.partition(transforms, labels)
    if float(config.clip_norm) > 0:
        tx = optax.chain(optax.clip_by_global_norm(float(config.clip_norm)), tx)
    return tx

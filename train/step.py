"""The train and eval steps: pure functions `state, metrics = train_step(state, batch)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from model import ModelConfig, Transformer, max_violation, update_router_biases


class TrainState(flax.struct.PyTreeNode):
    """Everything that changes during training. The data position is `step` itself
    (batches are a pure function of (seed, step), see `train.data`)."""

    step: jax.Array
    params: Any
    opt_state: Any
    router_bias: Any
    rng: jax.Array


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Mean token cross-entropy of float32 `logits [batch, length, vocab]` against
    `targets [batch, length]`; returns (mean loss, number of counted tokens)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    m = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    return jnp.sum(losses * m) / n, n


def _forward(model: Transformer, params, router_bias, batch):
    return model.apply(
        {"params": params, "router_bias": router_bias},
        batch["inputs"],
        batch.get("positions"),
        batch.get("segment_ids"),
    )


def make_train_step(
    model: Transformer,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds `train_step(state, batch) -> (state, metrics)`.

    One step: forward + loss (cross-entropy + the MoE sequence-wise aux loss if enabled),
    gradients, the optax update, then the loss-free balancing update of the router biases
    from the loads of this step's global batch.
    """
    cfg: ModelConfig = model.cfg

    def loss_fn(params, router_bias, batch):
        logits, aux = _forward(model, params, router_bias, batch)
        ce, _ = cross_entropy(logits, batch["targets"], batch.get("mask"))
        loss = ce + aux.get("aux_loss", 0.0)
        return loss, (ce, aux)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        (loss, (ce, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.router_bias, batch
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        router_bias = state.router_bias
        metrics = {
            "loss": ce,
            "total_loss": loss,
            "grad_norm": optax.global_norm(grads),
            "update_norm": optax.global_norm(updates),
            "max_logit": jnp.max(aux["max_logits"]),
            "max_logit_per_layer": jnp.max(aux["max_logits"], axis=-1),
        }
        if cfg.is_moe:
            router_bias = update_router_biases(cfg, state.router_bias, aux["moe_load"])
            metrics["moe/maxvio"] = max_violation(aux["moe_load"])
            metrics["moe/dropped_frac"] = aux["moe_dropped"]
            metrics["moe/aux_loss"] = aux["aux_loss"]
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, router_bias=router_bias
        )
        return new_state, metrics

    return train_step


def make_eval_step(model: Transformer) -> Callable[[TrainState, dict[str, jax.Array]], dict]:
    """`eval_step(state, batch) -> {'loss': mean CE, 'tokens': count}`."""

    def eval_step(state: TrainState, batch):
        logits, _ = _forward(model, state.params, state.router_bias, batch)
        ce, n = cross_entropy(logits, batch["targets"], batch.get("mask"))
        return {"loss": ce, "tokens": n}

    return eval_step

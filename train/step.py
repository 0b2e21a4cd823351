"""The train and eval steps: pure functions `state, metrics = train_step(state, batch)`."""

from __future__ import annotations

import dataclasses
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
    bad_steps: jax.Array  # consecutive steps skipped for a non-finite loss or gradient


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of the train step."""

    grad_accum: int = 1  # microbatches per step (the batch is split along its first axis)
    z_loss: float = 0.0  # weight of mean(logsumexp(logits)^2) (PaLM, Sec. 5)
    skip_nonfinite: bool = True  # NaN/Inf guard: skip the update, count it


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Token cross-entropy of float32 `logits [batch, length, vocab]` against
    `targets [batch, length]`.

    Returns:
      (summed loss over counted tokens, number of counted tokens, summed logsumexp^2).
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    m = jnp.ones_like(lse) if mask is None else mask.astype(jnp.float32)
    return jnp.sum((lse - tgt) * m), jnp.sum(m), jnp.sum(lse * lse * m)


def _forward(model: Transformer, params, router_bias, batch):
    return model.apply(
        {"params": params, "router_bias": router_bias},
        batch["inputs"],
        batch.get("positions"),
        batch.get("segment_ids"),
    )


def _tree_where(pred: jax.Array, a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def make_train_step(
    model: Transformer,
    tx: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    options: StepOptions = StepOptions(),
    post_update: Callable[[Any, dict[str, jax.Array]], tuple[Any, dict]] | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds `train_step(state, batch) -> (state, metrics)`.

    One step: forward + loss (token-mean cross-entropy, the MoE sequence-wise aux loss if
    enabled, optional z-loss), gradients (accumulated over `grad_accum` microbatches, token-
    weighted so that the result equals the one-big-batch gradient), the optax update, an
    optional `post_update(params, aux) -> (params, metrics)` hook (QK-clip), then the
    loss-free balancing update of the router biases from this step's global-batch loads.
    A non-finite loss or gradient skips the whole update (params, optimizer state, biases)
    and increments `state.bad_steps`.
    """
    cfg: ModelConfig = model.cfg
    k = options.grad_accum

    def micro_loss(params, router_bias, batch, n_total):
        logits, aux = _forward(model, params, router_bias, batch)
        ce_sum, n, z_sum = cross_entropy(logits, batch["targets"], batch.get("mask"))
        loss = (ce_sum + options.z_loss * z_sum) / n_total
        if "aux_loss" in aux:
            loss = loss + aux["aux_loss"] / k
        return loss, (ce_sum, aux)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def compute_grads(params, router_bias, batch):
        mask = batch.get("mask")
        n_total = jnp.maximum(
            jnp.asarray(batch["targets"].size, jnp.float32) if mask is None else mask.sum(), 1.0
        )
        if k == 1:
            (loss, (ce_sum, aux)), grads = grad_fn(params, router_bias, batch, n_total)
            return loss, ce_sum / n_total, aux, grads
        micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

        def body(carry, mb):
            g_acc, loss_acc, ce_acc = carry
            (loss, (ce_sum, aux)), g = grad_fn(params, router_bias, mb, n_total)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, loss_acc + loss, ce_acc + ce_sum), aux

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, loss, ce_sum), auxes = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
        aux = {"max_logits": jnp.max(auxes["max_logits"], axis=0)}
        if "moe_load" in auxes:
            aux["moe_load"] = jnp.sum(auxes["moe_load"], axis=0)
            aux["moe_dropped"] = jnp.mean(auxes["moe_dropped"], axis=0)
            aux["aux_loss"] = jnp.sum(auxes["aux_loss"]) / k
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return loss, ce_sum / n_total, aux, grads

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        loss, ce, aux, grads = compute_grads(state.params, state.router_bias, batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics: dict[str, jax.Array] = {
            "loss": ce,
            "total_loss": loss,
            "grad_norm": grad_norm,
            "update_norm": optax.tree.norm(updates),
            "max_logit": jnp.max(aux["max_logits"]),
            "max_logit_per_layer": jnp.max(aux["max_logits"], axis=-1),
        }
        if post_update is not None:
            params, extra = post_update(params, aux)
            metrics.update(extra)
        router_bias = state.router_bias
        if cfg.is_moe:
            router_bias = update_router_biases(cfg, state.router_bias, aux["moe_load"])
            metrics["moe/maxvio"] = max_violation(aux["moe_load"])
            metrics["moe/dropped_frac"] = aux["moe_dropped"]
            metrics["moe/aux_loss"] = aux["aux_loss"]
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if options.skip_nonfinite:
            params = _tree_where(finite, params, state.params)
            opt_state = _tree_where(finite, opt_state, state.opt_state)
            router_bias = _tree_where(finite, router_bias, state.router_bias)
        bad = jnp.where(finite, 0, state.bad_steps + 1).astype(state.bad_steps.dtype)
        metrics["skipped"] = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, router_bias=router_bias,
            bad_steps=bad,
        )
        return new_state, metrics

    return train_step


def make_eval_step(model: Transformer) -> Callable[[TrainState, dict[str, jax.Array]], dict]:
    """`eval_step(state, batch) -> {'loss_sum', 'tokens'}` (sum over counted tokens)."""

    def eval_step(state: TrainState, batch):
        logits, _ = _forward(model, state.params, state.router_bias, batch)
        ce_sum, n, _ = cross_entropy(logits, batch["targets"], batch.get("mask"))
        return {"loss_sum": ce_sum, "tokens": n}

    return eval_step

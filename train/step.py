"""The train and eval steps: pure functions `state, metrics = train_step(state, batch)`."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from model import ModelConfig, Transformer, max_violation, update_router_biases
from model.attention import choose_backend
from model.transformer import lm_head


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
    # Cross-entropy over chunks of about this many tokens with the LM head inside
    # (`chunked_cross_entropy`); 0: materialize the whole [tokens, vocab] float32 logits.
    ce_chunk_tokens: int = 512
    # "ce": token cross-entropy; "dft": each token's cross-entropy weighted by
    # stop_gradient(p(target)) (Dynamic Fine-Tuning, see `cross_entropy`). The reported
    # `loss` and the eval loss stay the plain cross-entropy.
    loss: str = "ce"
    # Log the gradient noise scale's inputs (`train.noise_scale`): the squared norms of the
    # microbatches' own gradients and of the step's gradient. Needs grad_accum >= 2.
    noise_scale: bool = False

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} must be one of {', '.join(LOSSES)}")
        if self.noise_scale and self.grad_accum < 2:
            raise ValueError("noise_scale compares the microbatches' gradients with the "
                             f"step's: it needs grad_accum >= 2, got {self.grad_accum}")


LOSSES = ("ce", "dft")


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None, *, loss: str = "ce"
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Token cross-entropy of float32 `logits [batch, length, vocab]` against
    `targets [batch, length]`.

    `loss="dft"`: Dynamic Fine-Tuning, each token's cross-entropy weighted by its own
    probability with the gradient stopped, `sum_t m_t sg(p_t) (-log p_t)` with
    p_t = softmax(logits_t)[target_t]; its gradient is the policy gradient of the token
    probabilities rather than of the log-probabilities.

    Returns:
      (summed loss over counted tokens, number of counted tokens, summed logsumexp^2).

    References:
      Wu et al. 2025, "On the Generalization of SFT: A Reinforcement Learning Perspective
      with Reward Rectification" (DFT).
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    m = jnp.ones_like(lse) if mask is None else mask.astype(jnp.float32)
    w = m * jax.lax.stop_gradient(jnp.exp(tgt - lse)) if loss == "dft" else m
    return jnp.sum((lse - tgt) * w), jnp.sum(m), jnp.sum(lse * lse * m)


def _scan_chunks(h, w, t, m, scale, z_loss, dft, with_grad):
    """Cross-entropy of `logits = (h @ w) * scale` over the leading (chunk) axis of
    `h [C, ..., d]` with a scan. Returns the summed (objective, ce, z) and, `with_grad`,
    d objective / d h (stacked per chunk) and d objective / d w (accumulated):
    d objective / d logits = (a + 2 z_loss m lse) softmax(logits) - a onehot(t), with the
    token weight a = m (cross-entropy) or m sg(p(t)) (`dft`, see `cross_entropy`)."""

    def body(dw, xs):
        hc, tc, mc = xs
        logits = jnp.einsum("...d,dv->...v", hc, w, preferred_element_type=jnp.float32) * scale
        lse = jax.nn.logsumexp(logits, axis=-1)
        hit = jnp.arange(logits.shape[-1], dtype=tc.dtype) == tc[..., None]
        tgt = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
        a = mc * jnp.exp(tgt - lse) if dft else mc
        ce, z = jnp.sum((lse - tgt) * mc), jnp.sum(lse * lse * mc)
        sums = (jnp.sum((lse - tgt) * a) + z_loss * z, ce, z)
        if not with_grad:
            return dw, sums
        coef = (a + 2.0 * z_loss * lse * mc)[..., None]
        dl = (jnp.exp(logits - lse[..., None]) * coef - jnp.where(hit, a[..., None], 0.0)) * scale
        dl = dl.astype(w.dtype)
        dh = jnp.einsum("...v,dv->...d", dl, w, preferred_element_type=jnp.float32)
        dwc = jnp.einsum("...d,...v->dv", hc, dl, preferred_element_type=jnp.float32)
        return dw + dwc, (*sums, dh.astype(hc.dtype))

    dw0 = jnp.zeros(w.shape, jnp.float32) if with_grad else None
    dw, outs = jax.lax.scan(body, dw0, (h, t, m))
    sums = tuple(jnp.sum(o) for o in outs[:3])
    return (sums, outs[3], dw.astype(w.dtype)) if with_grad else (sums, None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_ce(h, w, t, m, scale, z_loss, dft):
    return _scan_chunks(h, w, t, m, scale, z_loss, dft, with_grad=False)[0]


def _fused_ce_fwd(h, w, t, m, scale, z_loss, dft):
    # The gradient of the (scalar, final) objective is computed chunk by chunk here, while
    # each chunk's logits are at hand; the backward pass only scales it.
    sums, dh, dw = _scan_chunks(h, w, t, m, scale, z_loss, dft, with_grad=True)
    return sums, (dh, dw)


def _fused_ce_bwd(scale, z_loss, dft, res, g):
    dh, dw = res
    g_obj = g[0]  # ce and z leave through stop_gradient (see chunked_cross_entropy)
    return (dh * g_obj.astype(dh.dtype), dw * g_obj.astype(dw.dtype), None, None)


_fused_ce.defvjp(_fused_ce_fwd, _fused_ce_bwd)


def chunked_cross_entropy(
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    logit_scale: float = 1.0,
    z_loss: float = 0.0,
    chunk_tokens: int = 512,
    loss: str = "ce",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """`cross_entropy` of `logits = (hidden @ kernel) * logit_scale` without ever holding
    the whole `[tokens, vocab]` float32 logits: the LM head is applied inside a scan over
    chunks of the length axis (about `chunk_tokens` tokens each, all rows at once so that a
    batch-sharded `hidden` stays sharded), and the gradient is formed in the same pass
    (softmax - one-hot per chunk, as in Liger-Kernel's fused linear cross-entropy, Hsu et
    al. 2024), so the backward pass stores no logits either.

    Args:
      hidden: `[batch, length, d_model]`; kernel: `[d_model, vocab]`;
      targets, mask: `[batch, length]`.
      loss: "ce", or "dft" (each token's term weighted by sg(p(target)), see
        `cross_entropy`): the objective's first term; `ce_sum` is always the cross-entropy.
    Returns:
      `(objective, ce_sum, n, z_sum)` with `objective = ce_sum + z_loss * z_sum` ("ce").
      Only `objective` carries a gradient (to `hidden` and `kernel`); the others are
      statistics.
    """
    b, t, d = hidden.shape
    m = jnp.ones((b, t), jnp.float32) if mask is None else mask.astype(jnp.float32)
    k = max(1, min(t, chunk_tokens // max(b, 1)))
    pad = -t % k
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        m = jnp.pad(m, ((0, 0), (0, pad)))
    c = (t + pad) // k
    chunks = lambda x: jnp.moveaxis(x.reshape((b, c, k) + x.shape[2:]), 1, 0)  # noqa: E731
    obj, ce, z = _fused_ce(chunks(hidden), kernel, chunks(targets.astype(jnp.int32)), chunks(m),
                           float(logit_scale), float(z_loss), loss == "dft")
    return obj, jax.lax.stop_gradient(ce), jnp.sum(m), jax.lax.stop_gradient(z)


def forward(model: Transformer, params, router_bias, batch, return_hidden: bool = False,
            dropout_rng: jax.Array | None = None):
    """The training forward of `batch` (`inputs`, optional `positions`, `segment_ids`):
    `(logits or hidden, aux)`; `dropout_rng` turns on the model's dropout (LoRA's)."""
    return model.apply(
        {"params": params, "router_bias": router_bias},
        batch["inputs"],
        batch.get("positions"),
        batch.get("segment_ids"),
        return_hidden=return_hidden,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng},
    )


def dropout_rng(cfg: ModelConfig, state: TrainState) -> jax.Array | None:
    """This step's dropout key (from the state's rng and step), or None when the model has
    no dropout (`lora_dropout` with adapters), so that the program then holds no random
    bits."""
    if not (cfg.lora_rank and cfg.lora_dropout > 0):
        return None
    return jax.random.fold_in(jax.random.fold_in(state.rng, 0x6c6f7261), state.step)


def _loss_sums(model: Transformer, params, router_bias, batch, options: StepOptions,
               rng: jax.Array | None = None):
    """(objective = ce_sum (DFT: its weighted sum) + z_loss * z_sum, ce_sum, n, aux) of one
    (micro)batch."""
    chunk = options.ce_chunk_tokens
    if chunk > 0:
        hidden, aux = forward(model, params, router_bias, batch, True, rng)
        kernel, scale = lm_head(model.cfg, params)
        obj, ce_sum, n, _ = chunked_cross_entropy(
            hidden, kernel, batch["targets"], batch.get("mask"), logit_scale=scale,
            z_loss=options.z_loss, chunk_tokens=chunk, loss=options.loss,
        )
        return obj, ce_sum, n, aux
    logits, aux = forward(model, params, router_bias, batch, False, rng)
    ce_sum, n, z_sum = cross_entropy(logits, batch["targets"], batch.get("mask"))
    obj_sum = ce_sum
    if options.loss != "ce":
        obj_sum = cross_entropy(logits, batch["targets"], batch.get("mask"), loss=options.loss)[0]
    return obj_sum + options.z_loss * z_sum, ce_sum, n, aux


def _sq_norm(tree: Any) -> jax.Array:
    """Sum of squares of every element of `tree`, in float32."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))


def make_apply_update(
    cfg: ModelConfig,
    tx: optax.GradientTransformation,
    post_update: Callable[[Any, dict[str, jax.Array]], tuple[Any, dict]] | None = None,
) -> Callable[..., tuple[Any, Any, Any, dict[str, jax.Array]]]:
    """Builds `apply_update(finite, params, opt_state, router_bias, grads, aux) ->
    (params, opt_state, router_bias, metrics)`, the update shared by every step (train,
    RL, ...): the optax update, the optional `post_update(params, aux) -> (params,
    metrics)` hook (QK-clip), then the loss-free balancing update of the router biases
    from `aux['moe_load']` (DeepSeek-V3). With `finite` (a bool scalar) false, nothing is
    updated and the update metrics are 0; `finite=None` updates unconditionally."""

    def update(params, opt_state, router_bias, grads, aux):
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"update_norm": optax.tree.norm(updates)}
        if post_update is not None:
            params, extra = post_update(params, aux)
            metrics.update(extra)
        if cfg.is_moe:
            router_bias = update_router_biases(cfg, router_bias, aux["moe_load"])
        return params, opt_state, router_bias, metrics

    def skip(params, opt_state, router_bias, grads, aux):
        shapes = jax.eval_shape(update, params, opt_state, router_bias, grads, aux)[3]
        return (params, opt_state, router_bias,
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    def apply_update(finite, params, opt_state, router_bias, grads, aux):
        if finite is None:
            return update(params, opt_state, router_bias, grads, aux)
        # A conditional rather than a select over the new and old trees: the update is done
        # in place, and not at all for a skipped step.
        return jax.lax.cond(finite, update, skip, params, opt_state, router_bias, grads, aux)

    return apply_update


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

    `options.noise_scale`: the metrics also hold `noise/g_small_sq` (the mean over the
    microbatches of |G_m|^2, G_m the gradient of microbatch m's own token-mean loss, i.e.
    its accumulated share scaled by n_total / n_m), `noise/g_big_sq` (|G|^2 of the step's
    gradient, before the optimizer's clipping) and `noise/b_small`, `noise/b_big` (counted
    tokens: mean per microbatch, per step), the inputs of `train.noise_scale`.
    """
    cfg: ModelConfig = model.cfg
    k = options.grad_accum

    def micro_loss(params, router_bias, batch, n_total, rng):
        obj, ce_sum, _, aux = _loss_sums(model, params, router_bias, batch, options, rng)
        loss = obj / n_total
        if "aux_loss" in aux:
            loss = loss + aux["aux_loss"] / k
        return loss, (ce_sum, aux)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def compute_grads(params, router_bias, batch, rng):
        mask = batch.get("mask")
        n_total = jnp.maximum(
            jnp.asarray(batch["targets"].size, jnp.float32) if mask is None else mask.sum(), 1.0
        )
        if k == 1:
            (loss, (ce_sum, aux)), grads = grad_fn(params, router_bias, batch, n_total, rng)
            return loss, ce_sum / n_total, aux, grads, {}
        micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

        def body(carry, xs):
            mb, i = xs
            g_acc, loss_acc, ce_acc, small_sq = carry
            key = None if rng is None else jax.random.fold_in(rng, i)
            (loss, (ce_sum, aux)), g = grad_fn(params, router_bias, mb, n_total, key)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            if options.noise_scale:  # |G_m|^2 of the microbatch's own mean: g * n_total / n_m
                n_m = jnp.maximum(jnp.asarray(mb["targets"].size, jnp.float32)
                                  if mask is None else mb["mask"].sum(), 1.0)
                small_sq = small_sq + _sq_norm(g) * (n_total / n_m) ** 2
            return (g_acc, loss_acc + loss, ce_acc + ce_sum, small_sq), aux

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, loss, ce_sum, small_sq), auxes = jax.lax.scan(
            body, (zeros, 0.0, 0.0, jnp.zeros((), jnp.float32)), (micro, jnp.arange(k)))
        noise = {}
        if options.noise_scale:
            noise = {"noise/g_small_sq": small_sq / k, "noise/g_big_sq": _sq_norm(grads),
                     "noise/b_small": n_total / k, "noise/b_big": n_total}
        aux = {"max_logits": jnp.max(auxes["max_logits"], axis=0)}
        if "moe_load" in auxes:
            aux["moe_load"] = jnp.sum(auxes["moe_load"], axis=0)
            aux["moe_dropped"] = jnp.mean(auxes["moe_dropped"], axis=0)
            aux["aux_loss"] = jnp.sum(auxes["aux_loss"]) / k
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        return loss, ce_sum / n_total, aux, grads, noise

    apply_update = make_apply_update(cfg, tx, post_update)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        loss, ce, aux, grads, noise = compute_grads(state.params, state.router_bias, batch,
                                                    dropout_rng(cfg, state))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state, router_bias, update_metrics = apply_update(
            finite if options.skip_nonfinite else None,
            state.params, state.opt_state, state.router_bias, grads, aux)
        metrics: dict[str, jax.Array] = {"loss": ce, "total_loss": loss, "grad_norm": grad_norm}
        metrics.update(update_metrics)
        metrics.update(noise)
        if choose_backend(cfg, batch["inputs"].shape[1]).max_logits:
            metrics["max_logit"] = jnp.max(aux["max_logits"])
            metrics["max_logit_per_layer"] = jnp.max(aux["max_logits"], axis=-1)
        if cfg.is_moe:
            metrics["moe/maxvio"] = max_violation(aux["moe_load"])
            metrics["moe/dropped_frac"] = aux["moe_dropped"]
            metrics["moe/aux_loss"] = aux["aux_loss"]
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        bad = jnp.where(finite, 0, state.bad_steps + 1).astype(state.bad_steps.dtype)
        metrics["skipped"] = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1, params=params, opt_state=opt_state, router_bias=router_bias,
            bad_steps=bad,
        )
        return new_state, metrics

    return train_step


def make_eval_step(
    model: Transformer, options: StepOptions = StepOptions()
) -> Callable[[TrainState, dict[str, jax.Array]], dict]:
    """`eval_step(state, batch) -> {'loss_sum', 'tokens'}` (sum over counted tokens)."""

    def eval_step(state: TrainState, batch):
        _, ce_sum, n, _ = _loss_sums(model, state.params, state.router_bias, batch, options)
        return {"loss_sum": ce_sum, "tokens": n}

    return eval_step

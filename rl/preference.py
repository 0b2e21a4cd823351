"""Preference-optimization objectives (DPO, cDPO, IPO, SimPO, ORPO, KTO) and their step.

Every loss takes per-sequence SUMMED log-probabilities of completions (float32 `[pairs]`,
or `[examples]` for KTO), log pi(y|x) = sum_t m_t log pi(y_t | x, y_<t), and returns
`(loss, metrics)` with the loss averaged over pairs (examples for KTO). Notation:
pi_c, pi_r are the policy's summed log-probs of the chosen and rejected completions,
ref_c, ref_r the frozen reference's, |y| the number of counted completion tokens, and

    h = (pi_c - ref_c) - (pi_r - ref_r)

the difference of the implicit rewards (up to beta) of DPO.

Metrics (float32 scalars): `reward_chosen`, `reward_rejected` (means of the implicit
rewards: beta (pi - ref) for DPO/IPO, beta pi / |y| for SimPO, lam pi / |y| for ORPO),
`reward_margin` (mean of reward_chosen - reward_rejected; beta h for DPO/IPO),
`reward_accuracy` (fraction of pairs with a positive margin), `logps_chosen`,
`logps_rejected` (means of the summed log-probs); ORPO adds `nll_loss`, `or_loss`,
`log_odds_ratio`; DPO with `nll_weight` > 0 (RPO) adds `dpo_loss`, `nll_loss`; KTO
reports `kl` and its rewards split by label (no accuracy).

`sequence_logps` turns a model forward into those sums; `make_preference_step` builds the
jit-able training step (`train.step.TrainState`, `train.step.make_apply_update`).

Hyperparameters are checked in Python (ValueError naming the argument). Lengths are
checked to be > 0 when they are concrete arrays; inside `jit` they are not (a row without
counted tokens then gives a non-finite loss, and the step skips the update).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from model import ModelConfig, Transformer, max_violation
from model.attention import choose_backend
from model.transformer import lm_head
from train.step import TrainState, dropout_rng, forward, make_apply_update

Metrics = dict[str, jax.Array]

__all__ = [
    "LOSSES",
    "NEEDS_REF",
    "dpo",
    "get",
    "ipo",
    "kto",
    "make_preference_step",
    "orpo",
    "sequence_logps",
    "simpo",
    "token_logps",
]


# ------------------------------------------------------------------------ small helpers
def _f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _check(cond: bool, name: str, what: str, value) -> None:
    if not cond:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _check_lengths(name: str, lengths) -> None:
    """ValueError unless every length is > 0 (skipped for traced arrays, see the module)."""
    if isinstance(lengths, jax.core.Tracer):
        return
    arr = np.asarray(lengths)
    _check(bool(np.all(arr > 0)), name, "> 0 everywhere", arr.tolist())


def _pair_metrics(reward_c, reward_r, pi_c, pi_r) -> Metrics:
    sg = jax.lax.stop_gradient
    reward_c, reward_r = sg(reward_c), sg(reward_r)
    margin = reward_c - reward_r
    return {
        "reward_chosen": jnp.mean(reward_c),
        "reward_rejected": jnp.mean(reward_r),
        "reward_margin": jnp.mean(margin),
        "reward_accuracy": jnp.mean((margin > 0).astype(jnp.float32)),
        "logps_chosen": jnp.mean(sg(pi_c)),
        "logps_rejected": jnp.mean(sg(pi_r)),
    }


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler, "Accurately Computing
    log(1 - exp(-|a|))", 2012): log(-expm1(x)) above -log 2, log1p(-exp(x)) below."""
    x = jnp.minimum(x, 0.0)
    near = x > -np.log(2.0)
    return jnp.where(near, jnp.log(-jnp.expm1(jnp.where(near, x, -1.0))),
                     jnp.log1p(-jnp.exp(jnp.where(near, -1.0, x))))


# ------------------------------------------------------------------------------- losses
def dpo(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
    chosen_lengths: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Direct Preference Optimization, conservative DPO with `label_smoothing` > 0, and
    DPO plus the chosen completions' NLL (RPO) with `nll_weight` > 0.

    h = (pi_c - ref_c) - (pi_r - ref_r)
    L = mean_pairs[ -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)
                    - alpha pi_c / |y_c| ]

    With ls = 0 and alpha = 0 this is DPO (Eq. 7); ls = eps is cDPO, the DPO loss under
    labels flipped with probability eps. The gradient of pair i with respect to pi_c
    (ls = 0, alpha = 0) is -beta sigmoid(beta (r_r - r_c)) / n, r = pi - ref: the paper's
    weight, larger when the implicit reward model orders the pair wrongly.

    alpha = `nll_weight` adds the token-mean negative log-likelihood of the chosen
    completion (`chosen_lengths` = |y_c| counted tokens), as in Iterative RPO (Eq. 1 there,
    alpha = 1): DPO alone only needs pi_c - pi_r to grow and often lowers pi_c as well
    ("likelihood displacement", the chosen answer itself becoming less likely); the NLL
    term keeps pushing the chosen completion up.

    Args:
      chosen_logps, rejected_logps: the policy's summed log-probs `[pairs]`.
      ref_chosen_logps, ref_rejected_logps: the reference's `[pairs]` (held constant).
      beta: > 0, the KL coefficient (temperature of the implicit reward).
      label_smoothing: in [0, 0.5), the assumed label-flip probability (cDPO).
      nll_weight: >= 0, alpha, the weight of the chosen completions' token-mean NLL.
      chosen_lengths: counted tokens of the chosen completions `[pairs]`, > 0; required
        when nll_weight > 0, unused otherwise.
    Returns:
      (scalar loss, metrics); rewards beta (pi - ref), margin beta h; with nll_weight > 0
      also `dpo_loss` and `nll_loss` (pair means of the two terms, NLL unweighted).

    References: Rafailov et al., "Direct Preference Optimization: Your Language Model is
    Secretly a Reward Model", arXiv:2305.18290; Mitchell, "A note on DPO with noisy
    preferences & relationship to IPO", 2023 (cDPO); Pang et al., "Iterative Reasoning
    Preference Optimization", arXiv:2404.19733 (DPO + NLL); Razin et al., "Unintentional
    Unalignment: Likelihood Displacement in Direct Preference Optimization",
    arXiv:2410.08847.
    """
    _check(beta > 0, "beta", "> 0", beta)
    _check(0.0 <= label_smoothing < 0.5, "label_smoothing", "in [0, 0.5)", label_smoothing)
    _check(nll_weight >= 0, "nll_weight", ">= 0", nll_weight)
    if nll_weight > 0:
        _check(chosen_lengths is not None, "chosen_lengths", "given when nll_weight > 0",
               chosen_lengths)
        _check_lengths("chosen_lengths", chosen_lengths)
    pi_c, pi_r, ref_c, ref_r = _f32(chosen_logps, rejected_logps, ref_chosen_logps,
                                    ref_rejected_logps)
    ref_c, ref_r = jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)
    h = (pi_c - ref_c) - (pi_r - ref_r)
    losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
              - label_smoothing * jax.nn.log_sigmoid(-beta * h))
    metrics = _pair_metrics(beta * (pi_c - ref_c), beta * (pi_r - ref_r), pi_c, pi_r)
    if nll_weight > 0:
        nll = -pi_c / jnp.asarray(chosen_lengths, jnp.float32)
        metrics.update(dpo_loss=jax.lax.stop_gradient(jnp.mean(losses)),
                       nll_loss=jax.lax.stop_gradient(jnp.mean(nll)))
        losses = losses + nll_weight * nll
    return jnp.mean(losses), metrics


def ipo(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    beta: float = 0.1,
) -> tuple[jax.Array, Metrics]:
    """Identity Preference Optimization (IPO, the empirical loss of Eq. 17).

    h = (pi_c - ref_c) - (pi_r - ref_r)
    L = mean_pairs[ (h - 1 / (2 beta))^2 ]

    Regresses the log-likelihood-ratio gap to 1 / (2 beta) instead of pushing it to
    infinity. As in the paper, h uses the SEQUENCE log-ratios (summed log-probs); TRL's
    `ipo` uses per-token averages instead, which changes the effective beta with the length.

    Args: as `dpo` (beta > 0 the regularization strength; its role is that of tau in the
    paper).
    Returns: (scalar loss, metrics); rewards beta (pi - ref), margin beta h.

    References: Azar et al., "A General Theoretical Paradigm to Understand Learning from
    Human Preferences", arXiv:2310.12036.
    """
    _check(beta > 0, "beta", "> 0", beta)
    pi_c, pi_r, ref_c, ref_r = _f32(chosen_logps, rejected_logps, ref_chosen_logps,
                                    ref_rejected_logps)
    ref_c, ref_r = jax.lax.stop_gradient(ref_c), jax.lax.stop_gradient(ref_r)
    h = (pi_c - ref_c) - (pi_r - ref_r)
    loss = jnp.mean((h - 1.0 / (2.0 * beta)) ** 2)
    return loss, _pair_metrics(beta * (pi_c - ref_c), beta * (pi_r - ref_r), pi_c, pi_r)


def simpo(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[jax.Array, Metrics]:
    """Simple Preference Optimization: reference-free, with length-normalized rewards.

    L = mean_pairs[ -log sigmoid(beta pi_c / |y_c| - beta pi_r / |y_r| - gamma) ]

    (Eq. 6), gamma the target reward margin.

    Args:
      chosen_logps, rejected_logps: summed log-probs `[pairs]`.
      chosen_lengths, rejected_lengths: counted tokens `[pairs]`, > 0.
      beta: > 0; gamma: >= 0.
    Returns: (scalar loss, metrics); rewards beta pi / |y| (the margin excludes gamma).

    References: Meng, Xia and Chen, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", arXiv:2405.14734.
    """
    _check(beta > 0, "beta", "> 0", beta)
    _check(gamma >= 0, "gamma", ">= 0", gamma)
    _check_lengths("chosen_lengths", chosen_lengths)
    _check_lengths("rejected_lengths", rejected_lengths)
    pi_c, pi_r, len_c, len_r = _f32(chosen_logps, rejected_logps, chosen_lengths,
                                    rejected_lengths)
    reward_c, reward_r = beta * pi_c / len_c, beta * pi_r / len_r
    loss = jnp.mean(-jax.nn.log_sigmoid(reward_c - reward_r - gamma))
    return loss, _pair_metrics(reward_c, reward_r, pi_c, pi_r)


def orpo(
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
    chosen_lengths: jax.Array,
    rejected_lengths: jax.Array,
    lam: float = 0.1,
) -> tuple[jax.Array, Metrics]:
    """Odds Ratio Preference Optimization: SFT on the chosen completion plus an odds-ratio
    penalty, reference-free.

    log P(y|x) = pi / |y|                        (length-averaged, Eq. 2-3)
    log odds(y|x) = log P - log(1 - P)            (log1p(-exp(.)), computed stably)
    L_SFT = -pi_c / |y_c|                         (token-mean NLL of the chosen completion)
    L_OR = -log sigmoid(log odds_c - log odds_r)
    L = mean_pairs[ L_SFT + lam L_OR ]            (Eq. 6)

    Args:
      chosen_logps, rejected_logps: summed log-probs `[pairs]` (< 0).
      chosen_lengths, rejected_lengths: counted tokens `[pairs]`, > 0.
      lam: >= 0, the weight of the odds-ratio term (lambda in the paper).
    Returns:
      (scalar combined loss, metrics) with `nll_loss`, `or_loss` (both pair means),
      `log_odds_ratio` (mean log odds_c - log odds_r); rewards lam pi / |y|.

    References: Hong, Lee and Thorne, "ORPO: Monolithic Preference Optimization without
    Reference Model", arXiv:2403.07691.
    """
    _check(lam >= 0, "lam", ">= 0", lam)
    _check_lengths("chosen_lengths", chosen_lengths)
    _check_lengths("rejected_lengths", rejected_lengths)
    pi_c, pi_r, len_c, len_r = _f32(chosen_logps, rejected_logps, chosen_lengths,
                                    rejected_lengths)
    avg_c, avg_r = pi_c / len_c, pi_r / len_r
    log_odds = (avg_c - _log1mexp(avg_c)) - (avg_r - _log1mexp(avg_r))
    nll = jnp.mean(-avg_c)
    or_loss = jnp.mean(-jax.nn.log_sigmoid(log_odds))
    metrics = _pair_metrics(lam * avg_c, lam * avg_r, pi_c, pi_r)
    metrics.update(nll_loss=nll, or_loss=or_loss,
                   log_odds_ratio=jnp.mean(jax.lax.stop_gradient(log_odds)))
    return nll + lam * or_loss, metrics


def kto(
    logps: jax.Array,
    ref_logps: jax.Array,
    desirable: jax.Array,
    kl: jax.Array,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> tuple[jax.Array, Metrics]:
    """Kahneman-Tversky Optimization, on unpaired examples labelled desirable or not.

    r = pi - ref,   z0 = max(kl, 0) (stop-gradient)
    loss_i = lambda_d (1 - sigmoid(beta (r_i - z0)))   if desirable_i
             lambda_u (1 - sigmoid(beta (z0 - r_i)))   otherwise
    L = mean_examples loss_i

    (Eq. 8: lambda_y - v(x, y), averaged.) z0 is the reference point, a batch estimate of
    KL(pi || pi_ref) (see `make_preference_step` for how the step forms it); it carries no
    gradient.

    Args:
      logps, ref_logps: summed log-probs of each example's completion `[examples]`.
      desirable: bool `[examples]`.
      kl: scalar estimate of KL(pi || pi_ref).
      beta: > 0; lambda_d, lambda_u: >= 0, the weights of desirable / undesirable examples.
    Returns:
      (scalar loss, metrics): `kl` (z0), `reward_chosen` / `reward_rejected` and
      `logps_chosen` / `logps_rejected` (means of beta r and pi over desirable /
      undesirable examples, 0 when there is none), `reward_margin` (their difference).

    References: Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic
    Optimization", arXiv:2402.01306.
    """
    _check(beta > 0, "beta", "> 0", beta)
    _check(lambda_d >= 0, "lambda_d", ">= 0", lambda_d)
    _check(lambda_u >= 0, "lambda_u", ">= 0", lambda_u)
    pi, ref = _f32(logps, ref_logps)
    ref = jax.lax.stop_gradient(ref)
    z0 = jax.lax.stop_gradient(jnp.maximum(jnp.asarray(kl, jnp.float32), 0.0))
    d = jnp.asarray(desirable, bool)
    r = pi - ref
    losses = jnp.where(d, lambda_d * (1.0 - jax.nn.sigmoid(beta * (r - z0))),
                       lambda_u * (1.0 - jax.nn.sigmoid(beta * (z0 - r))))
    sg = jax.lax.stop_gradient
    df = d.astype(jnp.float32)
    n_d, n_u = jnp.maximum(jnp.sum(df), 1.0), jnp.maximum(jnp.sum(1.0 - df), 1.0)
    reward_c = jnp.sum(sg(beta * r) * df) / n_d
    reward_r = jnp.sum(sg(beta * r) * (1.0 - df)) / n_u
    metrics = {
        "kl": z0,
        "reward_chosen": reward_c,
        "reward_rejected": reward_r,
        "reward_margin": reward_c - reward_r,
        "logps_chosen": jnp.sum(sg(pi) * df) / n_d,
        "logps_rejected": jnp.sum(sg(pi) * (1.0 - df)) / n_u,
    }
    return jnp.mean(losses), metrics


LOSSES: dict[str, Callable[..., tuple[jax.Array, Metrics]]] = {
    "dpo": dpo,
    "ipo": ipo,
    "simpo": simpo,
    "orpo": orpo,
    "kto": kto,
}
NEEDS_REF = frozenset({"dpo", "ipo", "kto"})  # the losses that use a reference policy


def get(name: str) -> Callable[..., tuple[jax.Array, Metrics]]:
    """The loss called `name` (a key of `LOSSES`); ValueError naming the choices otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown preference loss {name!r} (available: {', '.join(LOSSES)})")
    return LOSSES[name]


# ------------------------------------------------------------------ log-probs of rows
def token_logps(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per position, float32 `[..., length]`."""
    logits = logits.astype(jnp.float32)
    tgt = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return tgt - jax.nn.logsumexp(logits, axis=-1)


def sequence_logps(
    logits: jax.Array, targets: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-row summed target log-probs and lengths under a loss mask.

    Args:
      logits: `[rows, length, vocab]`; targets, mask: `[rows, length]` (position t
        predicts targets[t]; mask 1 on the completion tokens that count).
    Returns:
      (sum_t m_t log softmax(logits_t)[targets_t] `[rows]`, sum_t m_t `[rows]`), float32.
    """
    m = mask.astype(jnp.float32)
    return jnp.sum(token_logps(logits, targets) * m, axis=-1), jnp.sum(m, axis=-1)


def _chunked_token_logps(hidden, kernel, scale, targets, chunk_tokens):
    """`token_logps((hidden @ kernel) * scale, targets)` over chunks of the length axis
    (about `chunk_tokens` tokens each, all rows at once), rematerialized in the backward
    pass: no `[tokens, vocab]` logits are held beyond one chunk."""
    b, t, _ = hidden.shape
    k = max(1, min(t, chunk_tokens // max(b, 1)))
    pad = -t % k
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    c = (t + pad) // k

    def chunks(x):
        return jnp.moveaxis(x.reshape((b, c, k) + x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(hc, tc):
        logits = jnp.einsum("bkd,dv->bkv", hc, kernel, preferred_element_type=jnp.float32)
        return token_logps(logits * scale, tc)

    out = jax.lax.map(lambda xs: one(*xs), (chunks(hidden), chunks(targets)))  # [c, b, k]
    return jnp.moveaxis(out, 0, 1).reshape(b, c * k)[:, :t]


def rows_logps(model, params, router_bias, inputs, targets, mask, positions, chunk_tokens,
               rng=None):
    """(summed log-probs `[rows]`, lengths `[rows]`, aux) of token rows `[rows, T]` under the
    model (`rng`: a dropout key, for the policy's training forward only)."""
    batch = {"inputs": inputs, "positions": positions}
    if chunk_tokens > 0:
        hidden, aux = forward(model, params, router_bias, batch, True, rng)
        kernel, scale = lm_head(model.cfg, params)
        tok = _chunked_token_logps(hidden, kernel, scale, targets, chunk_tokens)
    else:
        logits, aux = forward(model, params, router_bias, batch, False, rng)
        tok = token_logps(logits, targets)
    m = mask.astype(jnp.float32)
    return jnp.sum(tok * m, axis=-1), jnp.sum(m, axis=-1), aux


# ------------------------------------------------------------------------------- step
def _lengths_kw(loss_fn, chosen_lengths) -> dict[str, Any]:
    """{'chosen_lengths': ...} for a reference-based loss that takes them (dpo's NLL
    term), else {}."""
    return ({"chosen_lengths": chosen_lengths}
            if "chosen_lengths" in inspect.signature(loss_fn).parameters else {})


_ROW_KEYS = ("inputs", "targets", "mask", "positions")


def _concat_rows(batch, prefixes):
    """The rows of `prefix + key` for each prefix, stacked along the first axis, as
    (inputs, targets, mask, positions or None)."""
    out = []
    for key in _ROW_KEYS:
        parts = [batch.get(p + key) for p in prefixes]
        if key == "positions" and all(x is None for x in parts):
            out.append(None)
            continue
        missing = [p + key for p, x in zip(prefixes, parts, strict=True) if x is None]
        if missing:
            raise ValueError(f"preference batch lacks {', '.join(missing)}")
        if len({x.shape[1] for x in parts}) > 1:
            raise ValueError(f"{'/'.join(p + key for p in prefixes)} differ in length "
                             f"{[x.shape for x in parts]}; pad them to one length")
        out.append(jnp.concatenate(parts, axis=0))
    return tuple(out)


def make_preference_step(
    model: Transformer,
    tx: optax.GradientTransformation,
    loss: str = "dpo",
    loss_kwargs: dict[str, Any] | None = None,
    *,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    post_update: Callable[[Any, dict[str, jax.Array]], tuple[Any, dict]] | None = None,
    chunk_tokens: int = 512,
    skip_nonfinite: bool = True,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Builds `step(state, batch, ref=None) -> (state, metrics)` (pure; `jax.jit` it).

    Pairwise losses (dpo, ipo, simpo, orpo): `batch` holds `chosen_inputs`,
    `chosen_targets`, `chosen_mask` [, `chosen_positions`] and the same `rejected_*`, all
    `[pairs, seq]` (position t predicts targets[t]; mask 1 on the completion tokens).
    Chosen and rejected rows go through ONE forward (stacked along the batch axis).

    KTO: `inputs`, `targets`, `mask` [, `positions`] `[examples, seq]` and `desirable`
    `[examples]` (bool). The reference point z0 is, by choice of the batch:
      * with `kl_inputs`, `kl_targets`, `kl_mask` [, `kl_positions`]: the paper's estimate,
        mean over those rows of (pi - ref), where the data pipeline has built each row from
        prompt i and a MISMATCHED completion (that of example i + 1 mod n, as in the paper
        and TRL); `ref_kl_logps` may hold the reference's log-probs of those rows;
      * without: the batch mean of (pi - ref) over the examples themselves (cheaper, and
        correlated with the examples' own rewards).
    Either way it is clamped at 0 and carries no gradient.

    Reference log-probs: from the batch (`ref_chosen_logps` / `ref_rejected_logps`
    `[pairs]`, or `ref_logps` `[examples]` for KTO) when present, else from the frozen
    `ref = {'params', 'router_bias'}` inside the same step under stop_gradient. A loss
    that needs a reference (`NEEDS_REF`) with neither raises ValueError when traced.

    Args:
      model: the policy `Transformer`.
      tx: the optimizer; the update is `train.step.make_apply_update`'s (optax update,
        `post_update` hook such as QK-clip, MoE router-bias balancing).
      loss: a key of `LOSSES`; loss_kwargs: its hyperparameters (beta, ...), checked here.
      schedule: the LR schedule, for the `lr` metric only.
      chunk_tokens: log-probs over chunks of about this many tokens with the LM head
        inside (rematerialized in the backward pass); 0: whole float32 logits.
      skip_nonfinite: a non-finite loss or gradient skips the update and counts in
        `state.bad_steps`.

    Metrics: the loss's metrics, `loss` (the preference loss), `total_loss` (plus the MoE
    sequence-wise aux loss when enabled), `grad_norm`, `update_norm`, `skipped`, `lr` with
    a schedule, `max_logit` where the attention backend gives it, `moe/maxvio` and `moe/dropped_frac`
    with MoE.
    """
    cfg: ModelConfig = model.cfg
    loss_fn = get(loss)
    kw = dict(loss_kwargs or {})
    # Check the hyperparameters now, on a dummy batch, rather than at the first trace.
    if loss == "kto":
        loss_fn(np.zeros(1), np.zeros(1), np.ones(1, bool), 0.0, **kw)
    elif loss in NEEDS_REF:
        loss_fn(*(np.zeros(1),) * 4, **kw, **_lengths_kw(loss_fn, np.ones(1)))
    else:
        loss_fn(np.zeros(1) - 1.0, np.zeros(1) - 1.0, np.ones(1), np.ones(1), **kw)
    sg = jax.lax.stop_gradient

    def rows(params, router_bias, r, rng=None):
        return rows_logps(model, params, router_bias, *r, chunk_tokens, rng)

    def ref_rows(ref, r, what):
        if ref is None:
            raise ValueError(f"loss {loss!r} needs reference log-probs: put {what} in the "
                             "batch or pass ref={'params', 'router_bias'}")
        logps, _, _ = rows(sg(ref["params"]), sg(ref["router_bias"]), r)
        return sg(logps)

    def pair_objective(params, router_bias, batch, ref, rng):
        r = _concat_rows(batch, ("chosen_", "rejected_"))
        logps, lengths, aux = rows(params, router_bias, r, rng)
        p = batch["chosen_targets"].shape[0]
        pi_c, pi_r = logps[:p], logps[p:]
        if loss in NEEDS_REF:
            if "ref_chosen_logps" in batch and "ref_rejected_logps" in batch:
                ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            else:
                ref_logps = ref_rows(ref, r, "ref_chosen_logps/ref_rejected_logps")
                ref_c, ref_r = ref_logps[:p], ref_logps[p:]
            value, metrics = loss_fn(pi_c, pi_r, ref_c, ref_r, **kw,
                                     **_lengths_kw(loss_fn, lengths[:p]))
        else:
            value, metrics = loss_fn(pi_c, pi_r, lengths[:p], lengths[p:], **kw)
        return value, metrics, aux

    def kto_objective(params, router_bias, batch, ref, rng):
        with_kl = "kl_inputs" in batch
        r = _concat_rows(batch, ("", "kl_") if with_kl else ("",))
        logps, _, aux = rows(params, router_bias, r, rng)
        n = batch["targets"].shape[0]
        if "ref_logps" in batch and (not with_kl or "ref_kl_logps" in batch):
            ref_logps = jnp.concatenate(
                [batch["ref_logps"]] + ([batch["ref_kl_logps"]] if with_kl else []))
        else:
            ref_logps = ref_rows(ref, r, "ref_logps (and ref_kl_logps)")
            if "ref_logps" in batch:
                ref_logps = ref_logps.at[:n].set(batch["ref_logps"])
        diff = sg(logps - ref_logps)
        kl = jnp.mean(diff[n:] if with_kl else diff)
        value, metrics = loss_fn(logps[:n], ref_logps[:n], batch["desirable"], kl, **kw)
        return value, metrics, aux

    objective = kto_objective if loss == "kto" else pair_objective

    def total(params, router_bias, batch, ref, rng):
        value, metrics, aux = objective(params, router_bias, batch, ref, rng)
        full = value + aux["aux_loss"] if "aux_loss" in aux else value
        return full, (value, metrics, aux)

    grad_fn = jax.value_and_grad(total, has_aux=True)
    apply_update = make_apply_update(cfg, tx, post_update)

    def step(state: TrainState, batch: dict[str, jax.Array], ref: Any = None):
        (full, (value, metrics, aux)), grads = grad_fn(state.params, state.router_bias,
                                                        batch, ref, dropout_rng(cfg, state))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(full) & jnp.isfinite(grad_norm)
        params, opt_state, router_bias, update_metrics = apply_update(
            finite if skip_nonfinite else None,
            state.params, state.opt_state, state.router_bias, grads, aux)
        metrics = {**metrics, "loss": value, "total_loss": full, "grad_norm": grad_norm,
                   **update_metrics, "skipped": (~finite).astype(jnp.int32)}
        length = batch["inputs" if loss == "kto" else "chosen_inputs"].shape[1]
        if choose_backend(cfg, length).max_logits:
            metrics["max_logit"] = jnp.max(aux["max_logits"])
        if cfg.is_moe:
            metrics["moe/maxvio"] = max_violation(aux["moe_load"])
            metrics["moe/dropped_frac"] = aux["moe_dropped"]
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        bad = jnp.where(finite, 0, state.bad_steps + 1).astype(state.bad_steps.dtype)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  router_bias=router_bias, bad_steps=bad)
        return new_state, metrics

    return step

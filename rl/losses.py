"""GRPO-family policy-gradient objectives, as losses to minimize.

Every loss has the signature

    loss, metrics = f(logp [B, T], old_logp [B, T], advantages [B], mask [B, T],
                      ref_logp=None, **hparams)

where `logp` are the current policy's log-probabilities of the sampled completion tokens
(differentiated), `old_logp` those of the policy that produced the rollouts (pi_old, held
constant), `advantages` one value per sequence (`group_advantages`), `mask` 1 on completion
tokens that count (0 on padding), and `ref_logp` a frozen reference policy's log-probs for
the optional KL penalty. Notation: r_t = exp(logp_t - old_logp_t) is the token ratio,
|o_i| = sum_t mask_it the length of completion i, and the PPO term is
min(r A, clip(r, 1 - eps_lo, 1 + eps_hi) A).

Normalization over sequences. Losses that average over sequences divide by G = the number
of sequences with at least one unmasked token (B when none is empty). Zeroing a sequence's
mask is then the same as removing it from the batch, which is how DAPO's dynamic sampling
runs with static shapes (`dapo_dynamic_sampling_mask`).

KL to a reference (when `ref_logp` is given and `beta > 0`): the k3 estimator of
KL(pi || pi_ref) (Schulman, "Approximating KL divergence"),
k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1 >= 0, added as `+ beta * k3_t` to each
token's loss and aggregated like the policy term (per-sequence token mean for the
sequence-level objectives GSPO and GMPO).

Truncated importance sampling (TIS; Yao et al., "Your Efficient RL Framework Secretly Brings
You Off-Policy RL Training", 2025): the rollouts come from the sampler, whose numerics can
differ from the training forward that gives `old_logp`. With `sampler_logp` the policy term
of each token is multiplied by w_t = min(exp(old_logp_t - sampler_logp_t), tis_cap)
(stop-gradient). The sequence-level objectives (GSPO, GMPO) use the sequence-level weight
min(exp(mean_t(old_logp_t - sampler_logp_t)), tis_cap), in keeping with their sequence
ratios. The KL term is not reweighted.

Metrics (float32 scalars): `pg_loss` (policy term), `kl` (mean k3 to the reference, 0
without one), `clip_frac` (fraction of tokens, or of sequences for GSPO, where the clipped
branch is active), `approx_kl` (mean k3 estimate of KL(pi_old || pi), i.e. (r - 1) - log r),
`ratio_mean`, `ratio_min`, `ratio_max` (token ratios over unmasked tokens), and with TIS
`tis_weight_mean` and `tis_clip_frac`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]

__all__ = [
    "LOSSES",
    "dapo",
    "dapo_dynamic_sampling_mask",
    "dr_grpo",
    "get",
    "gmpo",
    "group_advantages",
    "grpo",
    "gspo",
    "gspo_token",
    "k3_kl",
    "overlong_penalty",
]


# ------------------------------------------------------------------------ small helpers
def _f32(*xs):
    return tuple(None if x is None else jnp.asarray(x, jnp.float32) for x in xs)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _seq_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sequence token mean `[B]` (0 for an empty sequence)."""
    return jnp.sum(x * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def _n_seqs(mask: jax.Array) -> jax.Array:
    """G: the number of sequences with at least one unmasked token (at least 1)."""
    return jnp.maximum(jnp.sum(jnp.any(mask > 0, axis=-1)), 1).astype(jnp.float32)


def _token_adv(advantages: jax.Array, shape: tuple[int, int]) -> jax.Array:
    """Advantages `[B]` (one per sequence) or `[B, T]` (per token) as `[B, T]`."""
    if advantages.ndim == 1:
        return jnp.broadcast_to(advantages[:, None], shape)
    if advantages.shape != shape:
        raise ValueError(f"advantages of shape {advantages.shape} do not match logp {shape}")
    return advantages


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi || pi_ref) from samples of pi:
    exp(ref - logp) - (ref - logp) - 1 (non-negative, unbiased)."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def _ppo_term(ratio, adv, eps_lo, eps_hi):
    """min(r A, clip(r, 1 - eps_lo, 1 + eps_hi) A) and where the clipped branch is active."""
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - eps_lo, 1.0 + eps_hi) * adv
    return jnp.minimum(unclipped, clipped), clipped < unclipped


def _tis_token(old_logp, sampler_logp, cap):
    w = jnp.exp(old_logp - sampler_logp)
    return jax.lax.stop_gradient(jnp.minimum(w, cap)), w > cap


def _tis_seq(old_logp, sampler_logp, mask, cap):
    w = jnp.exp(_seq_mean(old_logp - sampler_logp, mask))
    return jax.lax.stop_gradient(jnp.minimum(w, cap)), w > cap


def _base_metrics(logp, old_logp, mask) -> Metrics:
    log_ratio = jax.lax.stop_gradient(logp - old_logp)
    ratio = jnp.exp(log_ratio)
    valid = mask > 0
    return {
        "approx_kl": _masked_mean((ratio - 1.0) - log_ratio, mask),
        "ratio_mean": _masked_mean(ratio, mask),
        "ratio_min": jnp.min(jnp.where(valid, ratio, jnp.inf)),
        "ratio_max": jnp.max(jnp.where(valid, ratio, -jnp.inf)),
    }


def _kl_tokens(logp, ref_logp, beta):
    """`beta * k3` per token (zeros without a reference), and its metric."""
    if ref_logp is None or beta == 0:
        return jnp.zeros_like(logp), None
    k3 = k3_kl(logp, ref_logp)
    return beta * k3, k3


def _token_level(
    logp, old_logp, advantages, mask, ref_logp, *, eps_lo, eps_hi, beta, sampler_logp, tis_cap,
    aggregate: Callable[[jax.Array, jax.Array], jax.Array],
) -> tuple[jax.Array, Metrics]:
    """Shared body of the token-level objectives (GRPO, Dr. GRPO, DAPO): per-token loss
    -(w_t * PPO_t) + beta * k3_t, reduced by `aggregate(per_token, mask)`."""
    logp, old_logp, advantages, mask, ref_logp, sampler_logp = _f32(
        logp, old_logp, advantages, mask, ref_logp, sampler_logp
    )
    adv = _token_adv(advantages, logp.shape)
    ratio = jnp.exp(logp - old_logp)
    pg, clipped = _ppo_term(ratio, adv, eps_lo, eps_hi)
    metrics = _base_metrics(logp, old_logp, mask)
    if sampler_logp is not None:
        w, capped = _tis_token(old_logp, sampler_logp, tis_cap)
        pg = pg * w
        metrics["tis_weight_mean"] = _masked_mean(w, mask)
        metrics["tis_clip_frac"] = _masked_mean(capped.astype(jnp.float32), mask)
    kl, k3 = _kl_tokens(logp, ref_logp, beta)
    pg_loss = aggregate(-pg, mask)
    loss = pg_loss + aggregate(kl, mask) if k3 is not None else pg_loss
    metrics["pg_loss"] = pg_loss
    metrics["kl"] = jnp.zeros(()) if k3 is None else _masked_mean(jax.lax.stop_gradient(k3), mask)
    metrics["clip_frac"] = _masked_mean(clipped.astype(jnp.float32), mask)
    return loss, metrics


def _seq_then_batch_mean(x, mask):
    return jnp.sum(_seq_mean(x, mask)) / _n_seqs(mask)


def _batch_token_mean(x, mask):
    return _masked_mean(x, mask)


# ------------------------------------------------------------------------------- losses
def grpo(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    ref_logp: jax.Array | None = None,
    *,
    eps_lo: float = 0.2,
    eps_hi: float = 0.2,
    beta: float = 0.04,
    sampler_logp: jax.Array | None = None,
    tis_cap: float = 2.0,
) -> tuple[jax.Array, Metrics]:
    """Group Relative Policy Optimization.

    L = -(1/G) sum_i (1/|o_i|) sum_t m_it [min(r_it A_i, clip(r_it, 1-eps_lo, 1+eps_hi) A_i)
        - beta k3_it]

    (per-sequence token mean, then mean over the G sequences). The KL term is used only
    when `ref_logp` is given; beta = 0.04 as in the paper. `advantages` may also be per
    token `[B, T]` (process supervision).

    Args:
      logp, old_logp, mask: `[B, T]`; advantages: `[B]` or `[B, T]`; ref_logp: `[B, T]`.
      eps_lo, eps_hi: clip range of the ratio. beta: KL coefficient.
      sampler_logp, tis_cap: truncated importance sampling (module docstring).
    Returns:
      (scalar loss, metrics).

    References: Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in
    Open Language Models", arXiv:2402.03300, Eq. 3.
    """
    return _token_level(
        logp, old_logp, advantages, mask, ref_logp, eps_lo=eps_lo, eps_hi=eps_hi, beta=beta,
        sampler_logp=sampler_logp, tis_cap=tis_cap, aggregate=_seq_then_batch_mean,
    )


def dr_grpo(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    ref_logp: jax.Array | None = None,
    *,
    eps_lo: float = 0.2,
    eps_hi: float = 0.2,
    beta: float = 0.0,
    max_len: int | None = None,
    sampler_logp: jax.Array | None = None,
    tis_cap: float = 2.0,
    constant_normalizer: bool = False,
) -> tuple[jax.Array, Metrics]:
    """Dr. GRPO ("GRPO done right"): GRPO without the length and difficulty biases.

    L = -(1/(G L_max)) sum_i sum_t m_it min(r_it A_i, clip(r_it, 1-eps_lo, 1+eps_hi) A_i)

    G is the number of rows with at least one unmasked token (rows masked out entirely,
    e.g. by DAPO's dynamic sampling, do not count), so the normaliser moves when rows are
    masked. `constant_normalizer=True` uses the paper's constant instead: G = B, every row
    of the batch, so the normaliser is B x L_max whatever the mask (TRL's convention too).

    The per-sequence 1/|o_i| is replaced by one constant 1/L_max (the generation budget),
    so long wrong answers are not penalized less per token; use advantages without the std
    normalization (`group_advantages(..., normalize_std=False)`). `max_len` is L_max; it
    defaults to T, the padded completion length, which is the generation budget when the
    completions come from `rl.sampling.sample` with `max_new_tokens = T`. Keep it constant
    across steps: it scales the gradient (like a learning rate).

    References: Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective",
    arXiv:2503.20783, Sec. 3.2.
    """
    lmax = float(logp.shape[-1] if max_len is None else max_len)

    def aggregate(x, mask):
        rows = float(mask.shape[0]) if constant_normalizer else _n_seqs(mask)
        return jnp.sum(x * mask) / (rows * lmax)

    return _token_level(
        logp, old_logp, advantages, mask, ref_logp, eps_lo=eps_lo, eps_hi=eps_hi, beta=beta,
        sampler_logp=sampler_logp, tis_cap=tis_cap, aggregate=aggregate,
    )


def dapo(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    ref_logp: jax.Array | None = None,
    *,
    eps_lo: float = 0.2,
    eps_hi: float = 0.28,
    beta: float = 0.0,
    sampler_logp: jax.Array | None = None,
    tis_cap: float = 2.0,
) -> tuple[jax.Array, Metrics]:
    """Decoupled Clip and Dynamic sAmpling Policy Optimization (the objective, Eq. 8).

    L = -(1 / sum_i |o_i|) sum_i sum_t m_it min(r_it A_i, clip(r_it, 1-eps_lo, 1+eps_hi) A_i)

    Clip-higher (eps_lo = 0.2, eps_hi = 0.28) and the token-level mean over the whole batch.
    DAPO drops the KL term (beta = 0). The rest of DAPO lives outside the loss: dynamic
    sampling (`dapo_dynamic_sampling_mask`, applied by zeroing `mask` rows) and overlong
    reward shaping (`overlong_penalty`, added to the rewards).

    References: Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    arXiv:2503.14476.
    """
    return _token_level(
        logp, old_logp, advantages, mask, ref_logp, eps_lo=eps_lo, eps_hi=eps_hi, beta=beta,
        sampler_logp=sampler_logp, tis_cap=tis_cap, aggregate=_batch_token_mean,
    )


def gspo(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    ref_logp: jax.Array | None = None,
    *,
    eps_lo: float = 3e-4,
    eps_hi: float = 4e-4,
    beta: float = 0.0,
    sampler_logp: jax.Array | None = None,
    tis_cap: float = 2.0,
) -> tuple[jax.Array, Metrics]:
    """Group Sequence Policy Optimization (sequence-level ratio and clipping, Eq. 5-7).

    s_i = exp((1/|o_i|) sum_t m_it log r_it)   (the length-normalized sequence ratio)
    L = -(1/G) sum_i min(s_i A_i, clip(s_i, 1-eps_lo, 1+eps_hi) A_i)

    with the paper's clip range 3e-4 / 4e-4. `clip_frac` is the fraction of sequences
    clipped; `seq_ratio_{mean,min,max}` report s_i.

    References: Zheng et al., "Group Sequence Policy Optimization", arXiv:2507.18071.
    """
    logp, old_logp, advantages, mask, ref_logp, sampler_logp = _f32(
        logp, old_logp, advantages, mask, ref_logp, sampler_logp
    )
    if advantages.ndim != 1:
        raise ValueError("gspo takes one advantage per sequence ([B]); use gspo_token for [B, T]")
    metrics = _base_metrics(logp, old_logp, mask)
    live = jnp.any(mask > 0, axis=-1)
    g = _n_seqs(mask)
    s = jnp.exp(_seq_mean(logp - old_logp, mask))
    pg, clipped = _ppo_term(s, advantages, eps_lo, eps_hi)
    if sampler_logp is not None:
        w, capped = _tis_seq(old_logp, sampler_logp, mask, tis_cap)
        pg = pg * w
        metrics["tis_weight_mean"] = jnp.sum(jnp.where(live, w, 0.0)) / g
        metrics["tis_clip_frac"] = jnp.sum(live & capped) / g
    pg_loss = -jnp.sum(jnp.where(live, pg, 0.0)) / g
    loss, metrics = _add_seq_kl(pg_loss, metrics, logp, ref_logp, mask, beta)
    metrics["clip_frac"] = jnp.sum(live & clipped) / g
    sd = jax.lax.stop_gradient(s)
    metrics["seq_ratio_mean"] = jnp.sum(jnp.where(live, sd, 0.0)) / g
    metrics["seq_ratio_min"] = jnp.min(jnp.where(live, sd, jnp.inf))
    metrics["seq_ratio_max"] = jnp.max(jnp.where(live, sd, -jnp.inf))
    return loss, metrics


def gspo_token(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    ref_logp: jax.Array | None = None,
    *,
    eps_lo: float = 3e-4,
    eps_hi: float = 4e-4,
    beta: float = 0.0,
    sampler_logp: jax.Array | None = None,
    tis_cap: float = 2.0,
) -> tuple[jax.Array, Metrics]:
    """GSPO-token: the sequence ratio with per-token advantages (GSPO Eq. 13-14).

    s_it = sg[s_i] * pi(y_t) / sg[pi(y_t)]     (numerically s_i)
    L = -(1/G) sum_i (1/|o_i|) sum_t m_it min(s_it A_it, clip(s_it, 1-eps_lo, 1+eps_hi) A_it)

    where sg is stop-gradient. With one advantage per sequence (`[B]`), value and gradient
    equal `gspo`'s; `[B, T]` advantages give each token its own. TIS weights are per token.

    References: Zheng et al., "Group Sequence Policy Optimization", arXiv:2507.18071, Sec. 4.3.
    """
    logp, old_logp, advantages, mask, ref_logp, sampler_logp = _f32(
        logp, old_logp, advantages, mask, ref_logp, sampler_logp
    )
    adv = _token_adv(advantages, logp.shape)
    sg = jax.lax.stop_gradient
    s = jnp.exp(_seq_mean(logp - old_logp, mask))
    s_tok = sg(s)[:, None] * jnp.exp(logp - sg(logp))
    pg, clipped = _ppo_term(s_tok, adv, eps_lo, eps_hi)
    metrics = _base_metrics(logp, old_logp, mask)
    if sampler_logp is not None:
        w, capped = _tis_token(old_logp, sampler_logp, tis_cap)
        pg = pg * w
        metrics["tis_weight_mean"] = _masked_mean(w, mask)
        metrics["tis_clip_frac"] = _masked_mean(capped.astype(jnp.float32), mask)
    kl, k3 = _kl_tokens(logp, ref_logp, beta)
    pg_loss = _seq_then_batch_mean(-pg, mask)
    loss = pg_loss + _seq_then_batch_mean(kl, mask) if k3 is not None else pg_loss
    metrics["pg_loss"] = pg_loss
    metrics["kl"] = jnp.zeros(()) if k3 is None else _masked_mean(sg(k3), mask)
    metrics["clip_frac"] = _masked_mean(clipped.astype(jnp.float32), mask)
    return loss, metrics


def gmpo(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    ref_logp: jax.Array | None = None,
    *,
    eps_lo: float = 0.4,
    eps_hi: float = 0.4,
    beta: float = 0.0,
    sampler_logp: jax.Array | None = None,
    tis_cap: float = 2.0,
) -> tuple[jax.Array, Metrics]:
    """Geometric-Mean Policy Optimization (Eq. 4): the geometric mean of the clipped token
    objectives instead of their arithmetic mean.

    J_i = {prod_t |min(r_it A_i, clip(r_it, e^-eps_lo, e^eps_hi) A_i)|}^(1/|o_i|) sgn(A_i)
        = A_i exp((1/|o_i|) sum_t m_it l_it),
    l_it = min(log r_it, eps_hi) if A_i > 0,  max(log r_it, -eps_lo) if A_i < 0,
    L = -(1/G) sum_i J_i

    The clip is sign-aware and on log r (range [-0.4, 0.4] in the paper, i.e. r in
    (e^-0.4, e^0.4)): as in PPO's min, for A > 0 only the upper side is clipped (a ratio
    that already rose past e^eps_hi gets no more push up), for A < 0 only the lower side;
    a clipped token has zero gradient. `clip_frac` counts tokens where l_it != log r_it.

    References: Zhao et al., "Geometric-Mean Policy Optimization", arXiv:2507.20673.
    """
    logp, old_logp, advantages, mask, ref_logp, sampler_logp = _f32(
        logp, old_logp, advantages, mask, ref_logp, sampler_logp
    )
    if advantages.ndim != 1:
        raise ValueError("gmpo takes one advantage per sequence ([B])")
    metrics = _base_metrics(logp, old_logp, mask)
    live = jnp.any(mask > 0, axis=-1)
    g = _n_seqs(mask)
    log_r = logp - old_logp
    pos = (advantages > 0)[:, None]
    clipped_lr = jnp.where(pos, jnp.minimum(log_r, eps_hi), jnp.maximum(log_r, -eps_lo))
    is_clipped = (clipped_lr != log_r) & (advantages != 0)[:, None]
    pg = advantages * jnp.exp(_seq_mean(clipped_lr, mask))
    if sampler_logp is not None:
        w, capped = _tis_seq(old_logp, sampler_logp, mask, tis_cap)
        pg = pg * w
        metrics["tis_weight_mean"] = jnp.sum(jnp.where(live, w, 0.0)) / g
        metrics["tis_clip_frac"] = jnp.sum(live & capped) / g
    pg_loss = -jnp.sum(jnp.where(live, pg, 0.0)) / g
    loss, metrics = _add_seq_kl(pg_loss, metrics, logp, ref_logp, mask, beta)
    metrics["clip_frac"] = _masked_mean(is_clipped.astype(jnp.float32), mask)
    return loss, metrics


def _add_seq_kl(pg_loss, metrics, logp, ref_logp, mask, beta):
    kl, k3 = _kl_tokens(logp, ref_logp, beta)
    metrics["pg_loss"] = pg_loss
    if k3 is None:
        metrics["kl"] = jnp.zeros(())
        return pg_loss, metrics
    metrics["kl"] = _masked_mean(jax.lax.stop_gradient(k3), mask)
    return pg_loss + _seq_then_batch_mean(kl, mask), metrics


LOSSES: dict[str, Callable[..., tuple[jax.Array, Metrics]]] = {
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "dapo": dapo,
    "gspo": gspo,
    "gspo_token": gspo_token,
    "gmpo": gmpo,
}


def get(name: str) -> Callable[..., tuple[jax.Array, Metrics]]:
    """The loss called `name` (a key of `LOSSES`); ValueError naming the choices otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown RL loss {name!r} (available: {', '.join(LOSSES)})")
    return LOSSES[name]


# ------------------------------------------------------------ advantages and DAPO shaping
def group_advantages(
    rewards: jax.Array, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6
) -> jax.Array:
    """Group-relative advantages: A_i = (R_i - mean_group(R)) / (std_group(R) + eps).

    `rewards [B]` hold `B / group_size` consecutive groups of `group_size` completions of
    the same prompt. The std is the population std (ddof = 0, over the G members of the
    group); a group whose rewards are all equal gets A = 0. `normalize_std=False` gives
    Dr. GRPO's A_i = R_i - mean_group(R) (no difficulty bias).

    References: Shao et al., arXiv:2402.03300, Sec. 4.1.2 (outcome supervision);
    Liu et al., arXiv:2503.20783, Sec. 3.2 (without the std).
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    b = rewards.shape[0]
    if b % group_size:
        raise ValueError(f"batch {b} is not a multiple of group_size={group_size}")
    r = rewards.reshape(b // group_size, group_size)
    adv = r - jnp.mean(r, axis=1, keepdims=True)
    if normalize_std:
        adv = adv / (jnp.std(r, axis=1, keepdims=True) + eps)
    return adv.reshape(b)


def dapo_dynamic_sampling_mask(rewards: jax.Array, group_size: int) -> jax.Array:
    """`[B]` bool: True for members of groups whose rewards are not all equal.

    DAPO's dynamic sampling keeps prompts with 0 < #correct < G (Eq. 11); for 0/1 accuracy
    rewards that is exactly "not all equal", and with any reward a group of equal rewards
    has zero advantage and so only dilutes the batch. Static shapes: multiply the
    completion mask by this (`mask * keep[:, None]`) instead of filtering; the losses then
    normalize by the remaining sequences / tokens. (DAPO refills the batch by sampling
    more; with static shapes the batch simply shrinks.)

    References: Yu et al., arXiv:2503.14476, Sec. 3.2.
    """
    rewards = jnp.asarray(rewards)
    b = rewards.shape[0]
    if b % group_size:
        raise ValueError(f"batch {b} is not a multiple of group_size={group_size}")
    r = rewards.reshape(b // group_size, group_size)
    keep = jnp.max(r, axis=1) > jnp.min(r, axis=1)
    return jnp.repeat(keep, group_size)


def overlong_penalty(lengths: jax.Array, max_len: int, cache_len: int) -> jax.Array:
    """DAPO's soft overlong punishment (Eq. 13), a reward term added to the task reward:

    R(y) = 0                                   if |y| <= L_max - L_cache
           ((L_max - L_cache) - |y|) / L_cache  if L_max - L_cache < |y| <= L_max
           -1                                  if L_max < |y|

    with `max_len` = L_max, `cache_len` = L_cache (the soft punishment interval) and
    `lengths` = |y| (completion lengths, `[B]`).

    References: Yu et al., arXiv:2503.14476, Sec. 3.4.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(f"need 0 < cache_len={cache_len} <= max_len={max_len}")
    n = jnp.asarray(lengths, jnp.float32)
    soft = (max_len - cache_len - n) / cache_len
    return jnp.where(n <= max_len - cache_len, 0.0, jnp.where(n <= max_len, soft, -1.0))

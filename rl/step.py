"""The RL step: ONE jitted function `state, metrics = rl_step(state, key)` that samples
rollouts with the current parameters and updates them, inside the same compiled program.

    prompts (task, in JAX) -> repeat each G times -> `rl.sampling.sample` (KV / MLA cache,
    the very params being trained: no copy, no second engine) -> task rewards (in JAX)
    [+ DAPO overlong shaping] -> group advantages [DAPO dynamic-sampling mask]
    -> old log-probs from the full-sequence forward (stop-gradient) [+ the frozen
    reference's for the k3 KL] -> mu x M policy-gradient updates (`lax.scan`) with the
    optax transformation of `optim.build`, each followed by the QK-clip hook and the MoE
    router-bias update, with `train.step.make_apply_update`, the update pretraining uses.

Temperature convention. The policy being optimized is pi_T = softmax(logits / T), the
distribution the sampler draws from (before top-k / top-p filtering): the training forward
divides the logits by the same temperature T (`policy_logp`), so at top_k=0, top_p=1 the
sampler's log-probs and the training forward's are the same numbers up to float rounding
(the `mismatch` metric measures it; cached decode vs full forward). With top-k / top-p the
sampler's distribution is the filtered one, the training forward is not filtered, and the
difference shows up in `mismatch`; truncated importance sampling (`tis=True`) reweights by
min(pi_T(old) / pi_sampler, C). At T = 1 this is the usual convention.

Rollout batch: `n_prompts` prompts, each repeated `group_size` (G) times, so B = n_prompts *
G rows in groups of G consecutive rows. Minibatches split B into M contiguous blocks of
whole groups; each of the mu passes (`updates_per_batch`) walks them in order.

Prompts: drawn uniformly from the task, or with `opts.curriculum` chosen from the task's
finite pool by the prompt curriculum (`rl.curriculum`), whose per-prompt pass-rate
estimates live in `RLState.curriculum` and are updated from each step's rewards.

Held-out split (`holdout_modulus` m > 0): a hash of the prompt's tokens puts 1/m of the
prompt space in the evaluation split; training prompts are redrawn (up to `_TRIES`
candidates per row, inside the graph) until they fall outside it, so greedy eval prompts
(`eval_prompts`) are never trained on, neither by RL nor by the supervised warm-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from model import ModelConfig, Transformer, max_violation
from rl import losses
from rl.curriculum import CurriculumOptions, select_prompts, update_curriculum
from rl.sampling import EOS, gather_completion, sample
from train.step import make_apply_update

__all__ = [
    "RLOptions",
    "RLState",
    "demo_batch",
    "distinct_prompts",
    "eval_prompts",
    "make_eval_fn",
    "make_rl_step",
    "make_rollout",
    "policy_logp",
    "prompt_bucket",
    "train_prompts",
]

_TRIES = 8  # candidate prompts per row when redrawing outside the held-out split
_DRAW_ROUNDS = 4  # distinct_prompts: up to 8x its first number of draws


class RLState(flax.struct.PyTreeNode):
    """Everything that changes during RL (the `train.step.TrainState` fields, plus the
    frozen reference policy `ref` = {'params', 'router_bias'} for the KL penalty, `{}`
    when beta = 0). `step` counts RL steps; the optimizer's own count advances by
    mu x M per step."""

    step: jax.Array
    params: Any
    opt_state: Any
    router_bias: Any
    rng: jax.Array
    bad_steps: jax.Array  # consecutive RL steps with a skipped (non-finite) update
    ref: Any
    # the prompt curriculum's per-prompt estimates (`rl.curriculum.init_curriculum`), {} when off
    curriculum: Any = flax.struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RLOptions:
    """Static options of the RL step (`config.rl` in the CLI)."""

    n_prompts: int = 16
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 8  # N, the completion budget
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    loss: str = "grpo"  # a key of rl.losses.LOSSES
    eps_lo: float | None = None  # clip range; None -> the loss's default
    eps_hi: float | None = None
    beta: float = 0.0  # k3 KL to the frozen reference (kept in the state when > 0)
    tis: bool = False  # truncated importance sampling against the sampler's log-probs
    tis_cap: float = 2.0
    updates_per_batch: int = 1  # mu
    minibatches: int = 1  # M
    dynamic_sampling: bool = False  # DAPO: mask groups whose rewards are all equal
    overlong_cache_len: int = 0  # DAPO soft overlong punishment interval (0: off)
    normalize_adv_std: bool = True  # False: Dr. GRPO advantages R - mean
    # dr_grpo: divide by B x L_max (the paper's constant) instead of the non-empty rows x L_max
    dr_grpo_constant: bool = False
    holdout_modulus: int = 0  # 1/m of prompts reserved for evaluation (0: no split)
    # prompt curriculum over the task's pool (`rl.curriculum`); None: uniform sampling
    curriculum: CurriculumOptions | None = None

    def __post_init__(self):
        errors = []
        if self.loss not in losses.LOSSES:
            errors.append(f"loss={self.loss!r} is not one of {tuple(losses.LOSSES)}")
        for name in ("n_prompts", "group_size", "max_new_tokens", "updates_per_batch",
                     "minibatches"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1")
        if self.group_size < 2:
            errors.append(f"group_size={self.group_size} must be >= 2 (group advantages)")
        if self.minibatches >= 1 and self.n_prompts % self.minibatches:
            errors.append(f"n_prompts={self.n_prompts} must be divisible by "
                          f"minibatches={self.minibatches} (minibatches hold whole groups)")
        if not self.temperature > 0:
            errors.append(f"temperature={self.temperature} must be > 0")
        if self.top_k < 0:
            errors.append(f"top_k={self.top_k} must be >= 0")
        if not 0 < self.top_p <= 1:
            errors.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.beta < 0:
            errors.append(f"beta={self.beta} must be >= 0")
        if self.tis_cap <= 0:
            errors.append(f"tis_cap={self.tis_cap} must be > 0")
        if not 0 <= self.overlong_cache_len <= self.max_new_tokens:
            errors.append(f"overlong_cache_len={self.overlong_cache_len} must be in "
                          f"[0, max_new_tokens={self.max_new_tokens}]")
        if self.holdout_modulus < 0 or self.holdout_modulus == 1:
            errors.append(f"holdout_modulus={self.holdout_modulus} must be 0 (off) or >= 2")
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def batch_size(self) -> int:
        return self.n_prompts * self.group_size

    def loss_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"beta": self.beta}
        if self.eps_lo is not None:
            kw["eps_lo"] = self.eps_lo
        if self.eps_hi is not None:
            kw["eps_hi"] = self.eps_hi
        if self.tis:
            kw["tis_cap"] = self.tis_cap
        if self.loss == "dr_grpo":
            kw["max_len"] = self.max_new_tokens
            kw["constant_normalizer"] = self.dr_grpo_constant
        return kw


# --------------------------------------------------------------------- held-out split
_HASH_W = np.random.default_rng(12345).integers(1, 2**31, size=64, dtype=np.int64) | 1


def prompt_bucket(prompt_tokens: jax.Array, modulus: int) -> jax.Array:
    """`[B]` int32 in [0, modulus): a hash of each prompt row (padding included; prompts
    are right-padded with EOS, so equal prompts give equal rows). Bucket 0 is the
    held-out (evaluation) split. Works on jax and numpy arrays alike (uint32 math)."""
    xp = jnp if isinstance(prompt_tokens, jax.Array) else np
    p = prompt_tokens.shape[1]
    w = np.resize(_HASH_W, p).astype(np.uint32)
    t = xp.asarray(prompt_tokens).astype(xp.uint32)
    h = xp.sum(t * xp.asarray(w)[None, :], axis=1, dtype=xp.uint32)
    h = h ^ (h >> 16)
    h = h * xp.uint32(0x45D9F3B)
    h = h ^ (h >> 16)
    return (h % xp.uint32(modulus)).astype(xp.int32)


def train_prompts(task, key: jax.Array, batch: int, modulus: int = 0):
    """`task.sample_prompts(key, batch)` restricted to the training split (bucket != 0):
    each row takes the first of `_TRIES` candidates outside the held-out bucket (with
    probability (1/m)^_TRIES none is, and the row keeps its first candidate)."""
    if modulus <= 0 or hasattr(task, "pool_size"):  # a pool holds training prompts only
        return task.sample_prompts(key, batch)
    prompts, lens, answer = task.sample_prompts(key, batch * _TRIES)
    ok = (prompt_bucket(prompts, modulus) != 0).reshape(batch, _TRIES)
    pick = jnp.argmax(ok, axis=1)
    idx = jnp.arange(batch) * _TRIES + pick

    def take(x):
        return x[idx]

    return take(prompts), take(lens), jax.tree.map(take, answer)


def distinct_prompts(task, seed: int, count: int, modulus: int = 0, held_out: bool = True):
    """`count` distinct prompts of the held-out split (bucket 0 of `prompt_bucket`;
    `held_out=False`: of the training split, the other buckets; any prompts when `modulus`
    is 0), drawn on the host from `jax.random.PRNGKey(seed)`. Returns numpy
    `(prompt_tokens, prompt_lens, answer)`. ValueError when the split has fewer than
    `count` distinct prompts."""
    draws = max(4 * count * (max(modulus, 1) if held_out else 1), 1024)
    for _ in range(_DRAW_ROUNDS):  # rare prompts (a task's non-uniform draws): draw more
        prompts, lens, answer = jax.device_get(task.sample_prompts(jax.random.PRNGKey(seed),
                                                                   draws))
        prompts = np.asarray(prompts)
        keep = np.ones(draws, bool)
        if modulus > 0:
            keep = (prompt_bucket(prompts, modulus) == 0) == held_out
        _, first = np.unique(prompts, axis=0, return_index=True)
        uniq = np.zeros(draws, bool)
        uniq[first] = True
        idx = np.flatnonzero(keep & uniq)[:count]
        if len(idx) == count:
            return jax.tree.map(lambda x, rows=idx: np.asarray(x)[rows], (prompts, lens, answer))
        draws *= 2
    split = "held-out" if held_out else "training"
    raise ValueError(f"only {len(idx)} distinct {split} prompts found in {draws // 2} draws, "
                     f"fewer than {count}")


def eval_prompts(task, seed: int, count: int, modulus: int = 0):
    """A fixed set of `count` distinct prompts from the held-out split (`distinct_prompts`).
    ValueError (naming `eval_prompts`) when the split has fewer."""
    try:
        return distinct_prompts(task, seed, count, modulus)
    except ValueError as e:
        raise ValueError(f"{e} for eval_prompts={count}; lower it (or holdout_modulus)") from None


# ----------------------------------------------------------------------------- pieces
def _constrain_batch(x: jax.Array, lead: int = 0) -> jax.Array:
    """Shards axis `lead` of `x` like the training batch (no-op outside a mesh)."""
    axes = (None,) * lead + ("batch",) + (None,) * (x.ndim - lead - 1)
    return nn.with_logical_constraint(x, axes)


def policy_logp(
    model: Transformer,
    params: Any,
    router_bias: Any,
    tokens: jax.Array,
    prompt_lens: jax.Array,
    n: int,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """The training forward of pi_T: `(logp [B, n], entropy [B, n], aux)` of the
    completion tokens of `tokens [B, P + n]` (prompt then completion, contiguous, as
    `rl.sampling.sample` returns them) under softmax(logits / temperature)."""
    logits, aux = model.apply({"params": params, "router_bias": router_bias}, tokens)
    if temperature != 1.0:
        logits = logits / temperature
    logp, entropy = gather_completion(logits, tokens, prompt_lens, n)
    return logp, entropy, aux


def _masked_mean(x, mask):
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _reduce_updates(ms: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Metrics of the mu x M updates (leading axes [mu, M]) -> one value per step."""
    out = {}
    for k, v in ms.items():
        if k.endswith("_min"):
            out[k] = jnp.min(v, axis=(0, 1))
        elif k.endswith("_max"):
            out[k] = jnp.max(v, axis=(0, 1))
        elif k == "skipped":
            out[k] = jnp.sum(v)
        else:
            out[k] = jnp.mean(v, axis=(0, 1))
    return out


def _score(task, opts: RLOptions, out: dict[str, jax.Array], answer):
    """(task reward, shaped reward, group advantages, informative rows, rows kept) of
    sampled rollouts: the task's reward [+ DAPO's overlong penalty], advantages within
    groups of G, the rows of groups whose rewards are not all equal (the others carry no
    signal) and the rows the update keeps (those with DAPO's dynamic sampling, else all)."""
    g, n = opts.group_size, opts.max_new_tokens
    task_reward = task.reward(out["completion"], out["completion_mask"], answer)
    reward = task_reward
    if opts.overlong_cache_len:
        reward = reward + losses.overlong_penalty(out["lengths"], n, opts.overlong_cache_len)
    adv = losses.group_advantages(reward, g, normalize_std=opts.normalize_adv_std)
    informative = losses.dapo_dynamic_sampling_mask(reward, g)
    keep = informative if opts.dynamic_sampling else jnp.ones(reward.shape, bool)
    return task_reward, reward, adv, informative, keep


def _sample_metrics(out: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {
        "response_len": jnp.mean(out["lengths"].astype(jnp.float32)),
        "ended_frac": jnp.mean(out["ended"].astype(jnp.float32)),
        "decode_steps": out["n_steps"],
    }


# ----------------------------------------------------------------------------- the step
def make_rollout(
    model: Transformer, task: Any, opts: RLOptions
) -> Callable[[RLState, jax.Array], dict[str, Any]]:
    """Builds `rollout(state, key) -> dict`, the sampling phase of the RL step (pure; the
    step calls it, and the loop jits it alone to time the phases): `n_prompts` training
    prompts (uniform, or chosen by the curriculum from `state.curriculum`), each repeated
    G times, and their completions sampled with the current policy.

    Returns `{'prompt_lens' [B], 'answer' (rows repeated), 'out' (the `sample` dict),
    'idx' [n_prompts] (the curriculum's pool rows, else absent), 'metrics'}`."""
    g, n = opts.group_size, opts.max_new_tokens

    def rollout(state: RLState, key: jax.Array) -> dict[str, Any]:
        k_prompt, k_sample = jax.random.split(key)
        r: dict[str, Any] = {"metrics": {}}
        if opts.curriculum is not None:
            r["idx"], r["metrics"] = select_prompts(state.curriculum, k_prompt, opts.n_prompts,
                                                    opts.curriculum)
            prompts, lens, answer = task.prompts_at(r["idx"])
        else:
            prompts, lens, answer = train_prompts(task, k_prompt, opts.n_prompts,
                                                  opts.holdout_modulus)

        def rep(x):
            return _constrain_batch(jnp.repeat(x, g, axis=0))

        prompts, lens, answer = rep(prompts), rep(lens), jax.tree.map(rep, answer)
        variables = {"params": state.params, "router_bias": state.router_bias}
        r["out"] = sample(model, variables, prompts, lens, k_sample, max_new_tokens=n,
                          temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                          eos_id=task.stop_ids, pad_id=task.pad_id)
        r["prompt_lens"], r["answer"] = lens, answer
        return r

    return rollout


def make_rl_step(
    model: Transformer,
    tx: optax.GradientTransformation,
    task: Any,
    opts: RLOptions,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    post_update: Callable[[Any, dict[str, jax.Array]], tuple[Any, dict]] | None = None,
) -> Callable[[RLState, jax.Array], tuple[RLState, dict[str, jax.Array]]]:
    """Builds `rl_step(state, key) -> (state, metrics)` (pure; `jax.jit` it, with the
    state's shardings under a mesh and `nn.logical_axis_rules(LOGICAL_RULES)`).

    Args:
      model: the policy (the same `Transformer` that samples and is trained).
      tx: the optimizer (`optim.build(config.optim, params)`); it steps mu x M times per
        RL step.
      task: an `rl.tasks` task (`sample_prompts`, `reward`).
      opts: `RLOptions`.
      schedule: the LR schedule (for the `lr` metric only), indexed by optimizer updates.
      post_update: `hook(params, aux) -> (params, metrics)` after each optimizer update
        (QK-clip, `train.qkclip.make_qk_clip_hook`).

    Metrics: `reward_mean`, `reward_std`, `accuracy` (fraction of completions whose task
    reward is >= 1), `response_len` (mean generated tokens, EOS included), `ended_frac`
    (fraction that emitted EOS), `decode_steps`, `entropy` (mean per-token entropy of
    pi_T on the rollouts), `mismatch` (mean |sampler logp - training logp| over the
    completion tokens), `groups_kept` (fraction of rows kept by dynamic sampling),
    `groups_informative` (fraction of rows in groups whose rewards are not all equal: the
    rollouts that carry a policy-gradient signal),
    `adv_abs_mean`; averaged over the mu x M updates: `loss`, `pg_loss`, `kl` (k3 to the
    reference), `approx_kl` (pi_old vs pi), `clip_frac`, `ratio_*`, `grad_norm`,
    `update_norm`, `max_logit`; `skipped` (non-finite updates, skipped); `lr`; with MoE
    `moe/maxvio` and `moe/dropped_frac` of the rollout forward; with the curriculum
    `curriculum/chosen_pass_rate` (mean predicted pass rate of the prompts kept),
    `curriculum/candidate_pass_rate` (of all candidates) and `curriculum/seen_frac`
    (fraction of the pool sampled at least once), all before this step's update.
    """
    cfg: ModelConfig = model.cfg
    loss_fn = losses.get(opts.loss)
    loss_kw = opts.loss_kwargs()
    g, n, m, mu = opts.group_size, opts.max_new_tokens, opts.minibatches, opts.updates_per_batch
    b = opts.batch_size
    t_temp = float(opts.temperature)

    def objective(params, router_bias, mb):
        logp, _, aux = policy_logp(model, params, router_bias, mb["tokens"], mb["prompt_lens"],
                                   n, t_temp)
        kw = dict(loss_kw)
        if opts.tis:
            kw["sampler_logp"] = mb["sampler_logp"]
        loss, lm = loss_fn(logp, mb["old_logp"], mb["advantages"], mb["mask"],
                           mb.get("ref_logp"), **kw)
        if "aux_loss" in aux:  # MoE sequence-wise balance loss, as in pretraining
            loss = loss + aux["aux_loss"]
        return loss, (lm, aux)

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    apply_update = make_apply_update(cfg, tx, post_update)

    def update(carry, mb):
        params, opt_state, router_bias = carry
        (loss, (lm, aux)), grads = grad_fn(params, router_bias, mb)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        *new, update_metrics = apply_update(finite, params, opt_state, router_bias, grads, aux)
        metrics = {**lm, "loss": loss, "grad_norm": grad_norm,
                   "max_logit": jnp.max(aux["max_logits"]), **update_metrics,
                   "skipped": (~finite).astype(jnp.int32)}
        return tuple(new), metrics

    def epoch(carry, _, minibatches):
        return jax.lax.scan(update, carry, minibatches)

    rollout = make_rollout(model, task, opts)

    def rl_step(state: RLState, key: jax.Array):
        r = rollout(state, key)
        lens, answer, out = r["prompt_lens"], r["answer"], r["out"]
        comp_mask = out["completion_mask"].astype(jnp.float32)
        task_reward, reward, adv, informative, keep = _score(task, opts, out, answer)
        mask = comp_mask * keep[:, None].astype(jnp.float32)

        sg = jax.lax.stop_gradient
        old_logp, entropy, aux = policy_logp(model, sg(state.params), state.router_bias,
                                             out["tokens"], lens, n, t_temp)
        old_logp = sg(old_logp)
        batch = {"tokens": out["tokens"], "prompt_lens": lens, "mask": mask,
                 "advantages": adv, "old_logp": old_logp, "sampler_logp": out["logp"]}
        if opts.beta > 0:
            ref_logp, _, _ = policy_logp(model, sg(state.ref["params"]),
                                         state.ref["router_bias"], out["tokens"], lens, n,
                                         t_temp)
            batch["ref_logp"] = sg(ref_logp)
        minibatches = jax.tree.map(
            lambda x: _constrain_batch(x.reshape((m, b // m) + x.shape[1:]), lead=1), batch
        )
        carry = (state.params, state.opt_state, state.router_bias)
        (params, opt_state, router_bias), ms = jax.lax.scan(
            lambda c, _: epoch(c, _, minibatches), carry, None, length=mu
        )
        metrics = _reduce_updates(ms)
        metrics.update({
            "reward_mean": jnp.mean(reward),
            "reward_std": jnp.std(reward),
            "task_reward_mean": jnp.mean(task_reward),
            "accuracy": jnp.mean((task_reward >= 1.0).astype(jnp.float32)),
            "entropy": _masked_mean(entropy, comp_mask),
            "mismatch": _masked_mean(jnp.abs(out["logp"] - old_logp), comp_mask),
            "groups_kept": jnp.mean(keep.astype(jnp.float32)),
            "groups_informative": jnp.mean(informative.astype(jnp.float32)),
            "adv_abs_mean": jnp.mean(jnp.abs(adv)),
            **_sample_metrics(out),
        })
        if cfg.is_moe:
            metrics["moe/maxvio"] = max_violation(aux["moe_load"])
            metrics["moe/dropped_frac"] = aux["moe_dropped"]
        if schedule is not None:
            metrics["lr"] = schedule(state.step * (mu * m))
        curriculum = state.curriculum
        if opts.curriculum is not None:
            solved = (task_reward >= 1.0).astype(jnp.float32).reshape(opts.n_prompts, g)
            curriculum = update_curriculum(curriculum, r["idx"], jnp.mean(solved, axis=1),
                                           opts.curriculum)
            metrics.update(r["metrics"])
        any_bad = metrics["skipped"] > 0
        bad = jnp.where(any_bad, state.bad_steps + 1, 0).astype(state.bad_steps.dtype)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  router_bias=router_bias, bad_steps=bad,
                                  curriculum=curriculum)
        return new_state, metrics

    return rl_step


# ------------------------------------------------------------------ eval and warm-up
def make_eval_fn(model: Transformer, task: Any, max_new_tokens: int):
    """`evaluate(params, router_bias, prompt_tokens, prompt_lens, answer) -> metrics`:
    greedy decoding of the given prompts; `eval_accuracy` (task reward >= 1),
    `eval_reward`, `eval_response_len`. Pure; jit it."""

    def evaluate(params, router_bias, prompts, lens, answer):
        prompts, lens = _constrain_batch(prompts), _constrain_batch(lens)
        out = sample(model, {"params": params, "router_bias": router_bias}, prompts, lens,
                     jax.random.PRNGKey(0), max_new_tokens=max_new_tokens, greedy=True,
                     eos_id=task.stop_ids, pad_id=task.pad_id)
        r = task.reward(out["completion"], out["completion_mask"], answer)
        return {
            "eval_accuracy": jnp.mean((r >= 1.0).astype(jnp.float32)),
            "eval_reward": jnp.mean(r),
            "eval_response_len": jnp.mean(out["lengths"].astype(jnp.float32)),
        }

    return evaluate


def demo_batch(task, key: jax.Array, batch: int, max_new_tokens: int, modulus: int = 0):
    """Supervised demonstrations for the warm-up: `{'inputs', 'targets', 'mask'}`, each
    `[batch, P + N - 1]`, from prompts of the training split and their answers.

    Row = prompt, then the answer's `target_len` tokens, then EOS, then EOS padding (the
    layout `rl.sampling.sample` returns, so positions agree with the sampler's). `mask`
    is 1 exactly where the target is an answer token or its EOS: the loss is the answer's
    cross-entropy given the prompt. Tasks whose answers hold `target` / `target_len`
    token arrays (addition, reverse, sort) have demonstrations; ValueError otherwise.
    """
    prompts, lens, answer = train_prompts(task, key, batch, modulus)
    if not ("target" in answer and "target_len" in answer and answer["target"].ndim == 2):
        raise ValueError(f"task {type(task).__name__} has no token demonstrations for the "
                         "supervised warm-up (its answers hold no 'target' tokens)")
    target, tlen = answer["target"], answer["target_len"]
    n = max_new_tokens
    if target.shape[1] + 1 > n:
        raise ValueError(f"max_new_tokens={n} is shorter than the longest answer + EOS "
                         f"({target.shape[1] + 1})")
    p = prompts.shape[1]
    j = jnp.arange(n)[None, :]
    tgt = jnp.pad(target, ((0, 0), (0, n - target.shape[1])), constant_values=EOS)
    completion = jnp.where(j < tlen[:, None], tgt, EOS).astype(jnp.int32)
    rows = jnp.arange(batch)[:, None]
    jp = jnp.arange(p)[None, :]
    seq = jnp.full((batch, p + n), EOS, jnp.int32)
    seq = seq.at[:, :p].set(jnp.where(jp < lens[:, None], prompts, EOS))
    seq = seq.at[rows, lens[:, None] + j].set(completion)
    pos = jnp.arange(p + n - 1)[None, :]  # target position t predicts seq[t + 1]
    first = lens[:, None] - 1
    mask = (pos >= first) & (pos <= first + tlen[:, None])
    return {
        "inputs": _constrain_batch(seq[:, :-1]),
        "targets": _constrain_batch(seq[:, 1:]),
        "mask": _constrain_batch(mask.astype(jnp.int32)),
    }

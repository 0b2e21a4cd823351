"""In-graph sampling: jittable generation with the model's decoding cache (KV for MHA/GQA,
the latent c_kv + shared rope key for MLA), so rollouts run inside the same compiled program
as the policy update, with the same parameters.

`sample` prefills the right-padded prompts in one forward, then decodes one token per row
per step in a `lax.while_loop` that stops as soon as every row has emitted a stop token
(or after `max_new_tokens`). Rows continue at their own positions: row b's completion token
j sits at position `prompt_lens[b] + j`. The prefill writes the pad slots of short prompts
into the cache too, but a query at position p attends only to slots <= p of its own row
(`model.attention.decode_mask`), and decoding overwrites slot p before attending, so stale
pad slots are never seen.

Per-step work: the layers run scanned by default (a model with per-layer parameters is run
as its `scan_layers=True` twin on its parameters stacked once per call, so the step
compiles one block per stack), each step scatters its new keys into the carried caches in
place (tests/rl/test_sampling_speed.py checks the compiled loop for cache copies), the
prefill applies the LM head only at each prompt's last token, and the token choice does
only what its options need (no sort without top-p; greedy is an argmax).

MoE models: with the dropless dispatch (the default on CPU, TPU and Hopper GPUs) sampling
is exact (equal to the full forward); with capacity buffers the capacity is computed per
forward call (prefill: B * P tokens, each decode step: B tokens), so it is exact when no
token is dropped, i.e. `capacity_factor >= n_routed_experts / top_k`. The model's `mesh`
(`Transformer(cfg, mesh=mesh)`) applies here too: with `moe_dispatch="dropless"` and an
`expert` mesh axis, every forward whose token count that axis divides runs expert-parallel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from model import Transformer, init_cache
from model.transformer import stack_layers

EOS = 256  # the byte tokenizer's end-of-document token

__all__ = ["EOS", "completion_logp", "filter_logits", "gather_completion", "sample", "sample_token"]


def filter_logits(
    logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """The sampling distribution's logits: `logits / temperature`, then top-k (keep the k
    largest), then top-p / nucleus (keep the smallest prefix of the sorted, renormalized
    distribution whose mass reaches `top_p`; the most likely token is always kept).
    Excluded tokens get -inf. Ties at a threshold are kept. `top_k=0` and `top_p=1` are
    off. Float32 `[..., V]` in and out."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0 (use greedy=True for argmax)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    x = logits.astype(jnp.float32) / temperature
    v = x.shape[-1]
    if 0 < top_k < v:
        kth = jax.lax.top_k(x, top_k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p < 1:
        xs = jnp.flip(jnp.sort(x, axis=-1), axis=-1)
        p = jax.nn.softmax(xs, axis=-1)
        mass_before = jnp.cumsum(p, axis=-1) - p
        keep = mass_before < top_p
        threshold = jnp.min(jnp.where(keep, xs, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < threshold, -jnp.inf, x)
    return x


def sample_token(
    key: jax.Array,
    logits: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One token per row from `logits [B, V]`.

    Returns `(token [B] int32, logp [B], logp_model [B])`: `logp` is the token's log-prob
    under the distribution it was drawn from (temperature and filters applied; 0 for greedy,
    a point mass), `logp_model` under the model's own distribution (temperature 1, no
    filtering), which is what the training forward computes. Only the work the options
    need is traced: greedy is an argmax, temperature 1 without filters draws from the
    logits as they are (`logp` is `logp_model`), and `filter_logits` sorts only for top-p.
    """
    logits = logits.astype(jnp.float32)

    def token_logp(x, tok):  # log_softmax(x)[tok] without a [B, V] log-softmax buffer
        return jnp.take_along_axis(x, tok[:, None], -1)[:, 0] - jax.nn.logsumexp(x, axis=-1)

    if greedy or temperature == 0:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tok, jnp.zeros(tok.shape, jnp.float32), token_logp(logits, tok)
    if temperature == 1 and top_k == 0 and top_p == 1:  # the model's own distribution
        tok = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
        logp_model = token_logp(logits, tok)
        return tok, logp_model, logp_model
    x = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    tok = jax.random.categorical(key, x, axis=-1).astype(jnp.int32)
    return tok, token_logp(x, tok), token_logp(logits, tok)


def sample(
    model: Transformer,
    variables: Any,
    prompt_tokens: jax.Array,
    prompt_lens: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | Sequence[int] | jax.Array = EOS,
    greedy: bool = False,
    pad_id: int | None = None,
    scan_layers: bool | None = None,
) -> dict[str, jax.Array]:
    """Samples up to `max_new_tokens` tokens after each prompt; jittable (`variables`,
    prompts, lengths, key and `eos_id` may be traced; the rest must be static).

    Args:
      model: the `Transformer` (its `cfg.max_seq_len` bounds P + max_new_tokens).
      variables: `{'params': ..., 'router_bias': ...}` (a 'cache' entry is ignored).
      prompt_tokens: `[B, P]` int32, right-padded; row b's prompt is its first
        `prompt_lens[b]` (>= 1) tokens.
      key: PRNG key (unused when greedy).
      max_new_tokens: N, the completion budget.
      temperature, top_k, top_p: the sampling distribution (`filter_logits`);
        `temperature=0` or `greedy=True`: argmax decoding.
      eos_id: the stop token(s): one id or several (a sequence or a 1-D array).
      pad_id: fills the completion after a row stopped and `tokens` past each row's end;
        defaults to the first stop token.
      scan_layers: decode with the layers scanned (None, the default, or True) or unrolled
        (False). A model with `cfg.scan_layers=False` is then run as its scanned twin,
        with its per-layer parameters stacked once per call (`model.transformer.
        stack_layers`: one copy of the block weights, inside the jitted program): a small
        compiled step, where an unrolled one compiles every layer separately.
    Returns:
      dict with `completion [B, N]` int32; `completion_mask [B, N]` int32, 1 on generated
      tokens up to and including the first stop token; `logp [B, N]` the sampling
      distribution's log-prob of each token (the behaviour policy; 0 when greedy) and
      `logp_model [B, N]` the model's temperature-1 unfiltered log-prob (equal to what the
      full-sequence training forward gives), both 0 where masked; `lengths [B]` (generated
      tokens, stop token included); `ended [B]` bool (a stop token was emitted); `tokens
      [B, P + N]` each row's prompt then its completion, contiguous, then padding (the
      input of the training forward, see `completion_logp`); `n_steps` the number of
      one-token decode forwards the loop ran (at most N - 1; the first token comes from
      the prefill).
    Raises:
      ValueError: P + max_new_tokens exceeds `model.cfg.max_seq_len`, or bad sampling args.
    """
    cfg = model.cfg
    b, p = prompt_tokens.shape
    n = int(max_new_tokens)
    if n < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if p + n > cfg.max_seq_len:
        raise ValueError(
            f"prompt width {p} + max_new_tokens {n} = {p + n} exceeds the model's "
            f"max_seq_len={cfg.max_seq_len}"
        )
    if not (greedy or temperature == 0):
        filter_logits(jnp.zeros((1, 2)), temperature=temperature, top_k=top_k, top_p=top_p)
    stop = jnp.atleast_1d(jnp.asarray(eos_id, jnp.int32))
    pad = stop[0] if pad_id is None else jnp.asarray(pad_id, jnp.int32)
    v = {k: val for k, val in variables.items() if k != "cache"}
    if scan_layers in (None, True) and not cfg.scan_layers:
        v = stack_layers(cfg, v)
        model = model.clone(cfg=cfg.replace(scan_layers=True))
    elif scan_layers is False and cfg.scan_layers:
        raise ValueError("scan_layers=False needs a model with cfg.scan_layers=False "
                         "(its parameters are stacked)")
    prompt_tokens = prompt_tokens.astype(jnp.int32)
    prompt_lens = prompt_lens.astype(jnp.int32)
    rows = jnp.arange(b)

    def pick(logits, k):
        return sample_token(k, logits, temperature=temperature, top_k=top_k, top_p=top_p,
                            greedy=greedy)

    def is_stop(tok):
        return jnp.any(tok[:, None] == stop[None, :], axis=-1)

    # Prefill: the whole padded prompt block in one forward, writing slots 0..P-1; the LM
    # head runs only at each row's last prompt token.
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    (logits, _), upd = model.apply(
        {**v, "cache": init_cache(model, v, b)}, prompt_tokens, positions,
        decode=True, logits_at=prompt_lens - 1, mutable=["cache"],
    )
    key, k0 = jax.random.split(key)
    tok, lp, lpm = pick(logits[:, 0], k0)

    completion = jnp.full((b, n), pad, jnp.int32).at[:, 0].set(tok)
    logp = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lp)
    logp_model = jnp.zeros((b, n), jnp.float32).at[:, 0].set(lpm)
    mask = jnp.zeros((b, n), jnp.int32).at[:, 0].set(1)
    state = (jnp.int32(1), tok, is_stop(tok), upd["cache"], key, completion, logp, logp_model, mask)

    def cond(s):
        i, _, done = s[:3]
        return (i < n) & ~jnp.all(done)

    def body(s):
        i, prev, done, cache, key, completion, logp, logp_model, mask = s
        pos = (prompt_lens + i - 1)[:, None]  # where the previous token sits
        (logits, _), upd = model.apply(
            {**v, "cache": cache}, prev[:, None], pos, decode=True, mutable=["cache"]
        )
        key, k = jax.random.split(key)
        tok, lp, lpm = pick(logits[:, 0], k)
        alive = ~done
        tok = jnp.where(alive, tok, pad)
        completion = completion.at[:, i].set(tok)
        logp = logp.at[:, i].set(jnp.where(alive, lp, 0.0))
        logp_model = logp_model.at[:, i].set(jnp.where(alive, lpm, 0.0))
        mask = mask.at[:, i].set(alive.astype(jnp.int32))
        done = done | (alive & is_stop(tok))
        return i + 1, tok, done, upd["cache"], key, completion, logp, logp_model, mask

    i, _, done, _, _, completion, logp, logp_model, mask = jax.lax.while_loop(cond, body, state)

    # Contiguous rows: prompt[:len] then the completion, then padding.
    j = jnp.arange(p)[None, :]
    tokens = jnp.full((b, p + n), pad, jnp.int32)
    tokens = tokens.at[:, :p].set(jnp.where(j < prompt_lens[:, None], prompt_tokens, pad))
    tokens = tokens.at[rows[:, None], prompt_lens[:, None] + jnp.arange(n)[None, :]].set(completion)
    return {
        "tokens": tokens,
        "completion": completion,
        "completion_mask": mask,
        "logp": logp,
        "logp_model": logp_model,
        "lengths": jnp.sum(mask, axis=1),
        "ended": done,
        "n_steps": i - 1,
    }


def gather_completion(
    logits: jax.Array, tokens: jax.Array, prompt_lens: jax.Array, n: int
) -> tuple[jax.Array, jax.Array]:
    """From the full-sequence forward's `logits [B, P + N, V]` of `tokens [B, P + N]`
    (as `sample` returns them), the completion tokens' log-probs and the entropies of the
    predictive distributions, both `[B, n]`: entry j is about token `prompt_lens + j`,
    predicted at position `prompt_lens + j - 1`."""
    idx = prompt_lens[:, None].astype(jnp.int32) - 1 + jnp.arange(n)[None, :]
    lg = jnp.take_along_axis(logits.astype(jnp.float32), idx[..., None], axis=1)  # [B, n, V]
    logp_all = jax.nn.log_softmax(lg, axis=-1)
    target = jnp.take_along_axis(tokens, idx + 1, axis=1)
    logp = jnp.take_along_axis(logp_all, target[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logp, entropy


def completion_logp(
    model: Transformer, variables: Any, tokens: jax.Array, prompt_lens: jax.Array, n: int
) -> jax.Array:
    """Log-probs `[B, n]` of the completion tokens under the full (non-cached) forward of
    `tokens [B, P + N]` (prompt then completion per row, `sample(...)['tokens']`): the
    training-side counterpart of `sample(...)['logp_model']`."""
    v = {k: val for k, val in variables.items() if k != "cache"}
    logits, _ = model.apply(v, tokens)
    return gather_completion(logits, tokens, prompt_lens, n)[0]

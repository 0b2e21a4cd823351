r"""QK-clip (Kimi K2's MuonClip): cap each attention head's max logit by rescaling W_q, W_k.

After the optimizer step, with :math:`S^{max}_h` the largest scaled logit
:math:`q_h \cdot k_h / \sqrt{d}` of head h over the (global) batch, heads with
:math:`S^{max}_h > \tau` are rescaled by :math:`\gamma_h = \tau / S^{max}_h` (else
:math:`\gamma_h = 1`), split between queries and keys so that head h's logits are multiplied
by exactly :math:`\gamma_h` and its max logit becomes :math:`\min(S^{max}_h, \tau)`:

- MHA: q and k columns of head h times :math:`\sqrt{\gamma_h}`.
- GQA (q heads h in group g share k head g): :math:`\gamma_g = \min_{h \in g}\gamma_h`;
  k head g times :math:`\sqrt{\gamma_g}`, q head h times :math:`\gamma_h/\sqrt{\gamma_g}`.
  A group without a clipped head is untouched, bit for bit.
- MLA: q_nope and k_nope (in `kv_b_proj`) of head h times :math:`\sqrt{\gamma_h}`, q_rope
  times :math:`\gamma_h`; v and the shared k_rope (another kernel) untouched.

Kernels are flax `[in, out]` (`x @ W`), so a head is a block of *columns*, head-major
(column `h * w + j` belongs to head h, w the per-head width); leading axes (scanned layers
`[L, in, out]`) are allowed, with `max_logits` of shape `[..., H]` matching them.
Untouched columns are selected with `jnp.where`, so they are exactly the input values.

References:
  Kimi Team, `Kimi K2: Open Agentic Intelligence <https://arxiv.org/abs/2507.20534>`_,
  2025 (Sec. 2.1, MuonClip)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from optim._tree import get_path, set_path


def gamma(max_logits: jax.Array, tau: float) -> jax.Array:
    r""":math:`\gamma_h = \min(1, \tau / S^{max}_h)` in float32 (1 where S is not above tau)."""
    s = jnp.asarray(max_logits, jnp.float32)
    return jnp.where(s > tau, tau / jnp.where(s > tau, s, 1.0), 1.0)


def _check_heads(max_logits: jax.Array, num_heads: int, what: str) -> None:
    if max_logits.shape[-1:] != (num_heads,):
        raise ValueError(
            f"{what}: max_logits must have shape [..., num_heads={num_heads}], "
            f"got {max_logits.shape}"
        )


def _check_cols(x: jax.Array, num_heads: int, width: int, what: str) -> None:
    if x.ndim < 1 or x.shape[-1] != num_heads * width:
        raise ValueError(
            f"{what}: expected last axis {num_heads} heads x {width} = {num_heads * width}, "
            f"got shape {x.shape}"
        )


def _scale_columns(x: jax.Array, per_head: jax.Array, is_kernel: bool = True) -> jax.Array:
    """Multiplies column block h of `x` by `per_head[..., h, :]` (shape `[..., H, w]`).

    Columns whose factor is exactly 1 keep their original values (selected with `where`).
    """
    cols = per_head.reshape(per_head.shape[:-2] + (-1,))
    if is_kernel:
        cols = cols[..., None, :]
    scaled = (x.astype(jnp.float32) * cols).astype(x.dtype)
    return jnp.where(cols == 1.0, x, scaled)


def mha_head_scales(
    max_logits: jax.Array, tau: float, num_heads: int, num_kv_heads: int | None = None
) -> tuple[jax.Array, jax.Array]:
    r"""Per-head factors `(q_scale [..., H], k_scale [..., KV])` for MHA/GQA QK-clip.

    MHA: both :math:`\sqrt{\gamma_h}`. GQA: :math:`k_g = \sqrt{\min_{h\in g}\gamma_h}`,
    :math:`q_h = \gamma_h / k_{g(h)}`, so :math:`q_h k_{g(h)} = \gamma_h`.
    """
    kv = num_kv_heads or num_heads
    _check_heads(max_logits, num_heads, "clip_mha")
    if num_heads % kv:
        raise ValueError(f"clip_mha: num_heads={num_heads} not divisible by num_kv_heads={kv}")
    g = gamma(max_logits, tau)
    if kv == num_heads:
        s = jnp.sqrt(g)
        return s, s
    group = num_heads // kv
    k_scale = jnp.sqrt(jnp.min(g.reshape(g.shape[:-1] + (kv, group)), axis=-1))
    q_scale = g / jnp.repeat(k_scale, group, axis=-1)
    return q_scale, k_scale


def clip_mha(
    q_kernel: jax.Array,
    k_kernel: jax.Array,
    max_logits: jax.Array,
    tau: float = 100.0,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""QK-clip for multi-head / grouped-query attention.

    With :math:`\gamma_h = \min(1, \tau/S^{max}_h)`: MHA scales q and k columns of head h
    by :math:`\sqrt{\gamma_h}`; GQA scales k head g by :math:`\sqrt{\gamma_g}`,
    :math:`\gamma_g = \min_{h \in g} \gamma_h`, and q head h by
    :math:`\gamma_h / \sqrt{\gamma_g}`. Each head's logits are multiplied by
    :math:`\gamma_h`; heads (MHA) or groups (GQA) with no clipped head are unchanged
    bit for bit.

    Args:
      q_kernel: `[..., D, H * dh]`, head-major columns.
      k_kernel: `[..., D, KV * dh]`.
      max_logits: `[..., H]`, the max scaled logit per head (max-reduced over the batch).
      tau: the logit cap.
      num_heads: H.
      num_kv_heads: KV (default H).

    Returns:
      `(q_kernel, k_kernel)`, same shapes and dtypes.

    References:
      Kimi Team, `Kimi K2 <https://arxiv.org/abs/2507.20534>`_, 2025
    """
    kv = num_kv_heads or num_heads
    q_scale, k_scale = mha_head_scales(max_logits, tau, num_heads, kv)
    dh = q_kernel.shape[-1] // num_heads
    _check_cols(q_kernel, num_heads, dh, "clip_mha q_kernel")
    _check_cols(k_kernel, kv, dh, "clip_mha k_kernel")
    q = _scale_columns(q_kernel, jnp.repeat(q_scale[..., None], dh, axis=-1))
    k = _scale_columns(k_kernel, jnp.repeat(k_scale[..., None], dh, axis=-1))
    return q, k


def mla_column_scales(
    max_logits: jax.Array,
    tau: float,
    num_heads: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
) -> tuple[jax.Array, jax.Array]:
    """Per-head column factors `([..., H, nope + rope] for q, [..., H, nope + v] for kv_b)`."""
    _check_heads(max_logits, num_heads, "clip_mla")
    g = gamma(max_logits, tau)[..., None]
    sq = jnp.sqrt(g)
    ones = jnp.ones_like(g)

    def block(*parts: tuple[jax.Array, int]) -> jax.Array:
        return jnp.concatenate(
            [jnp.broadcast_to(v, g.shape[:-1] + (n,)) for v, n in parts], axis=-1
        )

    q_cols = block((sq, qk_nope_head_dim), (g, qk_rope_head_dim))
    kv_cols = block((sq, qk_nope_head_dim), (ones, v_head_dim))
    return q_cols, kv_cols


def clip_mla(
    q_kernel: jax.Array,
    kv_b_kernel: jax.Array,
    max_logits: jax.Array,
    tau: float = 100.0,
    *,
    num_heads: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
) -> tuple[jax.Array, jax.Array]:
    r"""QK-clip for Multi-head Latent Attention (DeepSeek-V3 layout).

    A head's logit is :math:`q^{nope}_h \cdot k^{nope}_h + q^{rope}_h \cdot k^{rope}`
    (times the softmax scale), where :math:`k^{rope}` is shared by all heads. With
    :math:`\gamma_h = \min(1, \tau/S^{max}_h)`: q_nope columns and k_nope columns of head h
    times :math:`\sqrt{\gamma_h}`, q_rope columns times :math:`\gamma_h`, v columns and
    k_rope untouched, so head h's logits are multiplied by exactly :math:`\gamma_h`.

    Args:
      q_kernel: `[..., R_q or D, H * (nope + rope)]` (`q_b_proj`, or `q_proj` without a
        q LoRA), per head `[nope, rope]` contiguous.
      kv_b_kernel: `[..., R_kv, H * (nope + v)]`, per head `[nope, v]` contiguous.
      max_logits: `[..., H]`.
      tau: the logit cap.
      num_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim: head sizes.

    Returns:
      `(q_kernel, kv_b_kernel)`, same shapes and dtypes.

    References:
      Kimi Team, `Kimi K2 <https://arxiv.org/abs/2507.20534>`_, 2025 (MuonClip for MLA);
      DeepSeek-AI, `DeepSeek-V3 Technical Report <https://arxiv.org/abs/2412.19437>`_, 2024
    """
    q_cols, kv_cols = mla_column_scales(
        max_logits, tau, num_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
    )
    _check_cols(q_kernel, num_heads, qk_nope_head_dim + qk_rope_head_dim, "clip_mla q_kernel")
    _check_cols(kv_b_kernel, num_heads, qk_nope_head_dim + v_head_dim, "clip_mla kv_b_kernel")
    return _scale_columns(q_kernel, q_cols), _scale_columns(kv_b_kernel, kv_cols)


def _as_path(path: str | Sequence[str]) -> tuple[str, ...]:
    return tuple(path.split("/")) if isinstance(path, str) else tuple(path)


@dataclasses.dataclass(frozen=True)
class QKClipTarget:
    """One attention module to clip: where its kernels are and how its heads are laid out.

    Attributes:
      kind: `'mha'` (also GQA/MQA) or `'mla'`.
      q_path: path of the query kernel (`('layers_0', 'attn', 'q_proj', 'kernel')`, for MLA
        `q_b_proj` or `q_proj`); a tuple of keys or a `/`-joined string.
      k_path: path of the key kernel (`k_proj`) for MHA, of `kv_b_proj` for MLA.
      logits_key: key of this module's `[..., H]` max logits in the `max_logits` dict.
      num_heads: H.
      num_kv_heads: KV for MHA/GQA (default H).
      qk_nope_head_dim, qk_rope_head_dim, v_head_dim: MLA head sizes.
      q_bias_path, k_bias_path: optional MHA biases `[..., H*dh]`, scaled like their kernels.
    """

    kind: Literal["mha", "mla"]
    q_path: tuple[str, ...]
    k_path: tuple[str, ...]
    logits_key: str
    num_heads: int
    num_kv_heads: int | None = None
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    q_bias_path: tuple[str, ...] | None = None
    k_bias_path: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("mha", "mla"):
            raise ValueError(f"QKClipTarget.kind must be 'mha' or 'mla', got {self.kind!r}")
        for name in ("q_path", "k_path", "q_bias_path", "k_bias_path"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _as_path(value))
        if self.kind == "mla" and min(self.qk_nope_head_dim, self.qk_rope_head_dim) <= 0:
            raise ValueError(
                f"QKClipTarget {self.logits_key!r}: MLA needs qk_nope_head_dim and "
                "qk_rope_head_dim > 0"
            )
        if self.kind == "mla" and (self.q_bias_path or self.k_bias_path):
            raise ValueError(f"QKClipTarget {self.logits_key!r}: biases are MHA-only")


def qk_clip(
    params: Any,
    max_logits: Mapping[str, jax.Array],
    *,
    tau: float = 100.0,
    targets: Sequence[QKClipTarget],
) -> tuple[Any, dict[str, jax.Array]]:
    r"""Applies :func:`clip_mha` / :func:`clip_mla` to every target in a parameter tree.

    Call it after the optimizer update with the max logits of the step, max-reduced over
    the global batch (under `jit` with sharded activations the reduction is global
    already), so that every replica applies the same factors.

    Args:
      params: nested mappings of arrays (only the kernels along the target paths are
        replaced; everything else is shared with the input).
      max_logits: `{target.logits_key: [..., H] array}`.
      tau: the logit cap.
      targets: the attention modules, see :class:`QKClipTarget`.

    Returns:
      `(new_params, metrics)` with metrics `'qk_clip/frac_clipped'` (fraction of heads,
      over all targets and stacked layers, with :math:`S^{max} > \tau`) and
      `'qk_clip/max_logit'` (the largest :math:`S^{max}`).

    References:
      Kimi Team, `Kimi K2 <https://arxiv.org/abs/2507.20534>`_, 2025
    """
    clipped = jnp.zeros([], jnp.float32)
    total = 0
    max_logit = jnp.full([], -jnp.inf, jnp.float32)
    for t in targets:
        if t.logits_key not in max_logits:
            raise KeyError(
                f"qk_clip: no max_logits for {t.logits_key!r} (have {sorted(max_logits)})"
            )
        s = jnp.asarray(max_logits[t.logits_key], jnp.float32)
        q = get_path(params, t.q_path)
        k = get_path(params, t.k_path)
        if t.kind == "mha":
            q, k = clip_mha(
                q, k, s, tau, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads
            )
            q_scale, k_scale = mha_head_scales(s, tau, t.num_heads, t.num_kv_heads)
            dh = q.shape[-1] // t.num_heads
            for path, sc in ((t.q_bias_path, q_scale), (t.k_bias_path, k_scale)):
                if path is not None:
                    b = get_path(params, path)
                    per_head = jnp.repeat(sc[..., None], dh, axis=-1)
                    params = set_path(params, path, _scale_columns(b, per_head, False))
        else:
            q, k = clip_mla(
                q,
                k,
                s,
                tau,
                num_heads=t.num_heads,
                qk_nope_head_dim=t.qk_nope_head_dim,
                qk_rope_head_dim=t.qk_rope_head_dim,
                v_head_dim=t.v_head_dim,
            )
        params = set_path(params, t.q_path, q)
        params = set_path(params, t.k_path, k)
        clipped = clipped + jnp.sum(s > tau)
        total += s.size
        max_logit = jnp.maximum(max_logit, jnp.max(s))
    metrics = {
        "qk_clip/frac_clipped": clipped / max(total, 1),
        "qk_clip/max_logit": max_logit,
    }
    return params, metrics


"""rl.sampling's per-step work: the compiled decode loop updates the caches in place (no
cache-sized `copy` in the while body, scanned or unrolled layers, MHA/GQA and MLA+MoE),
the detector itself finds the copies of a loop that keeps its old cache alive, and the
token choice traces only the work its options need (no sort without top-p, no top-k
without top-k)."""

import math
import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from model import ModelConfig, init_cache
from rl.sampling import sample, sample_token

GQA = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                  max_seq_len=64)
MLA_MOE = GQA.replace(attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                      v_head_dim=8, q_lora_rank=12, n_routed_experts=4, n_shared_experts=1,
                      top_k=2, moe_ffn_dim=16, first_k_dense=1, capacity_factor=2.0)
# P = 2: the prefill's [B, heads, P, max_seq_len] scores stay smaller than a layer's cache.
B, P, N = 4, 2, 8

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLEES = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)|branch_computations=\{([^}]*)\}")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\](?:\{[^}]*\})? ([\w\-]+)\(")


def loop_copies(hlo: str, min_elements: int) -> list[str]:
    """The `copy` instructions of at least `min_elements` elements in the bodies of the
    while loops of compiled HLO text, and in every computation they call (fusions, nested
    loops)."""
    comps: dict[str, list[str]] = {}
    cur = None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            cur = comps.setdefault(m.group(1), [])
        elif line.startswith("}"):
            cur = None
        elif cur is not None and line.strip():
            cur.append(line.strip())
    todo = [m.group(1) for lines in comps.values() for line in lines
            if (m := re.search(r" while\(.*body=%([\w.\-]+)", line))]
    seen: set[str] = set()
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for line in comps[c]:
            for a, many in _CALLEES.findall(line):
                todo.extend([a] if a else [x.strip().lstrip("%") for x in many.split(",")])
    out = []
    for c in sorted(seen):
        for line in comps[c]:
            m = _INSTRUCTION.match(line)
            if m and m.group(2) in ("copy", "copy-start"):
                dims = [int(x) for x in m.group(1).split(",") if x]
                if math.prod(dims) >= min_elements:
                    out.append(f"{c}: {line[:160]}")
    return out


def test_detector_finds_the_copies_of_a_loop_that_keeps_its_old_cache(jit):
    """The negative control: a loop that carries both the updated cache and the previous
    one (what slicing a stacked cache per layer and stacking the result amounts to) must
    copy it every step; the same loop without the old cache copies nothing."""
    def run(cache, keep_old):
        def body(c):
            i, cache, old = c
            return i + 1, cache.at[:, i].set(1.0), (cache if keep_old else old)
        return jax.lax.while_loop(lambda c: c[0] < 10, body, (1, cache, cache + 1.0))

    cache = jnp.zeros((B, 64, 8))
    copying = jit(lambda c: run(c, True)).lower(cache).compile().as_text()
    assert loop_copies(copying, cache.size)
    in_place = jit(lambda c: run(c, False)).lower(cache).compile().as_text()
    assert not loop_copies(in_place, cache.size)


@pytest.mark.parametrize("cfg", [GQA, MLA_MOE], ids=["gqa", "mla_moe"])
@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_decode_loop_updates_the_cache_in_place(tiny, jit, cfg, scan):
    """The compiled sampler (XLA's optimizations on, as it runs) has no copy of a
    cache-sized buffer inside its while loops: the scatter of each step's new keys is done
    in place in the carried cache, and the attention reads the cache in its stored layout.
    (The fast-compile `jit` lowers LLVM's effort only; XLA's HLO passes, copy insertion
    included, are those of a plain `jax.jit`.)"""
    model, variables = tiny(cfg)
    layer_cache = max(leaf.size // (cfg.n_layers if cfg.scan_layers else 1)
                      for leaf in jax.tree.leaves(init_cache(model, variables, B)))
    fn = jit(lambda v, p, n: sample(model, v, p, n, jax.random.key(0), max_new_tokens=N,
                                        greedy=True, scan_layers=scan))
    hlo = fn.lower(variables, jnp.zeros((B, P), jnp.int32),
                   jnp.full((B,), P, jnp.int32)).compile().as_text()
    assert " while(" in hlo
    copies = loop_copies(hlo, layer_cache)
    assert not copies, "\n".join(copies)


def _primitives(fn, *args) -> set[str]:
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return names


@pytest.mark.parametrize("kwargs, sort, top_k", [
    ({"greedy": True, "top_k": 5, "top_p": 0.5}, False, False),
    ({}, False, False),
    ({"temperature": 0.7}, False, False),
    ({"top_k": 5}, False, True),
    ({"top_p": 0.9}, True, False),
])
def test_token_choice_traces_only_the_filters_it_uses(kwargs, sort, top_k):
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((3, 50)), jnp.float32)
    prims = _primitives(lambda k, x: sample_token(k, x, **kwargs), jax.random.key(0), logits)
    assert ("sort" in prims) == sort, prims
    assert ("top_k" in prims) == top_k, prims

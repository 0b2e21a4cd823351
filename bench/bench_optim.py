"""Optimizer-step time: `optim.muon` vs `optax.contrib.muon` (matched settings), and the
full `optim.build` Muon+AdamW step vs `optax.contrib.muon` with the same partition.

Prints one JSON object per line: per (tree, implementation) the median wall time of one
jitted update (after a warm-up call that compiles), then the ratio optim / optax.

    python bench/bench_optim.py           # tiny (~1M) and base (~113M); about 3 min on 2 cores
    python bench/bench_optim.py --trees tiny --repeats 30
    python bench/bench_optim.py --full-trees tiny,base  # also the full step on base (slow)

Trees: `tiny` = 4 layers, d=128, ffn 512 (1.05M matrix params); `base` = 12 layers,
d=768, ffn 3072 (113M matrix params). Group `matrices`: Muon on every leaf. Group `full`:
the matrices plus embedding and LM head (vocab 4096 / 32768) and norm gains on AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import optax.contrib  # noqa: E402

import optim  # noqa: E402

COEFFS = (3.4445, -4.7750, 2.0315)
TREES = {
    "tiny": dict(layers=4, d=128, ffn=512, vocab=4096),
    "base": dict(layers=12, d=768, ffn=3072, vocab=32768),
}


def matrices(layers: int, d: int, ffn: int, **_: Any) -> dict[str, Any]:
    """Transformer-like hidden matrices (`[in, out]` kernels), as ShapeDtypeStructs."""
    f32 = jnp.float32

    def s(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, f32)

    return {
        f"layers_{i}": {
            "attn": {n: {"kernel": s(d, d)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
            "mlp": {
                "gate_proj": {"kernel": s(d, ffn)},
                "up_proj": {"kernel": s(d, ffn)},
                "down_proj": {"kernel": s(ffn, d)},
            },
        }
        for i in range(layers)
    }


def full_tree(layers: int, d: int, ffn: int, vocab: int) -> dict[str, Any]:
    """Matrices plus embedding, LM head and norm gains (the AdamW leaves)."""
    tree = matrices(layers, d, ffn)
    for i in range(layers):
        tree[f"layers_{i}"]["attn_norm"] = {"scale": jax.ShapeDtypeStruct((d,), jnp.float32)}
        tree[f"layers_{i}"]["mlp_norm"] = {"scale": jax.ShapeDtypeStruct((d,), jnp.float32)}
    tree["embed"] = {"embedding": jax.ShapeDtypeStruct((vocab, d), jnp.float32)}
    tree["lm_head"] = {"kernel": jax.ShapeDtypeStruct((d, vocab), jnp.float32)}
    tree["final_norm"] = {"scale": jax.ShapeDtypeStruct((d,), jnp.float32)}
    return tree


def materialize(shapes: Any, seed: int) -> Any:
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    make = jax.jit(lambda k, shape: jax.random.normal(k, shape), static_argnums=1)
    return treedef.unflatten([make(k, x.shape) for k, x in zip(keys, leaves, strict=True)])


def time_update(
    tx: optax.GradientTransformation, params: Any, grads: Any, repeats: int, budget_s: float
) -> dict:
    """Median wall time of one `jit(tx.update)` call after a compiling warm-up call.

    Runs up to `repeats` timed calls, stopping early (after at least one) once the timed
    calls have used `budget_s` seconds, so slow cases stay within the runtime budget.
    """
    state = tx.init(params)
    update = jax.jit(tx.update)
    t0 = time.perf_counter()
    out = update(grads, state, params)
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    state = out[1]
    times: list[float] = []
    while len(times) < repeats and sum(times) < budget_s:
        t0 = time.perf_counter()
        out = update(grads, state, params)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        state = out[1]
    return dict(
        runs=len(times),
        median_s=round(statistics.median(times), 5),
        min_s=round(min(times), 5),
        times_s=[round(t, 5) for t in times],
        first_call_s=round(first, 3),
    )


def optax_labels_full(params: Any) -> Any:
    """optax.contrib.muon dimension numbers: Muon on hidden kernels, None (AdamW) elsewhere."""
    labels = optim.label_params(params)
    dim = optax.contrib.MuonDimensionNumbers(0, 1)
    return jax.tree.map(lambda lab: dim if lab == "muon" else None, labels)


def cases(tree_name: str) -> list[tuple[str, str, Callable[[], Any], Any]]:
    spec = TREES[tree_name]
    lr = 1e-3
    mats = matrices(**spec)
    full = full_tree(**spec)
    cfg = optim.default_config()
    cfg.update(dict(name="muon", schedule="constant", warmup_steps=0, total_steps=1000, lr=lr))
    cfg.update(dict(clip_norm=0.0, weight_decay=0.0, eps=1e-8))
    cfg.muon.update_scale = "original"
    return [
        ("matrices", "optim.muon", lambda: optim.muon(lr, eps=1e-7), mats),
        (
            "matrices",
            "optax.contrib.muon",
            lambda: optax.contrib.muon(lr, ns_coeffs=COEFFS, ns_steps=5, beta=0.95, eps=1e-7),
            mats,
        ),
        ("full", "optim.build(muon)", lambda: optim.build(cfg, full), full),
        (
            "full",
            "optax.contrib.muon",
            lambda: optax.contrib.muon(
                lr,
                ns_coeffs=COEFFS,
                ns_steps=5,
                beta=0.95,
                eps=1e-8,
                adam_b1=0.9,
                adam_b2=0.95,
                muon_weight_dimension_numbers=optax_labels_full(full),
            ),
            full,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trees", default="tiny,base")
    parser.add_argument("--repeats", type=int, default=10, help="max timed calls per case")
    parser.add_argument(
        "--budget-s", type=float, default=25.0, help="stop timing a case after this many seconds"
    )
    parser.add_argument(
        "--full-trees",
        default="tiny",
        help="trees on which to also time the full Muon+AdamW step (slow for base on CPU)",
    )
    args = parser.parse_args()
    dev = jax.devices()[0]
    print(
        json.dumps(
            dict(
                bench="optim_update",
                backend=jax.default_backend(),
                device=dev.device_kind,
                num_devices=jax.device_count(),
                cpu_count=os.cpu_count(),
                jax=jax.__version__,
                optax=optax.__version__,
                matmul_precision=str(jax.config.jax_default_matmul_precision),
            )
        ),
        flush=True,
    )
    for tree_name in args.trees.split(","):
        medians: dict[tuple[str, str], float] = {}
        materialized: dict[str, tuple[Any, Any]] = {}
        for group, impl, make, shapes in cases(tree_name):
            if group == "full" and tree_name not in args.full_trees.split(","):
                continue
            if group not in materialized:
                materialized.clear()
                materialized[group] = (materialize(shapes, 0), materialize(shapes, 1))
            params, grads = materialized[group]
            n = sum(x.size for x in jax.tree.leaves(params))
            res = time_update(make(), params, grads, args.repeats, args.budget_s)
            medians[(group, impl)] = res["median_s"]
            print(json.dumps(dict(tree=tree_name, group=group, impl=impl, params=n, **res)), flush=True)
        for group in ("matrices", "full"):
            got = [v for (g, _), v in medians.items() if g == group]
            if len(got) == 2:
                print(
                    json.dumps(
                        dict(tree=tree_name, group=group, ratio_optim_over_optax=round(got[0] / got[1], 3))
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()

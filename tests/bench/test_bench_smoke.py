"""`bench/bench_train.py --quick` runs end to end and prints valid JSON lines (a smoke test:
the figures themselves are not checked, only that each kind of line is there and sane)."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_train_quick_prints_json_lines():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_train.py"), "--quick"],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    kinds = [x["bench"] for x in lines]
    assert kinds[0] == "env" and kinds[-1] == "end"
    steps = [x for x in lines if x["bench"] == "train_step"]
    seen = {(x["config"], x["impl"], x.get("moe_dispatch")) for x in steps}
    assert {("dense", "jax", None), ("dense", "transformers", None),
            ("mla_moe", "transformers", None)} <= seen
    assert {d for c, i, d in seen if c == "mla_moe" and i == "jax"} == {"dropless", "capacity", "dense"}
    for x in steps:
        assert x["tokens_per_s"] > 0 and 0 < x["mfu"] and math.isfinite(x["loss"]), x
        assert x["model_flops_per_token"] > 0
    ratios = {x["config"]: x["jax_over_transformers"] for x in lines if x["bench"] == "train_ratio"}
    assert set(ratios) == {"dense", "mla_moe"} and all(r > 0 for r in ratios.values())
    # Same sizes on both sides: the transformers model has our parameter count.
    params = {(x["config"], x["impl"]): x["params"] for x in steps}
    assert params[("dense", "jax")] == params[("dense", "transformers")]
    assert params[("mla_moe", "jax")] == params[("mla_moe", "transformers")]
    ce = [x for x in lines if x["bench"] == "cross_entropy"]
    assert len(ce) >= 2 and len({round(x["loss"], 3) for x in ce}) == 1  # chunked == full


def test_bench_train_quick_bfloat16_mixed_precision():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_train.py"), "--quick", "--only", "dense",
         "--no-dispatch", "--no-ce", "--dtype", "bfloat16"],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert lines[0]["dtype"] == "bfloat16"
    steps = {x["impl"]: x for x in lines if x["bench"] == "train_step"}
    assert set(steps) == {"jax", "transformers"}
    for x in steps.values():
        assert x["dtype"] == "bfloat16" and x["tokens_per_s"] > 0 and math.isfinite(x["loss"]), x
    # Both start from a random init on the same tokens: losses near ln(vocab) on both sides.
    assert abs(steps["jax"]["loss"] - steps["transformers"]["loss"]) < 0.5

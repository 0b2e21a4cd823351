"""`bench/bench_train.py --quick` and `bench/bench_decode.py` run end to end and print valid
JSON lines (smoke tests: the figures themselves are not checked, only that each kind of
line is there and sane)."""

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


def _run_preset(preset, *extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_train.py"), "--preset", preset,
         "--quick", "--rounds", "1", *extra],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert lines[0]["bench"] == "env" and lines[0]["preset"] == preset and lines[-1]["bench"] == "end"
    assert lines[0]["dtype"] == "bfloat16"
    return [x for x in lines if x["bench"] == "train_step"]


def _check_qk_clip_pair(steps, preset):
    jax_steps = {x["qk_clip"]: x for x in steps if x["impl"] == "jax"}
    assert set(jax_steps) == {False, True}
    for x in jax_steps.values():
        assert x["config"] == f"preset:{preset}"
        assert "error" not in x, x
        assert x["attention_backend"].startswith("attention: explicit"), x  # 32 tokens: explicit
        assert x["scan_layers"] and x["dtype"] == "bfloat16"
        assert math.isfinite(x["loss"]) and x["mfu"] > 0 and x["tokens_per_s"] > 0, x
        assert x["compile_s"] > 0 and x["compiled_bytes"] > 0
    assert jax_steps[True]["qk_clip_tau"] == 100.0 and jax_steps[False]["qk_clip_tau"] is None
    return jax_steps


def test_bench_train_preset_1b_quick():
    """The dense preset, shrunk: tied head, scanned layers, bf16, QK-clip off/on, and the
    transformers peer (CPU here) with the same parameter count."""
    steps = _run_preset("1b")
    jax_steps = _check_qk_clip_pair(steps, "1b")
    hf = [x for x in steps if x["impl"] == "transformers"]
    assert len(hf) == 1 and hf[0]["device"] == "cpu" and math.isfinite(hf[0]["loss"]), hf
    assert hf[0]["params"] == jax_steps[False]["params"] and hf[0]["mfu"] > 0


def test_bench_train_preset_moe_1b_quick():
    """The MLA + MoE preset, shrunk (first layer dense, the rest a scanned MoE stack)."""
    steps = _run_preset("moe-1b", "--no-hf")
    _check_qk_clip_pair(steps, "moe-1b")
    assert not [x for x in steps if x["impl"] == "transformers"]


def test_bench_train_preset_reports_out_of_memory_and_continues(monkeypatch, capsys):
    """A variant that runs out of memory is an `error` line; the next variant still runs."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_train", os.path.join(ROOT, "bench", "bench_train.py"))
    bt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bt)

    class Runner:  # no compile: a step that does nothing
        n_params, compile_s, compiled_bytes, loss = 10, 0.1, 100, 1.0

        def __init__(self, cfg, tokens, options, fast_compile=False, post_update=None):
            if post_update is None:  # the variant without QK-clip
                raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB")

        def step(self):
            pass

    monkeypatch.setattr(bt, "JaxRunner", Runner)
    args = argparse.Namespace(
        preset="1b", quick=True, attn_impl="auto", remat=None, dtype=None, batch=2, seq=32,
        no_hf=True, torch_threads=None, qk_clip_variants=[False, True], warmup=0, rounds=1,
        peak_n=64, peak_s=0.01)
    bt.run_preset(args, bt.StepOptions())
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["qk_clip"] for x in lines] == [False, True]
    assert lines[0]["error"].startswith("out of memory: RESOURCE_EXHAUSTED")
    assert "error" not in lines[1] and lines[1]["tokens_per_s"] > 0


def test_bench_attention_tiny_prints_json_lines():
    """`bench/bench_attention.py` on tiny shapes: every backend that runs here matches the
    explicit reference, explicit is skipped above --max-explicit-len, and auto is reported."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_attention.py"), "--lengths", "64,96",
         "--blocks", "32", "--rounds", "1", "--batch", "1", "--max-explicit-len", "64"],
        capture_output=True, text=True, env=env, timeout=120, check=True,
    ).stdout
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert lines[0]["bench"] == "env" and lines[-1]["bench"] == "end"
    runs = {(x["T"], x["impl"]): x for x in lines if x["bench"] == "attention"}
    assert runs[(64, "explicit")]["s_median"] > 0 and runs[(64, "explicit")]["temp_bytes"] > 0
    assert "max-explicit-len" in runs[(96, "explicit")]["skipped"]
    flash = runs[(64, "flash/32")]
    assert flash["max_abs_diff_out"] < 1e-5 and flash["max_abs_diff_grad"] < 1e-4
    assert flash["max_abs_diff_max_logits"] < 1e-5
    assert runs[(96, "flash/32")]["max_abs_diff_out"] is None  # no reference there
    assert "NVIDIA GPU" in runs[(64, "cudnn")]["skipped"]  # CPU
    auto = {x["T"]: x["choice"] for x in lines if x["bench"] == "auto"}
    assert set(auto) == {64, 96} and auto[64].startswith("attention: explicit")


def _bench_decode(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "bench_decode.py"), *args],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_bench_decode_prints_json_lines():
    """The tiny default (scanned, unrolled, Python loop; transformers skipped) and the 1B
    preset's dry run (shapes, bytes, the weight-read floor; traces only)."""
    lines = _bench_decode("--skip-hf", "--repeats", "2", "--new-tokens", "8", "--prompt-len",
                          "4", "--batch", "2")
    head, rows = lines[0], {x["impl"]: x for x in lines if "impl" in x}
    assert head["bench"] == "decode" and head["params"] > 0 and head["weight_read_floor_ms"] > 0
    assert set(rows) == {"scanned", "unrolled", "python_loop_jitted_step"}
    for impl in ("scanned", "unrolled"):
        x = rows[impl]
        assert x["tokens_per_s"] > 0 and x["prefill_s"] > 0 and math.isfinite(x["decode_step_ms"])
    last = lines[-1]
    assert last["greedy_agreement_unrolled"] == 1.0 and last["greedy_agreement_python_loop"] == 1.0

    dry = _bench_decode("--preset", "1b", "--dry-run")
    assert dry[0]["params"] == 1_235_814_400 and dry[0]["dtype"] == "bfloat16"
    assert abs(dry[0]["weight_read_floor_ms"] - 0.515) < 1e-3
    assert {(x["impl"], x["max_new_tokens"]) for x in dry[1:]} == {
        ("scanned", 1), ("scanned", 128), ("unrolled", 1), ("unrolled", 128)}

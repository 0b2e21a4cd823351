"""The sft job end to end: `python -m train --config configs/sft.py` from an imported
checkpoint (its tokenizer.json and chat template), eval loss, learning, and a bad record."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = i % 7, (3 * i) % 5
        if i % 2:
            out.append({"prompt": f"add {a} {b}", "completion": f"sum {a + b}"})
        else:
            out.append({"messages": [{"role": "user", "content": f"add {a} {b}"},
                                     {"role": "assistant", "content": f"sum {a + b}"}]})
    return out


def _run(root, cpu_env, args):
    return subprocess.run([sys.executable, "-m", "train", "--config", "configs/sft.py", *args],
                          cwd=root, env=cpu_env(2), capture_output=True, text=True, timeout=300)


def test_sft_from_imported_checkpoint_learns(tmp_path, imported, root, cpu_env):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(80)))
    work = tmp_path / "run"
    p = _run(root, cpu_env, [
        f"--config.data.paths={data}", f"--config.init_from={imported}",
        f"--config.workdir={work}", "--config.data.seq_len=48", "--config.data.batch_size=4",
        "--config.data.eval_permille=100", "--config.train.steps=24",
        "--config.train.log_every=4", "--config.train.eval_every=12",
        "--config.train.progress=False", "--config.optim.lr=1e-2",
        "--config.optim.warmup_steps=2", "--config.train.loss=dft",
    ])
    assert p.returncode == 0, p.stderr[-3000:]
    # The checkpoint's tokenizer and chat template were used.
    assert f"tokenizer {imported / 'tokenizer.json'}" in p.stdout
    assert f"template {imported / 'tokenizer_config.json'}" in p.stdout
    assert f"initialized params from {imported}" in p.stdout
    with open(work / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [4, 8, 12, 16, 20, 24]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    losses = [r["loss"] for r in rows]
    assert len(evals) == 2 and evals[1] < evals[0], evals
    assert losses[-1] < losses[0] - 0.5, losses


def test_bad_record_exits_2_with_one_error_line(tmp_path, root, cpu_env):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(_records(1)[0]) + "\n" + '{"prompt": "hi"}\n')
    p = _run(root, cpu_env, [f"--config.data.paths={data}", f"--config.workdir={tmp_path / 'w'}"])
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"{data}:2: missing field 'completion'" in lines[0]
    assert not os.path.exists(tmp_path / "w")  # nothing written before the data is read

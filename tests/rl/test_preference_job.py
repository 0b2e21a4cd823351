"""The preference job (`rl.preference_loop`, data in `rl.preference_data`): end-to-end
`python -m train --config configs/preference.py` DPO runs that learn the preference,
evaluate on held-out pairs and resume; KTO runs; resume keeping the ORIGINAL reference in
both modes (precomputed log-probs, frozen copy: the reward margin right after resume is
not reset to 0, and resumed == uninterrupted); bad records as one `error:` line naming
file:line; chosen == rejected skipped and counted; rows cut and padded; KTO's KL rows;
the hyperparameter pass-through."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import preference as preference_config
from rl.preference_data import PreferenceData
from rl.preference_loop import loss_kwargs, run, use_precompute
from train.chat import encode_pair
from train.errors import UserError
from train.validate import validate

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = ["apple", "river", "stone", "cloud", "green", "quick", "light", "table"]
SMALL = dict(d_model=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=96)


def write_pairs(path, n: int = 48, identical: int = 1, unpaired: int = 0) -> None:
    """Pairs "say WORD" -> chosen "word", rejected "WORD" (a quarter in chat form), then
    `identical` pairs with chosen == rejected and `unpaired` KTO examples."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            w = rng.choice(WORDS)
            if i % 4 == 0:
                rec = {"prompt": [{"role": "user", "content": f"say {w}"}],
                       "chosen": {"role": "assistant", "content": w},
                       "rejected": [{"role": "assistant", "content": w.upper()}]}
            else:
                rec = {"prompt": f"say {w} {i}", "chosen": w, "rejected": w.upper()}
            f.write(json.dumps(rec) + "\n")
        for i in range(identical):
            f.write(json.dumps({"prompt": f"same {i}", "chosen": "x", "rejected": "x"}) + "\n")
        for i in range(unpaired):
            w = rng.choice(WORDS)
            good = i % 2 == 0
            f.write(json.dumps({"prompt": f"echo {w} {i}", "completion": w if good else
                                w.upper(), "label": good}) + "\n")


def read_metrics(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def small_config(workdir, data, steps: int, **pref) -> ConfigDict:
    c = preference_config.get_config()
    c.workdir = str(workdir)
    c.model.update(SMALL)
    c.data.update(dict(paths=(str(data),), seq_len=96, batch_size=8, eval_permille=200))
    c.train.update(dict(steps=steps, log_every=1, eval_every=steps, eval_batches=1,
                        progress=False))
    c.optim.update(dict(warmup_steps=0, lr=3e-3, schedule="constant"))
    c.checkpoint.every = 100
    c.preference.update(pref)
    return c


def cli(*args: str, devices: int = 2) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.run([sys.executable, "-m", "train", "--config", "configs/preference.py",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_dpo_cli_learns_evaluates_and_resumes(tmp_path):
    """Two commands: 6 steps, then the same command with 12 steps resumes at 6."""
    data = tmp_path / "pairs.jsonl"
    write_pairs(data)
    work = tmp_path / "w"
    args = [f"--config.data.paths={data}", f"--config.workdir={work}",
            *[f"--config.model.{k}={v}" for k, v in SMALL.items()],
            "--config.data.seq_len=96", "--config.data.eval_permille=200",
            "--config.train.log_every=1", "--config.train.eval_every=6",
            "--config.train.progress=False", "--config.optim.warmup_steps=1",
            "--config.optim.lr=3e-3", "--config.optim.schedule=constant"]
    r = cli(*args, "--config.train.steps=6")
    assert r.returncode == 0, r.stderr[-3000:]
    # chosen == rejected: skipped, counted, located (the documented behaviour).
    assert f"1 skipped with chosen == rejected (first at {data}:49)" in r.stdout, r.stdout
    assert "log-probs precomputed" in r.stdout
    r = cli(*args, "--config.train.steps=12")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 6" in r.stdout, r.stdout
    rows = read_metrics(work)
    assert [x["step"] for x in rows] == list(range(1, 13))
    first, last = rows[0], rows[-1]
    for key in ("loss", "reward_margin", "reward_accuracy", "logps_chosen", "logps_rejected",
                "lr", "pairs_per_s"):
        assert key in first and key in last, key
    # Step 1's policy is the reference: margin 0, DPO loss log 2.
    assert abs(first["reward_margin"]) < 1e-4 and abs(first["loss"] - np.log(2)) < 1e-4
    assert last["reward_margin"] > 0.05 and last["reward_accuracy"] == 1.0
    assert last["loss"] < first["loss"] - 0.02
    # The reference after resume is still the starting weights: the margin goes on from
    # where it was (a reference re-based on the resumed weights would give 0 at step 7).
    assert rows[6]["reward_margin"] > 0.5 * rows[5]["reward_margin"] > 0.01
    evals = [x for x in rows if "eval_loss" in x]
    assert [x["step"] for x in evals] == [6, 12]
    assert evals[-1]["eval_reward_margin"] > evals[0]["eval_reward_margin"] > 0
    assert evals[-1]["eval_reward_accuracy"] == 1.0


def test_kto_learns_and_resume_equals_uninterrupted(tmp_path):
    """KTO on unpaired and paired records, its reference a frozen copy in the state: a run
    resumed at step 2 equals the uninterrupted one, and its margin is not reset."""
    data = tmp_path / "kto.jsonl"
    write_pairs(data, n=16, identical=0, unpaired=16)
    straight, split = tmp_path / "straight", tmp_path / "split"
    out = run(small_config(straight, data, steps=5, loss="kto"))
    c = small_config(split, data, steps=2, loss="kto")
    c.train.eval_every = 5
    run(c)
    c.train.steps = 5
    run(c)  # resumes at step 2
    a, b = read_metrics(straight), read_metrics(split)
    assert [x["step"] for x in b] == [1, 2, 3, 4, 5]
    assert "kl" in a[0] and "reward_accuracy" not in a[0]
    assert abs(a[0]["reward_margin"]) < 1e-4  # policy == reference at step 1
    assert a[-1]["reward_margin"] > 0.02 and a[-1]["loss"] < a[0]["loss"]
    assert np.isfinite(out["eval_loss"]) and out["eval_reward_margin"] > 0
    assert b[2]["reward_margin"] > 0.5 * b[1]["reward_margin"] > 0.005
    for key in ("reward_margin", "loss", "kl", "eval_reward_margin"):
        np.testing.assert_allclose(b[-1][key], a[-1][key], rtol=1e-5, atol=1e-7)
    with pytest.raises(UserError, match="precompute_ref"):
        run(small_config(tmp_path / "w2", data, steps=8, loss="kto", precompute_ref=True))


def test_bad_record_is_one_error_line_naming_file_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    write_pairs(data, n=4, identical=0)
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")  # line 5
    work = tmp_path / "w"
    r = cli(f"--config.data.paths={data}", f"--config.workdir={work}", devices=1)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and f"{data}:5" in lines[-1], r.stderr
    assert "'rejected'" in lines[-1] and "Traceback" not in r.stderr


@pytest.mark.parametrize("record, needle", [
    ("{not json", "not valid JSON"),
    ('["a"]', "JSON object"),
    ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "'chosen' must be"),
    ('{"prompt": "p", "chosen": "", "rejected": "b"}', "empty 'chosen'"),
    ('{"prompt": 5, "chosen": "a", "rejected": "b"}', "'prompt' must be"),
    ('{"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}',
     "unknown role"),
    ('{"prompt": "p", "chosen": {"role": "user", "content": "a"}, "rejected": "b"}',
     "assistant message"),
    ('{"prompt": "p", "completion": "a", "label": true}', "loss='kto'"),
    ('{"text": "p"}', "needs 'prompt'"),
])
def test_bad_records_name_file_and_line(tmp_path, record, needle):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n\n' + record + "\n")
    cfg = small_config(tmp_path, data, 1).data
    with pytest.raises(UserError, match=f"d.jsonl:3: .*{needle}"):
        PreferenceData(cfg, 96, 8, 0, kto=False)


def test_kto_label_must_be_bool_and_pairs_become_two_examples(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
                    '{"prompt": "q", "completion": "c", "label": false}\n')
    cfg = small_config(tmp_path, data, 1).data
    cfg.eval_permille = 0
    d = PreferenceData(cfg, 96, 8, 0, kto=True)
    assert list(d.train.desirable) == [True, False, False] and d.eval is None
    data.write_text('{"prompt": "q", "completion": "c", "label": "yes"}\n')
    with pytest.raises(UserError, match=r"d.jsonl:1: 'label' must be true or false"):
        PreferenceData(cfg, 96, 8, 0, kto=True)


def test_identical_pairs_skipped_and_counted(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n'
                    '{"prompt": "q", "chosen": "a", "rejected": "b"}\n'
                    '{"prompt": "r", "chosen": [{"role": "assistant", "content": "z"}], '
                    '"rejected": "z"}\n')
    cfg = small_config(tmp_path, data, 1).data
    cfg.eval_permille = 0
    d = PreferenceData(cfg, 96, 8, 0, kto=False)
    assert (d.identical, len(d.train)) == (2, 1)
    assert f"2 skipped with chosen == rejected (first at {data}:1)" in d.summary()
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n')
    with pytest.raises(UserError, match="no training pair left.*1 with chosen == rejected"):
        PreferenceData(cfg, 96, 8, 0, kto=False)


def test_kl_rows_pair_each_prompt_with_the_next_completion(tmp_path):
    data = tmp_path / "d.jsonl"
    write_pairs(data, n=0, identical=0, unpaired=6)
    cfg = small_config(tmp_path, data, 1).data
    cfg.eval_permille = 0
    d = PreferenceData(cfg, 96, 4, 0, kto=True)
    b = d.batch(0)
    idx = b["index"]
    # KL row i = prompt of example idx[i] + completion of example idx[i + 1 (mod n)]:
    # the encoding of that mismatched conversation.
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    for i in range(len(idx)):
        j = idx[(i + 1) % len(idx)]
        tokens, mask = encode_pair(lines[idx[i]]["prompt"], lines[j]["completion"],
                                   d.template, d.tokenizer)
        n = len(tokens) - 1
        np.testing.assert_array_equal(b["kl_inputs"][i, :n], tokens[:-1])
        np.testing.assert_array_equal(b["kl_targets"][i, :n], tokens[1:])
        np.testing.assert_array_equal(b["kl_mask"][i, :n], mask[1:])
        assert not b["kl_mask"][i, n:].any()  # padding is not counted
    # Batches are a pure function of (seed, step); an epoch visits every row once.
    np.testing.assert_array_equal(PreferenceData(cfg, 96, 4, 0, kto=True).batch(0)["index"],
                                  idx)
    assert sorted(np.concatenate([d.indices(0), d.indices(1)])[:6]) == list(range(6))


def test_rows_are_cut_at_the_end_and_padded(tmp_path):
    data = tmp_path / "d.jsonl"
    recs = [("p", "aaaaaaaaaa", "bbbbbbbbbb"), ("q" * 300, "a", "b"),
            ("p", "aaaaaaaaaaX", "aaaaaaaaaaY"), ("p", "c", "d")]
    data.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                            for p, c, r in recs))
    cfg = small_config(tmp_path, data, 1).data
    cfg.eval_permille = 0
    d0 = PreferenceData(cfg, 96, 2, 0, kto=False)
    tokens, mask = encode_pair("p", "aaaaaaaaaa", d0.template, d0.tokenizer)
    n_prompt = int(np.argmax(mask > 0))
    # Rows of n_prompt + 5 tokens: 5 completion tokens survive; pair 2 has none left and
    # pair 3 becomes "aaaaa" vs "aaaaa": both dropped and counted.
    d = PreferenceData(cfg, n_prompt + 4, 2, 0, kto=False)
    assert (len(d.train), d.dropped) == (2, 2)
    assert "2 records dropped" in d.summary()
    t, m = d.train.chosen[0][0], d.train.chosen[1][0]
    np.testing.assert_array_equal(t, tokens[:n_prompt + 5])
    assert m[:n_prompt].sum() == 0 and m[n_prompt:].sum() == 5
    # Pair 4 in rows of 97 tokens: zero-padded, the padding not counted.
    t4, m4 = d0.train.chosen[0][-1], d0.train.chosen[1][-1]
    short, smask = encode_pair("p", "c", d.template, d.tokenizer)
    np.testing.assert_array_equal(t4[:len(short)], short)
    assert not t4[len(short):].any() and not m4[len(short):].any()


def test_hyperparameters_pass_through_or_are_rejected():
    c = preference_config.get_config()
    validate(c)  # the shipped config passes
    c.preference.beta, c.preference.label_smoothing, c.preference.chunk_tokens = 0.0, 0.5, -1
    c.preference.nll_weight = -1.0
    with pytest.raises(UserError, match=r"preference.beta=0.0 must be .*> 0.*"
                       r"preference.label_smoothing=0.5 must be .*"
                       r"preference.nll_weight=-1.0 must be .*"
                       r"preference.chunk_tokens=-1 must be"):
        validate(c)
    p = preference_config.get_config().preference
    assert loss_kwargs(p) == {} and use_precompute(p)
    p.loss, p.beta, p.gamma = "simpo", 2.5, 0.3
    assert loss_kwargs(p) == {"beta": 2.5, "gamma": 0.3} and not use_precompute(p)
    p.loss = "dpo"
    with pytest.raises(UserError, match="config.preference.gamma=0.3: loss 'dpo' has no"):
        loss_kwargs(p)
    p.gamma, p.nll_weight = None, 1.0
    assert loss_kwargs(p) == {"beta": 2.5, "nll_weight": 1.0}
    p.loss = "ipo"
    with pytest.raises(UserError, match="config.preference.nll_weight=1.0: loss 'ipo' has no"):
        loss_kwargs(p)
    p.loss = "nope"
    with pytest.raises(UserError, match="unknown preference loss"):
        loss_kwargs(p)

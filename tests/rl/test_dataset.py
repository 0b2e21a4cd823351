"""The dataset task (`rl.dataset`, `rl.verifiers`): prompts, padding, answers and rewards on
fixed JSONL files, the verifiers (a Python one through the host callback under jit), the
held-out split, errors naming file:line, and `python -m rl --config configs/rl_dataset.py`
end to end from a tiny imported checkpoint with its BPE tokenizer and chat template."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import rl_dataset
from rl import dataset, verifiers
from rl.dataset import DatasetTask, read_examples
from rl.generate import load_run
from rl.generate import main as generate_main
from rl.loop import make_task_from_config
from rl.sampling import sample
from train.chat import load_template
from train.errors import UserError
from train.tokenizers import ByteTokenizer, make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EOS = 256
RAW = load_template("raw")


def write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        f.write("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def byte_task(tmp_path, records, eval_records=(), verify=verifiers.exact_number, **kw):
    """A task with the byte tokenizer and raw prompts (tokens = UTF-8 bytes)."""
    train = read_examples(write_jsonl(tmp_path / "train.jsonl", records))
    held = (read_examples(write_jsonl(tmp_path / "eval.jsonl", eval_records))
            if eval_records else None)
    kw.setdefault("check_numbers", verify is verifiers.exact_number)
    return DatasetTask.build(train, held, ByteTokenizer(), kw.pop("template", RAW), verify, **kw)


def completions(texts, width=8):
    """Byte completions, each followed by EOS, masked up to and including it."""
    toks = np.full((len(texts), width), EOS, np.int32)
    mask = np.zeros((len(texts), width), np.int32)
    for i, t in enumerate(texts):
        b = list(t.encode())
        toks[i, : len(b)] = b
        mask[i, : len(b) + 1] = 1
    return jnp.asarray(toks), jnp.asarray(mask)


# ------------------------------------------------------------------ prompts and padding
def test_prompts_padding_lens_and_answers(tmp_path):
    task = byte_task(tmp_path, [
        {"prompt": "1+1=", "answer": 2},
        {"messages": [{"role": "user", "content": "ab"}], "answer": "x 7", "id": 3},
        "",  # blank lines are skipped
        {"prompt": "hello", "answer": 1234.5},
    ], eval_records=[{"prompt": "9*9=", "answer": "81"}])
    assert task.pool_size == 3 and task.eval_size == 1
    assert task.prompt_width == 5 and task.stop_ids == (EOS,) and task.pad_id == EOS
    want = [b"1+1=", b"ab", b"hello", b"9*9="]
    expected = np.full((4, 5), EOS, np.int32)
    for i, w in enumerate(want):
        expected[i, : len(w)] = list(w)
    np.testing.assert_array_equal(task.prompts, expected)
    np.testing.assert_array_equal(task.lens, [4, 2, 5, 4])
    assert [e.answer for e in task.examples] == ["2", "x 7", "1234.5", "81"]
    assert [e.where.rsplit(":", 1)[1] for e in task.examples] == ["1", "2", "4", "1"]
    assert task.examples[1].text == "ab"

    p, n, a = jax.jit(task.prompts_at)(jnp.asarray([2, 0], jnp.int32))
    np.testing.assert_array_equal(p, expected[[2, 0]])
    np.testing.assert_array_equal(n, [5, 4])
    np.testing.assert_array_equal(a["index"], [2, 0])
    _, _, a = jax.jit(task.sample_prompts, static_argnums=1)(jax.random.key(0), 64)
    assert set(np.asarray(a["index"]).tolist()) == {0, 1, 2}  # the training rows only
    p, n, a = task.eval_split()
    np.testing.assert_array_equal(p, expected[3:])
    np.testing.assert_array_equal(a["index"], [3])


def test_fixed_width_long_prompts_and_the_chat_template(tmp_path, imported):
    records = [{"prompt": "abc", "answer": 1}, {"prompt": "abcdefgh", "answer": 2},
               {"prompt": "a", "answer": 3}]
    with pytest.raises(UserError, match=r"train.jsonl:2: the prompt is 8 tokens, more than "
                                        r"config.rl.dataset.max_prompt_len=4"):
        byte_task(tmp_path, records, [{"prompt": "z", "answer": 0}], max_prompt_len=4)
    task = byte_task(tmp_path, records, [{"prompt": "z", "answer": 0}], max_prompt_len=6,
                     long_prompts="drop")
    assert task.prompt_width == 6 and task.pool_size == 2 and task.dropped_long == 1

    # The checkpoint's tokenizer and ChatML template: the prompt is the rendered user turn
    # with the generation prompt; <|im_end|> (the template's end of turn) stops as well as
    # the EOS token.
    tok = make_tokenizer(str(imported / "tokenizer.json"), "<|endoftext|>")
    template = load_template("", tok)
    task = DatasetTask.build(read_examples(write_jsonl(tmp_path / "t.jsonl", records)),
                             read_examples(write_jsonl(tmp_path / "e.jsonl",
                                                       [{"prompt": "add 1 2", "answer": 3}])),
                             tok, template, verifiers.exact_number)
    text = "<|im_start|>user\nabcdefgh<|im_end|>\n<|im_start|>assistant\n"
    np.testing.assert_array_equal(task.prompts[1, : task.lens[1]], tok.encode(text))
    assert task.prompt_width == max(len(tok.encode(text)), task.lens.max())
    assert task.stop_ids == (tok.eos_id, tok.encode("<|im_end|>")[0]) and task.pad_id == tok.eos_id
    assert tok.decode(task.prompts[3, : task.lens[3]]).endswith("add 1 2<|im_end|>\n"
                                                                 "<|im_start|>assistant\n")


# ------------------------------------------------------------------------- verifiers
@pytest.mark.parametrize("completion, answer, want", [
    ("The answer is 1,234.", "1234", 1.0),
    ("so 2.50", "2.5", 1.0),
    ("x = -3", "-3", 1.0),
    ("5-3", "-3", 0.0),  # a '-' after a digit is an operator
    ("7 then 8", "7", 0.0),  # the last number counts
    ("#### 72", "Natalia sold 48 + 24 = 72 clips.\n#### 72", 1.0),
    ("12,34", "34", 1.0),  # not a thousands group: 12 then 34
    ("1,2345", "2345", 1.0),
    ("x2", "2", 0.0),  # after a letter: no number
    ("no number", "0", 0.0),
    ("3.", "3", 1.0),
    ("-0", "0", 1.0),
])
def test_exact_number(completion, answer, want):
    assert verifiers.exact_number("", completion, answer) == want


def test_regex_substitutes_the_escaped_answer():
    v = verifiers.regex(r"answer: {answer}\b")
    assert v("", "the answer: 3.5 ok", "3.5") == 1.0
    assert v("", "the answer: 3x5", "3.5") == 0.0  # "." of the answer is escaped
    assert verifiers.regex(r"\A\$?{answer}\Z")("", "$1+1", "1+1") == 1.0
    assert verifiers.regex(r"\A{answer}\Z")("", "a 1+1", "1+1") == 0.0
    assert verifiers.regex(r"\d{3}")("", "x 123", "") == 1.0  # braces stay regex syntax
    with pytest.raises(UserError, match=r"config.rl.dataset.pattern='\(\{answer\}' is not a "
                                        "valid regular expression"):
        verifiers.make_verifier("regex", pattern="({answer}")


def _verifier_module(tmp_path, monkeypatch):
    (tmp_path / "my_verifier.py").write_text(
        "CALLS = []\n"
        "NOT_CALLABLE = 3\n"
        "def score(prompt, completion, answer):\n"
        "    CALLS.append((prompt, completion, answer))\n"
        "    return len(completion) / 10 if completion.startswith(answer) else 0\n"
        "def nan(prompt, completion, answer):\n"
        "    return float('nan')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_verifier", None)


def test_python_verifier_through_the_callback_under_jit(tmp_path, monkeypatch):
    _verifier_module(tmp_path, monkeypatch)
    fn = verifiers.make_verifier("python", function="my_verifier:score")
    task = byte_task(tmp_path, [{"prompt": "say hi", "answer": "hi"},
                                {"messages": [{"role": "system", "content": "s"},
                                              {"role": "user", "content": "say yo"}],
                                 "answer": "yo"}],
                     [{"prompt": "e", "answer": "e"}], verify=fn, template=load_template("builtin"))
    toks, mask = completions(["hi!", "yo", "no"])
    answer = {"index": jnp.asarray([0, 1, 2], jnp.int32)}
    r = jax.jit(task.reward)(toks, mask, answer)
    assert r.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(r), [0.3, 0.2, 0.0])
    import my_verifier

    # The record's prompt text (a messages record: its last user turn) and the decoded
    # completion up to its stop token.
    assert my_verifier.CALLS == [("say hi", "hi!", "hi"), ("say yo", "yo", "yo"),
                                 ("e", "no", "e")]


def test_exact_number_task_rewards_on_completions(tmp_path):
    task = byte_task(tmp_path, [{"prompt": "a", "answer": 1234}, {"prompt": "b", "answer": "2.5"},
                                {"prompt": "c", "answer": "-3"}],
                     [{"prompt": "d", "answer": 0}])
    toks, mask = completions(["1,234", "2.50", "- 3"])
    r = task.reward(toks, mask, {"index": jnp.asarray([0, 1, 2], jnp.int32)})
    np.testing.assert_array_equal(np.asarray(r), [1.0, 1.0, 0.0])
    # Text after the stop token (masked, or past EOS) is not part of the completion.
    toks = toks.at[0, 6].set(ord("9"))
    r = task.reward(toks, mask, {"index": jnp.asarray([0, 1, 2], jnp.int32)})
    assert float(r[0]) == 1.0


@pytest.mark.parametrize("spec, needle", [
    ("no_such_module_xyz:f", r"config.rl.dataset.function='no_such_module_xyz:f': cannot "
                             r"import 'no_such_module_xyz'"),
    ("my_verifier:missing", r"module 'my_verifier' has no attribute 'missing'"),
    ("my_verifier:NOT_CALLABLE", r"is not callable \(a int\)"),
    ("my_verifier", r"must name a Python function as 'module:function'"),
])
def test_python_verifier_errors(tmp_path, monkeypatch, spec, needle):
    _verifier_module(tmp_path, monkeypatch)
    with pytest.raises(UserError, match=needle):
        verifiers.make_verifier("python", function=spec)


def test_non_finite_reward_is_an_error_naming_the_record(tmp_path, monkeypatch):
    _verifier_module(tmp_path, monkeypatch)
    fn = verifiers.make_verifier("python", function="my_verifier:nan")
    task = byte_task(tmp_path, [{"prompt": "p", "answer": "a"}], [{"prompt": "q", "answer": 1}],
                     verify=fn)
    toks, mask = completions(["x"])
    with pytest.raises(Exception, match=r"verifier nan returned nan for the record at "
                                        r".*train.jsonl:1: rewards must be finite"):
        jax.block_until_ready(jax.jit(task.reward)(toks, mask, {"index": jnp.zeros(1, jnp.int32)}))


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("line, needle", [
    ("{not json", "not valid JSON"),
    ('{"answer": 1}', "a record needs 'prompt' (or 'messages') and 'answer'"),
    ('{"prompt": "p"}', "missing field 'answer'"),
    ('{"prompt": "p", "messages": [], "answer": 1}', "'prompt' or 'messages', not both"),
    ('{"prompt": 3, "answer": 1}', "'prompt' must be a string, not int"),
    ('{"prompt": "", "answer": 1}', "empty 'prompt'"),
    ('{"prompt": "p", "answer": true}', "'answer' must be a string or a number, not bool"),
    ('{"prompt": "p", "answer": NaN}', "'answer' must be finite"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],'
     ' "answer": 1}', "the last message must be the user turn to answer, not 'assistant'"),
    ('{"messages": [{"role": "robot", "content": "q"}], "answer": 1}', "unknown role 'robot'"),
    ('{"prompt": "p", "answer": "none"}', "the answer 'none' holds no number"),
])
def test_bad_records_name_file_and_line(tmp_path, line, needle):
    path = write_jsonl(tmp_path / "train.jsonl", ['{"prompt": "ok", "answer": 1}', line])
    with pytest.raises(UserError) as e:
        DatasetTask.build(read_examples(path), None, ByteTokenizer(), RAW,
                          verifiers.exact_number, check_numbers=True)
    assert f"{path}:2: " in str(e.value) and needle in str(e.value), str(e.value)


def test_raw_prompts_take_a_single_user_turn(tmp_path):
    with pytest.raises(UserError, match=r"train.jsonl:1: config.data.chat_template='raw'"):
        byte_task(tmp_path, [{"messages": [{"role": "system", "content": "s"},
                                           {"role": "user", "content": "q"}], "answer": 1}])


# ---------------------------------------------------------------------- held-out split
def test_held_out_split_is_deterministic_and_never_trained_on(tmp_path):
    records = [{"prompt": f"{i}+{i}=", "answer": 2 * i} for i in range(300)]
    records += [{"prompt": "7+7=", "answer": 15}]  # a duplicate of a prompt above
    task = byte_task(tmp_path, records, holdout_fraction=0.2)
    train = {bytes(task.prompts[i, : task.lens[i]].tolist()) for i in range(task.pool_size)}
    held = {bytes(task.prompts[i, : task.lens[i]].tolist())
            for i in range(task.pool_size, len(task.lens))}
    assert not train & held and len(train) + len(held) == 300
    assert 0.12 < len(held) / 300 < 0.28
    # The split is a function of each prompt, not of the file order (nor the answer).
    shuffled = [dict(r, answer=r["answer"] + 1) for r in reversed(records)]
    other = byte_task(tmp_path, shuffled, holdout_fraction=0.2)
    held2 = {bytes(other.prompts[i, : other.lens[i]].tolist())
             for i in range(other.pool_size, len(other.lens))}
    assert held2 == held
    assert task.dropped_overlap == 0  # equal prompts hash alike: both on one side
    assert len(task.lens) == 301
    # eval_split: the first `count`, rounded down to a multiple of the data-parallel size.
    p, n, a = task.eval_split(count=9, multiple=4)
    assert p.shape == (8, task.prompt_width)
    np.testing.assert_array_equal(a["index"], np.arange(task.pool_size, task.pool_size + 8))
    with pytest.raises(ValueError, match="held-out prompt"):
        byte_task(tmp_path, records[:3], holdout_fraction=0.0).eval_split()


def test_eval_paths_drop_training_duplicates(tmp_path):
    task = byte_task(tmp_path, [{"prompt": "a", "answer": 1}, {"prompt": "b", "answer": 2}],
                     [{"prompt": "b", "answer": 3}])
    assert task.pool_size == 1 and task.dropped_overlap == 1
    assert [e.answer for e in task.examples] == ["1", "3"]


def test_config_builds_the_task_and_checks_it(tmp_path, imported):
    c = rl_dataset.get_config()
    c.init_from = str(imported)
    c.rl.dataset.paths = (write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"add {i} 1", "answer":
                                                              i + 1} for i in range(20)]),)
    task = make_task_from_config(c)
    assert isinstance(task, DatasetTask)
    assert task.tokenizer.path == str(imported / "tokenizer.json")
    assert task.template_origin == str(imported / "tokenizer_config.json")
    for key, value, needle in [
        ("paths", (), "config.rl.dataset.paths is empty"),
        ("paths", (str(tmp_path / "missing.jsonl"),),
         "config.rl.dataset.paths: '.*missing.jsonl' does not exist"),
        ("verifier", "fuzzy", "config.rl.dataset.verifier='fuzzy' is not one of"),
        ("long_prompts", "cut", "long_prompts='cut' must be 'error' or 'drop'"),
    ]:
        bad = ConfigDict(c.to_dict())
        bad.rl.dataset[key] = value
        with pytest.raises(UserError, match=needle):
            make_task_from_config(bad)
    bad = ConfigDict(c.to_dict())
    bad.rl.warmup_steps = 5
    with pytest.raises(UserError, match="warmup_steps must be 0"):
        make_task_from_config(bad)
    assert dataset.END_OF_TURN[0] == "<|im_end|>"


def test_the_tokenizer_must_fit_the_model_vocabulary():
    from types import SimpleNamespace

    from model import ModelConfig
    from rl.loop import _check
    from rl.step import RLOptions

    cfg = ModelConfig(vocab_size=320, d_model=32, n_layers=1, n_heads=2, ffn_dim=64,
                      max_seq_len=64)
    opts = RLOptions(n_prompts=2, group_size=2, max_new_tokens=4)
    task = SimpleNamespace(prompt_width=8, tokenizer=SimpleNamespace(vocab_size=400,
                                                                     path="tok.json"))
    c = rl_dataset.get_config()
    with pytest.raises(UserError, match=r"the tokenizer tok.json has 400 tokens, more than "
                                        r"the model's vocab_size=320"):
        _check(c, cfg, opts, task, 1)
    task.tokenizer.vocab_size = 300
    assert _check(c, cfg, opts, task, 1) == 12


# ------------------------------------------------------------------------ end to end
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (args[0], env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "rl", "--config", "configs/rl_dataset.py",
                           *args[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_end_to_end_from_an_imported_checkpoint(tmp_path, imported, capsys):
    (tmp_path / "e2e_verifier.py").write_text(
        "from rl.verifiers import exact_number\n"
        "def score(prompt, completion, answer):\n"
        "    return exact_number(prompt, completion, answer) + 0.1 * ('sum' in completion)\n")
    data = write_jsonl(tmp_path / "prompts.jsonl",
                       [{"prompt": f"add {i % 7} {i % 3}", "answer": i % 7 + i % 3}
                        for i in range(24)])
    work = tmp_path / "run"
    common = [f"--config.init_from={imported}", f"--config.rl.dataset.paths={data}",
              "--config.rl.dataset.holdout_fraction=0.25", "--config.rl.n_prompts=2",
              "--config.rl.group_size=2", "--config.rl.max_new_tokens=4",
              "--config.rl.eval_prompts=2", "--config.rl.eval_every=2",
              "--config.train.progress=False"]
    p = _cli(str(tmp_path), *common, "--config.train.steps=2", f"--config.workdir={work}",
             "--config.rl.dataset.verifier=python",
             "--config.rl.dataset.function=e2e_verifier:score",
             "--config.rl.curriculum.enabled=True")  # over the training records
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"tokenizer {imported / 'tokenizer.json'}" in p.stdout
    assert "verifier score (a host callback)" in p.stdout
    with open(work / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert {"eval_accuracy", "eval_reward"} <= set(rows[0]) and "eval_reward" in rows[-1]
    assert all(np.isfinite(r["reward_mean"]) for r in rows[1:])
    assert all(0 <= r["reward_mean"] <= 1.1 for r in rows[1:])
    assert rows[2]["curriculum/seen_frac"] > 0

    # rl.generate on the run: its tokenizer (the checkpoint's BPE) and chat template.
    model, variables, config = load_run(str(work))
    tok = dataset.run_tokenizer(config)
    assert tok.path == str(imported / "tokenizer.json")
    capsys.readouterr()
    generate_main(["--workdir", str(work), "--chat", "--prompt", "add 1 2", "--prompt", "sum 3",
                   "--max-new-tokens", "3"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("add 1 2") and out[1].startswith("sum 3")
    # the same as decoding the sampler's greedy tokens of the rendered prompt by hand
    template = load_template("", tok)
    text = template.render([{"role": "user", "content": "add 1 2"}], add_generation_prompt=True)
    ids, stops = tok.encode(text), dataset.chat_stop_ids(tok, template)
    got = sample(model, variables, jnp.asarray(ids)[None], jnp.asarray([len(ids)]),
                 jax.random.key(0), max_new_tokens=3, greedy=True, eos_id=stops)
    toks = [int(t) for t, m in zip(got["completion"][0], got["completion_mask"][0], strict=True)
            if m and int(t) not in stops]
    assert out[0] == "add 1 2" + tok.decode(toks)
    assert os.path.exists(work / "final_metrics.json")

    for extra, needle in [
        ([f"--config.rl.dataset.paths={tmp_path / 'nope.jsonl'}"],
         "config.rl.dataset.paths: "),
        (["--config.rl.dataset.verifier=python", "--config.rl.dataset.function=nomod_q:f"],
         "config.rl.dataset.function='nomod_q:f': cannot import 'nomod_q'"),
    ]:
        p = _cli(str(tmp_path), *common, *extra, f"--config.workdir={tmp_path / 'bad'}")
        assert p.returncode == 2, p.stderr[-3000:]
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
        assert not os.path.exists(tmp_path / "bad")

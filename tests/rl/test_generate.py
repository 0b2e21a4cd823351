"""`python -m rl.generate` on a run directory: without `--max-new-tokens` the completion
budget is what fits in the model's `max_seq_len` after the longest prompt (the README's
example on `configs/rl_arith.py`, max_seq_len=16, used to fail with the fixed default 32);
an explicit budget that does not fit, or a prompt that fills the context, is one `error:`
line naming the numbers / the prompt."""

from __future__ import annotations

import pytest

import rl.generate
from configs import rl_arith
from rl import loop as rl_loop
from rl.generate import main as generate_main
from rl.sampling import sample

MAX_SEQ_LEN = 12  # "47+38=" (6 tokens) leaves room for 6 new tokens


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny RL run (1 step, no warm-up) of a 1-layer model with max_seq_len=12."""
    work = tmp_path_factory.mktemp("gen") / "run"
    c = rl_arith.get_config()
    c.workdir = str(work)
    c.model.update(dict(d_model=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=MAX_SEQ_LEN))
    c.mesh.data = -1  # the 8 test devices
    c.rl.update(dict(n_prompts=4, group_size=2, warmup_steps=0, eval_prompts=8, eval_every=0))
    c.optim.warmup_steps = 0
    c.train.update(dict(steps=1, log_every=1, progress=False))
    c.checkpoint.update(dict(every=1, keep=2, async_save=False))
    rl_loop.run(c)
    return str(work)


def test_default_budget_fills_the_context(run_dir, capsys, monkeypatch):
    budgets = []

    def spy(*args, **kwargs):
        budgets.append(kwargs["max_new_tokens"])
        return sample(*args, **kwargs)

    monkeypatch.setattr(rl.generate, "sample", spy)
    capsys.readouterr()
    generate_main(["--workdir", run_dir, "--prompt", "47+38=", "--prompt", "5+5="])
    assert budgets == [MAX_SEQ_LEN - 6]  # the longest prompt is 6 tokens
    out = capsys.readouterr().out
    # (an untrained model: the completions are arbitrary bytes, newlines possibly included)
    assert out.startswith("47+38=") and "\n5+5=" in out and out.endswith("\n")


def test_explicit_budget_that_does_not_fit_is_one_line(run_dir, capsys):
    with pytest.raises(SystemExit) as e:
        generate_main(["--workdir", run_dir, "--prompt", "47+38=", "--max-new-tokens", "32"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert "max_new_tokens 32" in err[0] and "'47+38=' (6 tokens)" in err[0]
    assert f"max_seq_len={MAX_SEQ_LEN}" in err[0] and "at most 6 new tokens" in err[0]


def test_prompt_filling_the_context_is_one_line(run_dir, capsys):
    long = "123456+8901="  # 12 tokens: fills the context
    with pytest.raises(SystemExit) as e:
        generate_main(["--workdir", run_dir, "--prompt", "5+5=", "--prompt", long])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert repr(long) in err[0] and "12 tokens" in err[0] and "'5+5='" not in err[0]
    assert f"max_seq_len={MAX_SEQ_LEN}" in err[0]

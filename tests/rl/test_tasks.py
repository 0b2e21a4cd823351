"""rl.tasks: prompts decode to well-posed problems (checked in Python), rewards on fixed
completion strings (correct, wrong, missing EOS, extra characters, masked EOS), and the
Python reward hook under jit."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl import tasks
from rl.tasks import EOS

BATCH = 64


def _sample(jit, task, seed=0, batch=BATCH):
    prompts, lens, answer = jit(task.sample_prompts, static_argnums=1)(jax.random.key(seed), batch)
    assert prompts.shape == (batch, task.prompt_width) and prompts.dtype == jnp.int32
    p, lens = np.asarray(prompts), np.asarray(lens)
    texts = [tasks.decode(p[i], lens[i]) for i in range(batch)]
    for i, t in enumerate(texts):  # right padding with EOS past the prompt
        assert len(t) == lens[i] and np.all(p[i, lens[i]:] == EOS)
    return texts, answer


def _completions(strings, width=12):
    """Encodes completion strings as the sampler would return them: '|' is EOS; the mask
    is 1 up to and including the first EOS and 0 after (the rest filled with EOS). A
    string without '|' is an unfinished completion: padded with 'x', all unmasked. A '#'
    is an EOS token that is masked out (e.g. past a length limit)."""
    toks = np.full((len(strings), width), EOS, np.int32)
    mask = np.zeros((len(strings), width), np.int32)
    for i, s in enumerate(strings):
        ids = [EOS if ch in "|#" else ord(ch) for ch in s]
        if "|" not in s and "#" not in s:
            ids += [ord("x")] * (width - len(ids))
        toks[i, : len(ids)] = ids
        end = s.index("|") + 1 if "|" in s else (s.index("#") if "#" in s else width)
        mask[i, :end] = 1
    return jnp.asarray(toks), jnp.asarray(mask)


def _reward(jit, task, answer, rows, strings, width=12):
    sub = jax.tree.map(lambda x: x[np.asarray(rows)], answer)
    toks, mask = _completions(strings, width)
    return np.asarray(jit(task.reward)(toks, mask, sub))


def test_addition_prompts_and_rewards(jit):
    task = tasks.Addition(min_digits=1, max_digits=3, format_reward=0.1)
    texts, answer = _sample(jit, task)
    sums = []
    for t in texts:
        m = re.fullmatch(r"(0|[1-9]\d{0,2})\+(0|[1-9]\d{0,2})=", t)
        assert m, t
        sums.append(int(m[1]) + int(m[2]))
    assert len({len(t) for t in texts}) > 3  # prompt lengths vary
    s0, s1 = str(sums[0]), str(sums[1])
    rows = [0] * 8 + [1]
    got = _reward(jit, task, answer, rows, [
        s0 + "|",            # correct
        s0,                  # missing EOS (unfinished)
        s0 + "5|",           # extra digit
        s0 + " |",           # extra character
        "9" + s0 + "|",      # wrong (well formed)
        s0 + "#",            # EOS masked out
        "|",                 # empty
        "a" + s0 + "|",      # garbage
        s1 + "|",            # correct for row 1
    ])
    np.testing.assert_allclose(got, [1, 0, 0.1, 0, 0.1, 0, 0, 0, 1])


def test_addition_answer_longer_than_completion(jit):
    task = tasks.Addition(min_digits=3, max_digits=3)
    texts, answer = _sample(jit, task, batch=4)
    a, b = texts[0][:-1].split("+")
    s = str(int(a) + int(b))
    assert _reward(jit, task, answer, [0], [s[: len(s) - 1]], width=len(s) - 1)[0] == 0
    assert _reward(jit, task, answer, [0], [s + "|"], width=len(s) + 1)[0] == 1


@pytest.mark.parametrize("op", ["reverse", "sort"])
def test_digit_task_prompts_and_rewards(jit, op):
    task = tasks.make_task(op, min_len=2, max_len=6)
    texts, answer = _sample(jit, task)
    name = "rev" if op == "reverse" else "sort"
    expected = []
    for t in texts:
        m = re.fullmatch(name + r"\((\d{2,6})\)=", t)
        assert m, t
        expected.append(m[1][::-1] if op == "reverse" else "".join(sorted(m[1])))
    e0 = expected[0]
    wrong = str((int(e0[0]) + 1) % 10) + e0[1:]
    got = _reward(jit, task, answer, [0, 0, 0, 0, 0, 2], [e0 + "|", e0, e0 + "0|", wrong + "|", e0 + "#",
                                                     expected[2] + "|"])
    np.testing.assert_allclose(got, [1, 0, 0, 0, 0, 1])


def _reachable(nums, target):
    for perm in itertools.permutations(nums):
        for ops in itertools.product("+-*", repeat=len(nums) - 1):
            acc = perm[0]
            for o, x in zip(ops, perm[1:], strict=True):
                acc = acc + x if o == "+" else acc - x if o == "-" else acc * x
            if acc == target:
                return "".join(f"{x}{o}" for x, o in zip(perm[:-1], ops, strict=True)) + str(perm[-1])
    return None


def test_countdown_prompts_are_solvable(jit):
    task = tasks.Countdown(n_numbers=3, max_number=10)
    texts, answer = _sample(jit, task)
    numbers, targets = np.asarray(answer["numbers"]), np.asarray(answer["target"])
    for i, t in enumerate(texts):
        m = re.fullmatch(r"(\d+),(\d+),(\d+)->(-?\d+):", t)
        assert m, t
        nums = [int(m[k]) for k in (1, 2, 3)]
        assert all(1 <= x <= 10 for x in nums)
        assert nums == numbers[i].tolist()
        assert int(m[4]) == targets[i]
        assert _reachable(nums, int(m[4])) is not None, t


def test_countdown_rewards_left_to_right(jit):
    task = tasks.Countdown(n_numbers=3, max_number=10, format_reward=0.1)
    answer = {"numbers": jnp.asarray([[3, 7, 5]] * 13), "target": jnp.asarray([26] * 12 + [50])}
    strings = [
        "3*7+5|",    # 26: correct
        "5+3*7|",    # (5+3)*7 = 56: well formed, wrong value
        "7*3+5|",    # other order: correct
        "3*7+5",     # missing EOS
        "3*7+5+|",   # trailing op
        "3*7+6|",    # wrong number: well formed
        "3*7|",      # too few numbers (and value 21)
        "3*7+5+0|",  # too many numbers
        "3*07+5|",   # leading zero
        "3 *7+5|",   # space
        "3*7+5#",    # EOS masked
        "31-5|",     # '31' is not a given number (only 2 numbers)
        "3+7*5|",    # (3+7)*5 = 50: correct under left-to-right evaluation
    ]
    toks, mask = _completions(strings, width=10)
    got = np.asarray(jit(task.reward)(toks, mask, answer))
    np.testing.assert_allclose(got, [1, 0.1, 1, 0, 0, 0.1, 0, 0, 0, 0, 0, 0, 1])
    value, used, ok = jit(task.parse)(toks, mask)
    assert int(value[1]) == 56 and np.asarray(used[1]).tolist() == [5, 3, 7] and bool(ok[1])


def test_countdown_subtraction_and_two_digit_numbers(jit):
    task = tasks.Countdown(n_numbers=2, max_number=20, ops="-")
    answer = {"numbers": jnp.asarray([[12, 20]] * 3), "target": jnp.asarray([-8] * 3)}
    toks, mask = _completions(["12-20|", "20-12|", "12+20|"], width=8)
    np.testing.assert_allclose(np.asarray(jit(task.reward)(toks, mask, answer)), [1, 0, 0])


def test_task_errors():
    with pytest.raises(ValueError, match="unknown task 'mult'"):
        tasks.make_task("mult")
    with pytest.raises(ValueError):
        tasks.Countdown(ops="/")
    with pytest.raises(ValueError):
        tasks.DigitTask(op="shuffle")
    with pytest.raises(ValueError):
        tasks.Addition(min_digits=3, max_digits=2)


def test_python_reward_hook_under_jit(jit):
    calls = []

    def fn(prompt, completion, target):
        calls.append((prompt, completion))
        return float(completion == str(int(target)))

    reward = tasks.python_reward(fn)
    prompts = jnp.asarray([[ord(c) for c in "1+1="] + [EOS], [ord(c) for c in "2+3="] + [EOS]])
    lens = jnp.asarray([4, 4])
    toks, mask = _completions(["2|", "6|"], width=4)
    out = jit(reward)(prompts, lens, toks, mask, jnp.asarray([2, 5]))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), [1.0, 0.0])
    assert calls == [("1+1=", "2"), ("2+3=", "6")]

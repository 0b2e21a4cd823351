"""RL on the user's own prompts: `DatasetTask`, prompts from JSONL files tokenized with the
run's tokenizer and scored by a verifier (`rl.verifiers`). `config.rl.task = "dataset"`
(configs/rl_dataset.py) builds it with `from_config`.

Records (`config.rl.dataset.paths`: `.jsonl` files, directories of them, globs), one JSON
object per line (blank lines skipped, other keys ignored):

    {"prompt": "What is 6 * 7?", "answer": "42"}                 answer: a string or a number
    {"messages": [{"role": "system", ...}, {"role": "user", "content": "..."}], "answer": 42}

`messages` end with the user turn the model answers. Anything else (bad JSON, a missing
field, a wrong type, an unknown role, an empty prompt, a boolean or non-finite answer, an
answer without a number for `exact_number`) is a `UserError` naming `file:line`.

Prompt text (`config.data.chat_template`, as in the sft and preference jobs, `train.chat`):
the conversation (`messages`, or [user: prompt]) rendered by the chat template with the
generation prompt (`add_generation_prompt=True`); "" is the template beside the tokenizer
(an imported checkpoint's `tokenizer_config.json` / `chat_template.jinja`), else the built-in
ChatML, so the prompts look like the sft job's. `"raw"` sends the prompt's text as it is (a
`messages` record must then be a single user turn). The text is tokenized without special
tokens added (a template writes its own BOS).

Shapes: every prompt is right-padded with `pad_id` (the tokenizer's EOS) to one width P =
`config.rl.dataset.max_prompt_len`, or the longest prompt when it is 0. A longer prompt is
a `UserError` naming `file:line`, or with `long_prompts="drop"` it is skipped and counted.
An empty prompt (no token) is an error.

Stop tokens (`stop_ids`): the tokenizer's EOS; with a chat template, also each end-of-turn
token of `END_OF_TURN` that the template's source writes and that is one token of the
vocabulary (ChatML's "<|im_end|>", Llama 3's "<|eot_id|>", ...); plus
`config.rl.dataset.stop_tokens` (each must be one token).

Held-out split: with `eval_paths`, their records are the evaluation prompts; otherwise a
record goes to evaluation when a hash of its prompt (crc32 of its JSON, not of its answer
nor its position) falls in the first `holdout_fraction` of the hash range (when none does,
the last record is held out). A training record whose prompt tokens equal an evaluation
prompt's is dropped (counted), so evaluation prompts are never trained on.

Rewards: the verifier (`rl.verifiers`: exact_number, regex, python `module:function`) runs
on the text of each completion (decoded by the tokenizer up to its first stop token)
through `rl.tasks.python_reward`, a `jax.pure_callback`: it LEAVES the compiled graph (the
completions are copied to the host, the verifier runs in Python, row by row, and the
rewards are copied back). The answer pytree is `{"index": [B] int32}`, each row's record.
"""

from __future__ import annotations

import dataclasses
import decimal
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rl import verifiers
from rl.tasks import decode, python_reward
from train.chat import (
    ChatTemplate,
    check_message,
    json_object,
    load_template,
    read_jsonl,
    record_key,
    resolve_tokenizer,
)
from train.errors import UserError
from train.tokenizers import make_tokenizer

__all__ = ["END_OF_TURN", "DatasetTask", "Example", "chat_stop_ids", "from_config",
           "parse_example", "read_examples", "render_prompt", "run_tokenizer"]

# End-of-turn tokens of common chat templates (ChatML, Llama 3, Phi-3, Gemma, Llama 2).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")
_HASH_RANGE = 2**32  # crc32


@dataclasses.dataclass(frozen=True)
class Example:
    """One record: `prompt` (a string or messages), `answer` as text, where it was read
    (`file:line`) and the hash of its prompt (the held-out split)."""

    prompt: str | tuple[dict[str, str], ...]
    answer: str
    where: str
    key: int

    @property
    def text(self) -> str:
        """The prompt's text for verifiers: the prompt, or the last (user) turn."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[-1]["content"]


def _answer_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: 'answer' must be a string or a number, not "
                        f"{type(value).__name__}")
    if not math.isfinite(value):
        raise UserError(f"{where}: 'answer' must be finite, not {value}")
    return format(decimal.Decimal(repr(value)), "f")  # 1e+20 -> its digits


def parse_example(line: str, where: str) -> Example:
    """One JSONL line -> an `Example` (module docstring); `UserError` naming `where`."""
    obj = json_object(line, where)
    has_messages, has_prompt = "messages" in obj, "prompt" in obj
    if has_messages and has_prompt:
        raise UserError(f"{where}: a record has 'prompt' or 'messages', not both")
    if not (has_messages or has_prompt):
        raise UserError(f"{where}: a record needs 'prompt' (or 'messages') and 'answer'; it "
                        f"has {sorted(obj) or 'no keys'}")
    if "answer" not in obj:
        raise UserError(f"{where}: missing field 'answer'")
    if has_prompt:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise UserError(f"{where}: 'prompt' must be a string, not {type(prompt).__name__}")
        if not prompt:
            raise UserError(f"{where}: empty 'prompt'")
        key_obj: dict[str, Any] = {"prompt": prompt}
    else:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            check_message(m, f"{where}: messages[{i}]", nonempty_assistant=False)
        if messages[-1]["role"] != "user":
            raise UserError(f"{where}: the last message must be the user turn to answer, not "
                            f"{messages[-1]['role']!r}")
        prompt = tuple({"role": m["role"], "content": m["content"]} for m in messages)
        key_obj = {"messages": list(prompt)}
    return Example(prompt, _answer_text(obj["answer"], where), where, record_key(key_obj))


def read_examples(paths: Sequence[str] | str, key: str = "config.rl.dataset.paths"
                  ) -> list[Example]:
    """The examples of the JSONL files `paths` names, in order (`parse_example`)."""
    return read_jsonl(paths, "RL prompt", parse_example, key)


def render_prompt(prompt: str | Sequence[dict[str, str]], template: ChatTemplate,
                  where: str = "") -> str:
    """The text a prompt (a string: one user turn, or messages) is sent as: rendered by
    the chat template with its generation prompt, or with a raw template the text as it
    is (messages must then be one user turn; `UserError` naming `where` otherwise)."""
    if not template.raw:
        messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                    else list(prompt))
        return template.render(messages, add_generation_prompt=True, where=where)
    if isinstance(prompt, str):
        return prompt
    if len(prompt) != 1:
        raise UserError(f"{where}: config.data.chat_template='raw' sends a prompt's text "
                        f"as it is: 'messages' must be one user turn, not "
                        f"{[m['role'] for m in prompt]}")
    return prompt[0]["content"]


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text)
    return int(ids[0]) if len(ids) == 1 else None


def chat_stop_ids(tokenizer, template: ChatTemplate, extra: Sequence[str] = ()
                  ) -> tuple[int, ...]:
    """The tokenizer's EOS, the template's end-of-turn tokens, and `extra` (module
    docstring)."""
    ids = [int(tokenizer.eos_id)]
    if not template.raw:
        ids += [i for t in END_OF_TURN if t in template.source
                and (i := _single_token(tokenizer, t)) is not None]
    for t in extra:
        i = _single_token(tokenizer, str(t))
        if i is None:
            raise UserError(f"config.rl.dataset.stop_tokens: {t!r} is not one token of the "
                            "tokenizer")
        ids.append(i)
    return tuple(dict.fromkeys(ids))


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetTask:
    """Prompts from JSONL files and a text-level verifier, with the interface of the
    `rl.tasks` tasks (module docstring). Build it with `DatasetTask.build` or
    `from_config`.

    Rows `[0, pool_size)` of `prompts` / `lens` are the training prompts, the rest the
    held-out ones; `examples[i]` is row i's record. `prompts_at(idx)` gathers training rows
    inside `jit` (`sample_prompts` draws them uniformly), `eval_split()` returns the
    held-out rows on the host.
    """

    prompts: np.ndarray  # [N, P] int32, right-padded with pad_id
    lens: np.ndarray  # [N] int32
    pool_size: int  # training rows (the first ones)
    examples: tuple[Example, ...]
    verify: verifiers.Verifier
    tokenizer: Any
    stop_ids: tuple[int, ...]
    pad_id: int
    template_origin: str = ""
    dropped_long: int = 0  # prompts longer than max_prompt_len, skipped
    dropped_overlap: int = 0  # training records whose prompt is an evaluation prompt's
    # No natural completion budget: config.rl.max_new_tokens must be given.
    min_new_tokens: int = 1

    @classmethod
    def build(cls, train: Sequence[Example], held_out: Sequence[Example] | None, tokenizer,
              template: ChatTemplate, verify: verifiers.Verifier, *,
              holdout_fraction: float = 0.0, max_prompt_len: int = 0,
              long_prompts: str = "error", stop_tokens: Sequence[str] = (),
              check_numbers: bool = False) -> DatasetTask:
        """The task of the examples `train` and `held_out` (None: a `holdout_fraction` of
        `train` by the hash of each prompt); see the module docstring. `check_numbers`:
        every answer must hold a number (the exact_number verifier)."""
        if long_prompts not in ("error", "drop"):
            raise UserError(f"config.rl.dataset.long_prompts={long_prompts!r} must be 'error' "
                            "or 'drop'")
        if not 0 <= holdout_fraction < 1:
            raise UserError(f"config.rl.dataset.holdout_fraction={holdout_fraction} must be "
                            "in [0, 1)")
        max_prompt_len = int(max_prompt_len)
        if max_prompt_len < 0:
            raise UserError(f"config.rl.dataset.max_prompt_len={max_prompt_len} must be >= 0 "
                            "(0: the longest prompt)")
        pairs = [(ex, False) for ex in train] + [(ex, True) for ex in held_out or ()]
        if held_out is None:
            cut = holdout_fraction * _HASH_RANGE
            pairs = [(ex, ex.key < cut) for ex in train]
            if holdout_fraction > 0 and len(pairs) > 1 and not any(h for _, h in pairs):
                pairs[-1] = (pairs[-1][0], True)
        if check_numbers:
            for ex, _ in pairs:
                if verifiers.final_number(ex.answer) is None:
                    raise UserError(f"{ex.where}: the answer {ex.answer!r} holds no number "
                                    "(config.rl.dataset.verifier='exact_number')")
        ids = tokenizer.encode_batch([render_prompt(ex.prompt, template, ex.where)
                                        for ex, _ in pairs])
        kept, dropped_long = [], 0
        for (ex, held), t in zip(pairs, ids, strict=True):
            if len(t) == 0:
                raise UserError(f"{ex.where}: the prompt is no token once rendered")
            if max_prompt_len and len(t) > max_prompt_len:
                if long_prompts == "error":
                    raise UserError(
                        f"{ex.where}: the prompt is {len(t)} tokens, more than "
                        f"config.rl.dataset.max_prompt_len={max_prompt_len} (raise it, or "
                        "config.rl.dataset.long_prompts='drop' skips such prompts)")
                dropped_long += 1
                continue
            kept.append((ex, held, np.asarray(t, np.int32)))
        evals = [(ex, t) for ex, held, t in kept if held]
        eval_rows = {t.tobytes() for _, t in evals}
        trains = [(ex, t) for ex, held, t in kept if not held and t.tobytes() not in eval_rows]
        overlap = sum(1 for _, held, t in kept if not held) - len(trains)
        if not trains:
            raise UserError(f"config.rl.dataset: no training prompt left of {len(pairs)} "
                            f"records ({dropped_long} longer than max_prompt_len, {overlap} "
                            f"equal to an evaluation prompt, {len(evals)} held out)")
        rows = trains + evals
        width = max_prompt_len or max(len(t) for _, t in rows)
        pad = int(tokenizer.eos_id)
        prompts = np.full((len(rows), width), pad, np.int32)
        for i, (_, t) in enumerate(rows):
            prompts[i, : len(t)] = t
        lens = np.asarray([len(t) for _, t in rows], np.int32)
        return cls(prompts, lens, len(trains), tuple(ex for ex, _ in rows), verify, tokenizer,
                   chat_stop_ids(tokenizer, template, stop_tokens), pad, template.origin,
                   dropped_long, overlap)

    # ------------------------------------------------------------------ task protocol
    @property
    def prompt_width(self) -> int:
        return int(self.prompts.shape[1])

    @property
    def eval_size(self) -> int:
        return int(len(self.lens) - self.pool_size)

    def prompts_at(self, idx: jax.Array):
        """`(prompt_tokens [B, P], prompt_lens [B], answer)` of training rows `idx [B]`
        (in [0, pool_size)); jittable (the training rows are constants of the program)."""
        idx = jnp.asarray(idx, jnp.int32)
        prompts = jnp.asarray(self.prompts[: self.pool_size])
        lens = jnp.asarray(self.lens[: self.pool_size])
        return prompts[idx], lens[idx], {"index": idx}

    def sample_prompts(self, key: jax.Array, batch: int):
        """`batch` training prompts drawn uniformly, with replacement."""
        return self.prompts_at(jax.random.randint(key, (batch,), 0, self.pool_size))

    def reward(self, completion: jax.Array, completion_mask: jax.Array, answer) -> jax.Array:
        """`[B]` float32: the verifier on each decoded completion, through the host
        callback `rl.tasks.python_reward` (leaves the compiled graph)."""
        b = completion.shape[0]
        call = verifiers.checked(self.verify)

        def host(_prompt: str, completion_text: str, index) -> float:
            ex = self.examples[int(index)]
            return call(ex.text, completion_text, ex.answer, ex.where)

        reward = python_reward(host, functools.partial(decode, tokenizer=self.tokenizer,
                                                       stop_ids=self.stop_ids))
        # No prompt tokens go to the host: the verifier gets the record's own prompt text.
        return reward(jnp.zeros((b, 0), jnp.int32), jnp.zeros((b,), jnp.int32), completion,
                      completion_mask, answer["index"])

    # -------------------------------------------------------------------- evaluation
    def eval_split(self, count: int | None = None, multiple: int = 1):
        """The held-out prompts as numpy `(prompt_tokens, prompt_lens, answer)`: the first
        `count` (all when None, or when there are fewer), rounded down to a multiple of
        `multiple` (the data-parallel size). ValueError when that leaves none."""
        n = self.eval_size if count is None else min(int(count), self.eval_size)
        n -= n % max(int(multiple), 1)
        if n <= 0:
            raise ValueError(
                f"the dataset holds {self.eval_size} held-out prompt(s), fewer than the "
                f"{multiple} the evaluation needs: set config.rl.dataset.eval_paths or raise "
                "config.rl.dataset.holdout_fraction")
        rows = np.arange(self.pool_size, self.pool_size + n)
        return self.prompts[rows], self.lens[rows], {"index": rows.astype(np.int32)}

    def summary(self) -> str:
        """One line for the run log."""
        tok = getattr(self.tokenizer, "path", "byte")
        name = getattr(self.verify, "__qualname__", repr(self.verify))
        return (f"data: {self.pool_size} training / {self.eval_size} held-out prompts of "
                f"width {self.prompt_width} ({self.dropped_long} dropped as too long, "
                f"{self.dropped_overlap} training records equal to a held-out prompt dropped); "
                f"tokenizer {tok}, template {self.template_origin}, stop ids "
                f"{list(self.stop_ids)}, verifier {name} (a host callback)")


def run_tokenizer(config):
    """The tokenizer of a run's `config`: `config.data.tokenizer`, else `init_from`'s
    (`train.chat.resolve_tokenizer`), else the byte tokenizer."""
    name = resolve_tokenizer(config.data, str(config.get("init_from", "") or ""))
    return make_tokenizer(name, str(config.data.get("eos_token", "") or ""))


def from_config(config) -> DatasetTask:
    """The `DatasetTask` of `config.rl.dataset` (configs/rl_dataset.py), with the tokenizer
    of `config.data` / `config.init_from` (`train.chat.resolve_tokenizer`) and the chat
    template of `config.data.chat_template`. Errors are `UserError`s naming the key."""
    d = config.rl.dataset
    if not d.paths:
        raise UserError("config.rl.dataset.paths is empty: the dataset task needs JSONL files "
                        "of {'prompt', 'answer'} (or {'messages', 'answer'}) records")
    verify = verifiers.make_verifier(str(d.verifier), str(d.get("pattern", "") or ""),
                                     str(d.get("function", "") or ""))
    tokenizer = run_tokenizer(config)
    template = load_template(str(config.data.get("chat_template", "")), tokenizer)
    train = read_examples(d.paths)
    held_out = read_examples(d.eval_paths, "config.rl.dataset.eval_paths") if d.eval_paths else None
    return DatasetTask.build(
        train, held_out, tokenizer, template, verify,
        holdout_fraction=float(d.holdout_fraction), max_prompt_len=int(d.max_prompt_len or 0),
        long_prompts=str(d.long_prompts), stop_tokens=tuple(d.stop_tokens or ()),
        check_numbers=d.verifier == "exact_number")

"""Preference data for the preference job (`rl.preference_loop`): JSONL records -> chat
template -> fixed-width token rows with a loss mask on the completion.

Records (`config.data.paths`: `.jsonl` files, directories of them, globs), one JSON object
per line (blank lines skipped; other keys ignored):

    {"prompt": P, "chosen": C, "rejected": C}            a pair (every loss)
    {"prompt": P, "completion": C, "label": true|false}  an unpaired example (KTO only)

P is a string (the conversation [user: P]) or a non-empty list of messages
`{"role": "system"|"user"|"assistant"|"tool", "content": str}`; C is a non-empty string,
an assistant message `{"role": "assistant", "content": str}` or a list of exactly one.
For KTO a pair counts as two examples, chosen desirable and rejected undesirable (as in
the KTO paper). Anything else (bad JSON, a missing field, a wrong type, an unknown role,
an empty completion, an unpaired record for a pairwise loss) is a `UserError` naming
`file:line`.

A pair whose chosen and rejected completions are equal carries no preference (DPO's
gradient on it is exactly 0, its loss the constant log 2): it is skipped and counted
(`PreferenceData.identical`, in the summary line, with the first `file:line`); a data set
left with no pair is a `UserError`.

Tokens (`train.chat.encode_pair`): the chat template renders the prompt plus the
completion as the last assistant turn; the mask is 1 exactly on the completion's tokens
and its end of turn. A row is `seq_len + 1` tokens (inputs = tokens[:-1], targets =
tokens[1:], mask on the targets), zero-padded (mask 0). A longer example is cut at the
end (document truncation, as `train.chat`); a pair (or example) left with no completion
token on a side, or whose two sides become identical, is dropped; both counts are in the
summary.

KTO's KL rows: for the examples of a batch, row i is the prompt of example i followed by
the completion of example (i + 1) mod n of the same batch (the mismatched pairs of the
paper and TRL). The templates render each piece on its own (`train.chat`), so prompt
tokens + completion tokens is the encoding of that conversation for a prefix-stable
template whose assistant turn does not depend on the prompt (ChatML and most others).

Held-out split: a record goes to eval when crc32(its JSON, keys sorted) % 1000 <
`config.data.eval_permille` (independent of file order); when eval is wanted and none
hashes there, the last kept record is held out.

Batches: `batch(step)` is a pure function of (seed, step): an endless stream of per-epoch
permutations of the training rows (`numpy.random.default_rng([seed, epoch])`), the global
batch the next `batch_size` of them, each process its contiguous share. Every batch holds
`index` (the rows' numbers, for precomputed reference log-probs).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from train.chat import (
    check_message,
    encode_pair,
    json_object,
    load_template,
    read_jsonl,
    record_key,
    resolve_tokenizer,
)
from train.errors import UserError
from train.tokenizers import make_tokenizer

__all__ = ["PreferenceData", "Record", "parse_record", "read_records"]


@dataclasses.dataclass(frozen=True)
class Record:
    """One preference record: a pair (`rejected` set, `label` None) or an unpaired
    example (`rejected` None, `label` its desirability); `prompt` a string or messages."""

    prompt: str | tuple[dict[str, str], ...]
    chosen: str  # the completion of an unpaired example
    rejected: str | None
    label: bool | None
    where: str
    key: int


def _completion(value: Any, field: str, where: str) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise UserError(f"{where}: {field!r} as a list must hold exactly one assistant "
                            f"message, not {len(value)}")
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant" or not isinstance(value.get("content"), str):
            raise UserError(f"{where}: {field!r} must be a string or an assistant message "
                            "{'role': 'assistant', 'content': str}")
        value = value["content"]
    if not isinstance(value, str):
        raise UserError(f"{where}: {field!r} must be a string or an assistant message, not "
                        f"{type(value).__name__}")
    if not value:
        raise UserError(f"{where}: empty {field!r} (nothing to compare)")
    return value


def _prompt(value: Any, where: str) -> str | tuple[dict[str, str], ...]:
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: 'prompt' must be a string or a non-empty list of messages, "
                        f"not {type(value).__name__ if value != [] else 'an empty list'}")
    for i, m in enumerate(value):
        check_message(m, f"{where}: prompt[{i}]", nonempty_assistant=False)
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def parse_record(line: str, where: str, paired_only: bool) -> Record:
    """One JSONL line -> a `Record` (module docstring); `UserError` naming `where`.
    `paired_only`: an unpaired example is an error (the pairwise losses)."""
    obj = json_object(line, where)
    paired = "chosen" in obj or "rejected" in obj
    if paired:
        fields = ("prompt", "chosen", "rejected")
    elif "completion" in obj or "label" in obj:
        if paired_only:
            raise UserError(f"{where}: an unpaired record (prompt/completion/label) needs "
                            "config.preference.loss='kto'; the pairwise losses need 'prompt', "
                            "'chosen' and 'rejected'")
        fields = ("prompt", "completion", "label")
    else:
        raise UserError(f"{where}: a record needs 'prompt', 'chosen' and 'rejected'"
                        + ("" if paired_only else " (or 'prompt', 'completion' and 'label')")
                        + f"; it has {sorted(obj) or 'no keys'}")
    for k in fields:
        if k not in obj:
            raise UserError(f"{where}: missing field {k!r}")
    prompt = _prompt(obj["prompt"], where)
    key = record_key(obj)
    if paired:
        return Record(prompt, _completion(obj["chosen"], "chosen", where),
                      _completion(obj["rejected"], "rejected", where), None, where, key)
    if not isinstance(obj["label"], bool):
        raise UserError(f"{where}: 'label' must be true or false, not {obj['label']!r}")
    return Record(prompt, _completion(obj["completion"], "completion", where), None,
                  obj["label"], where, key)


def read_records(paths: Sequence[str] | str, paired_only: bool) -> list[Record]:
    """The records of the JSONL files `paths` names, in order (see `parse_record`)."""
    return read_jsonl(paths, "preference",
                      lambda line, where: parse_record(line, where, paired_only))


# ------------------------------------------------------------------------------- rows
def _row(tokens: np.ndarray, mask: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens [width] int32, mask [width] float32)`: cut at the end, zero-padded."""
    t = np.zeros(width, np.int32)
    m = np.zeros(width, np.float32)
    n = min(len(tokens), width)
    t[:n], m[:n] = tokens[:n], mask[:n]
    return t, m


def rows_batch(tokens: np.ndarray, mask: np.ndarray, prefix: str = "") -> dict[str, np.ndarray]:
    """`[rows, width]` token / mask rows -> `{prefix}inputs, targets, mask, positions`
    `[rows, width - 1]` (mask on the targets)."""
    n, w = tokens.shape
    return {f"{prefix}inputs": tokens[:, :-1], f"{prefix}targets": tokens[:, 1:],
            f"{prefix}mask": mask[:, 1:],
            f"{prefix}positions": np.broadcast_to(np.arange(w - 1, dtype=np.int32),
                                                  (n, w - 1)).copy()}


@dataclasses.dataclass
class Split:
    """The rows of one split. Pairs: `chosen` / `rejected` = (tokens, mask) `[n, width]`.
    KTO: `chosen` = the examples' rows, `desirable` `[n]`, and per example its prompt tokens
    and its completion (tokens, mask) for the KL rows."""

    chosen: tuple[np.ndarray, np.ndarray]
    rejected: tuple[np.ndarray, np.ndarray] | None = None
    desirable: np.ndarray | None = None
    prompts: list[np.ndarray] = dataclasses.field(default_factory=list)
    completions: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chosen[0])

    def kl_rows(self, idx: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """KTO's KL rows of the examples `idx` (in that order): prompt of idx[i] + the
        completion of idx[(i + 1) % n]."""
        out = [_row(np.concatenate([self.prompts[i], self.completions[j][0]]),
                    np.concatenate([np.zeros(len(self.prompts[i]), np.float32),
                                    self.completions[j][1]]), width)
               for i, j in zip(idx, np.roll(idx, -1), strict=True)]
        return np.stack([t for t, _ in out]), np.stack([m for _, m in out])

    def batch(self, idx: np.ndarray, width: int) -> dict[str, np.ndarray]:
        """The batch of rows `idx` (module docstring)."""
        idx = np.asarray(idx, np.int64)
        out = {"index": idx.astype(np.int32)}
        if self.rejected is not None:
            out.update(rows_batch(self.chosen[0][idx], self.chosen[1][idx], "chosen_"))
            out.update(rows_batch(self.rejected[0][idx], self.rejected[1][idx], "rejected_"))
        else:
            out.update(rows_batch(self.chosen[0][idx], self.chosen[1][idx]))
            out["desirable"] = self.desirable[idx]
            out.update(rows_batch(*self.kl_rows(idx, width), "kl_"))
        return out


def _split_prompt(tokens: np.ndarray, mask: np.ndarray):
    """(prompt tokens, (completion tokens, completion mask)) at the first trained token."""
    at = int(np.argmax(mask > 0))
    return tokens[:at], (tokens[at:], mask[at:])


class PreferenceData:
    """The preference records of `config.data`, tokenized into rows of `seq_len + 1`
    tokens, split into train / eval, with batches as a pure function of (seed, step).
    See the module docstring. `kto`: examples (pairs become two) and KL rows."""

    def __init__(self, data_cfg, seq_len: int, global_batch: int, seed: int, *, kto: bool,
                 process_index: int = 0, process_count: int = 1, eval_wanted: bool = True,
                 init_from: str = ""):
        seq_len, global_batch = int(seq_len), int(global_batch)
        if global_batch < 1 or global_batch % process_count:
            raise UserError(f"config.data.batch_size={global_batch} must be a positive "
                            f"multiple of the number of processes ({process_count})")
        if not data_cfg.paths:
            raise UserError("config.data.paths is empty: the preference job needs JSONL "
                            "files of {'prompt', 'chosen', 'rejected'} records")
        self.kto, self.seq_len, self.width = kto, seq_len, seq_len + 1
        self.global_batch, self.seed = global_batch, int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch = global_batch // process_count
        self.tokenizer = make_tokenizer(resolve_tokenizer(data_cfg, init_from),
                                        str(data_cfg.get("eos_token", "")))
        self.vocab_size, self.eos_id = self.tokenizer.vocab_size, self.tokenizer.eos_id
        self.template = load_template(str(data_cfg.get("chat_template", "")), self.tokenizer)
        records = read_records(data_cfg.paths, paired_only=not kto)
        permille = int(data_cfg.eval_permille)
        wanted = eval_wanted and permille > 0
        self.identical, self.first_identical = 0, ""
        self.truncated = self.dropped = 0
        kept = []  # (record, [(tokens, mask, label)], held out)
        for r in records:
            if r.rejected is not None and r.rejected == r.chosen:
                self.identical += 1
                self.first_identical = self.first_identical or r.where
                continue
            sides = [(r.chosen, True if r.label is None else r.label)]
            if r.rejected is not None:
                sides.append((r.rejected, False))
            enc = []
            for text, label in sides:
                tokens, mask = encode_pair(r.prompt, text, self.template, self.tokenizer,
                                           where=r.where)
                self.truncated += len(tokens) > self.width
                enc.append((tokens, mask, label))
            rows = [_row(t, m, self.width) for t, m, _ in enc]
            if (not all(m[1:].any() for _, m in rows)
                    or (len(rows) == 2 and all(np.array_equal(a, b)
                                               for a, b in zip(*rows, strict=True)))):
                self.dropped += 1
                continue
            kept.append((enc, rows, wanted and r.key % 1000 < permille))
        if wanted and len(kept) > 1 and not any(h for *_, h in kept):
            kept[-1] = (*kept[-1][:2], True)
        self.n_records = len(records)
        self.train = self._split([k for k in kept if not k[2]])
        self.eval = self._split([k for k in kept if k[2]])
        if self.train is None:
            why = [f"{self.identical} with chosen == rejected" if self.identical else "",
                   f"{self.dropped} with no completion token within config.data.seq_len="
                   f"{seq_len} or identical once cut" if self.dropped else "",
                   "the rest in the eval split (lower config.data.eval_permille)"
                   if self.eval is not None else ""]
            raise UserError(f"config.data: no training {'example' if kto else 'pair'} left "
                            f"from {len(records)} records ({'; '.join(w for w in why if w)})")
        self.data_key = zlib.crc32(np.array([r.key for r in records], np.uint32).tobytes())
        self._perm_cache: dict[int, np.ndarray] = {}

    def _split(self, kept) -> Split | None:
        if not kept:
            return None
        if not self.kto:
            c = [rows[0] for _, rows, _ in kept]
            r = [rows[1] for _, rows, _ in kept]
            return Split((np.stack([t for t, _ in c]), np.stack([m for _, m in c])),
                         (np.stack([t for t, _ in r]), np.stack([m for _, m in r])))
        toks, masks, labels, prompts, completions = [], [], [], [], []
        for enc, rows, _ in kept:
            for (tokens, mask, label), (t, m) in zip(enc, rows, strict=True):
                toks.append(t)
                masks.append(m)
                labels.append(bool(label))
                p, c = _split_prompt(tokens, mask)
                prompts.append(p)
                completions.append(c)
        return Split((np.stack(toks), np.stack(masks)), None, np.array(labels, bool),
                     prompts, completions)

    # ------------------------------------------------------------------------- batches
    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            self._perm_cache[epoch] = np.random.default_rng(
                [self.seed, epoch]).permutation(len(self.train))
        return self._perm_cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        """The training rows of this process's share of the global batch of `step`."""
        n = len(self.train)
        start = int(step) * self.global_batch + self.process_index * self.local_batch
        g = np.arange(start, start + self.local_batch)
        return np.array([self._perm(int(i) // n)[int(i) % n] for i in g], np.int64)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of `step`."""
        return self.train.batch(self.indices(step), self.width)

    def batches(self, start_step: int = 0):
        """`batch(start_step)`, `batch(start_step + 1)`, ..."""
        step = int(start_step)
        while True:
            yield self.batch(step)
            step += 1

    def summary(self) -> str:
        """One line for the run log."""
        what = "examples" if self.kto else "pairs"
        n_eval = 0 if self.eval is None else len(self.eval)
        tok = getattr(self.tokenizer, "path", "byte")
        same = (f"{self.identical} skipped with chosen == rejected (first at "
                f"{self.first_identical}); " if self.identical else "")
        return (f"data: preference, {len(self.train)} train / {n_eval} eval {what} from "
                f"{self.n_records} records in rows of {self.width} tokens; {same}"
                f"{self.truncated} completions cut to {self.width} tokens, {self.dropped} "
                f"records dropped (no completion token left, or identical once cut); "
                f"tokenizer {tok}, template {self.template.origin}")

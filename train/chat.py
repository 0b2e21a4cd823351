"""Chat / instruction data for supervised fine-tuning: JSONL records -> chat template ->
tokens with a loss mask -> packed rows in the pretraining batch format.

Records (`config.data.paths`: `.jsonl` files, directories of them, globs), one JSON object
per line (blank lines are skipped), either

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}

A prompt/completion record is the conversation [user: prompt, assistant: completion]. A
record needs at least one assistant turn with non-empty content; other keys are ignored.
Anything else (bad JSON, a missing field, a wrong type, an unknown role, an empty
completion, no assistant turn) is a `UserError` naming `file:line`.

Chat template (`config.data.chat_template`): "" finds the one beside the tokenizer file
(`tokenizer_config.json`'s `chat_template`, else `chat_template.jinja`; an imported
checkpoint keeps both, see `model.hf.checkpoint.copy_tokenizer`), else `BUILTIN_TEMPLATE`;
"builtin" forces that; a path names a `.jinja` file, a `tokenizer_config.json` or a
directory holding one; "raw" renders no roles at all (below). Templates are untrusted
code: they run in Jinja's `ImmutableSandboxedEnvironment` (`trim_blocks`, `lstrip_blocks`,
`loopcontrols`, as Hugging Face transformers renders them) with `messages`,
`add_generation_prompt`, the special tokens of `tokenizer_config.json` (`bos_token`,
`eos_token`, ...) and the globals `raise_exception` and `strftime_now`; a syntax or
runtime error (an unsafe attribute included) is a `UserError` naming the template's file.

Raw (`chat_template="raw"`): the prompt's text, then the completion's text, then the
tokenizer's EOS token, with no role markup (the layout of the RL tasks' prompts, e.g.
"47+38=" -> "85" EOS); the loss is on the completion and its EOS. It takes prompt/completion
records (or `messages` of one user turn then one assistant turn); anything else (a system
or tool turn, several turns) is a `UserError` naming the record.

Loss mask (`encode_messages`): only the tokens of assistant turns count, from the end of
the generation prompt (`<|im_start|>assistant\\n`) to the end of the turn, its end-of-turn
token included. The template renders each prefix of the conversation: up to assistant turn
i with the generation prompt (turn i's start) and through turn i (its end); each must be a
prefix of the whole rendering (else a `UserError`: the template is not prefix-stable). The
text is cut at those offsets and each piece tokenized on its own, so the prompt's tokens
are exactly those a generation from the prompt starts from.

Over-long examples: an example of more than `seq_len + 1` tokens is truncated to its first
`seq_len + 1` (the end of the conversation is cut); one left with no trained target is
dropped. Both counts are in `ChatData.summary()`.

Held-out split: a record goes to eval when crc32(its JSON, keys sorted) % 1000 <
`config.data.eval_permille` (so the split does not depend on file order); when eval is
wanted and no (kept) record hashes there, the last kept record is held out.

Packing: examples are laid out with `train.data.pack_documents` into rows of `seq_len + 1`
tokens (never split: none is longer than a row), with the segment ids and positions of
pretraining; a batch is `inputs, targets, positions, segment_ids, mask` as there, `mask`
also 0 where the target is not an assistant token. Batches are shuffled and repeated like
`train.data.DataPipeline`'s (a pure function of (seed, step)).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from train.data import Documents, PackedRows, expand_paths, to_example
from train.errors import UserError
from train.tokenizers import Tokenizer, make_tokenizer

__all__ = [
    "BUILTIN_TEMPLATE", "RAW_TEMPLATE", "ROLES", "ChatData", "ChatTemplate", "Record", "encode_messages",
    "encode_pair", "load_template", "read_records", "resolve_tokenizer",
]

ROLES = ("system", "user", "assistant", "tool")
JSONL_SUFFIXES = (".jsonl",)
# ChatML (the template of Qwen and many others), used when the tokenizer has none.
BUILTIN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
RAW_TEMPLATE = "raw"  # config.data.chat_template: prompt + completion + EOS, no roles
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token")


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class Record:
    """One conversation: `messages` (dicts with at least `role` and `content`), where it
    was read (`file:line`) and the hash that puts it in the eval split."""

    messages: tuple[dict[str, Any], ...]
    where: str
    key: int


def read_jsonl(paths: Sequence[str] | str, what: str,
               parse: Callable[[str, str], Any], key: str = "config.data.paths") -> list[Any]:
    """`parse(line, 'file:line')` of every non-blank line of the JSONL files that `paths`
    name (files, directories, globs), in order; an unreadable file or no record at all is
    a `UserError` (`what`: the kind of data, `key`: the config key, for the messages)."""
    files = expand_paths(paths, JSONL_SUFFIXES, key)
    out = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {what} data file {str(f)!r}: "
                            f"{getattr(e, 'strerror', None) or e}") from e
        out += [parse(line, f"{f}:{n}") for n, line in enumerate(lines, start=1) if line.strip()]
    if not out:
        raise UserError(f"{key}: no {what} record in {', '.join(map(str, files))}")
    return out


def json_object(line: str, where: str) -> dict[str, Any]:
    """One JSONL line as a JSON object; `UserError` naming `where` otherwise."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise UserError(f"{where}: not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise UserError(f"{where}: a record must be a JSON object, not {type(obj).__name__}")
    return obj


def record_key(obj: dict[str, Any]) -> int:
    """The hash of a record that puts it in the eval split (by `data.eval_permille`)."""
    return zlib.crc32(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def read_records(paths: Sequence[str] | str) -> list[Record]:
    """The records of the JSONL files that `paths` name (files, directories, globs), in
    order; a malformed one is a `UserError` naming `file:line`."""
    return read_jsonl(paths, "chat", parse_record)


def parse_record(line: str, where: str) -> Record:
    """One JSONL line -> a `Record` (see the module docstring); `UserError` naming `where`."""
    obj = json_object(line, where)
    has_messages, has_pair = "messages" in obj, "prompt" in obj or "completion" in obj
    if has_messages and has_pair:
        raise UserError(f"{where}: a record has 'messages' or 'prompt'/'completion', not both")
    if has_messages:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            check_message(m, f"{where}: messages[{i}]")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: no assistant message (nothing to train on)")
    elif has_pair:
        for k in ("prompt", "completion"):
            if k not in obj:
                raise UserError(f"{where}: missing field {k!r}")
            if not isinstance(obj[k], str):
                raise UserError(f"{where}: {k!r} must be a string, not "
                                f"{type(obj[k]).__name__}")
        if not obj["completion"]:
            raise UserError(f"{where}: empty 'completion' (nothing to train on)")
        messages = [{"role": "user", "content": obj["prompt"]},
                    {"role": "assistant", "content": obj["completion"]}]
    else:
        raise UserError(f"{where}: a record needs 'messages' or 'prompt' and 'completion' "
                        f"(it has {sorted(obj) or 'no keys'})")
    return Record(tuple(messages), where, record_key(obj))


def check_message(m: Any, where: str, nonempty_assistant: bool = True) -> None:
    """A `{"role", "content"}` message with a known role; `UserError` naming `where`
    otherwise (also for an empty assistant turn when it is trained on)."""
    if not isinstance(m, dict):
        raise UserError(f"{where} must be an object with 'role' and 'content'")
    for k in ("role", "content"):
        if k not in m:
            raise UserError(f"{where}: missing field {k!r}")
        if not isinstance(m[k], str):
            raise UserError(f"{where}: {k!r} must be a string, not {type(m[k]).__name__}")
    if m["role"] not in ROLES:
        raise UserError(f"{where}: unknown role {m['role']!r} (one of {', '.join(ROLES)})")
    if nonempty_assistant and m["role"] == "assistant" and not m["content"]:
        raise UserError(f"{where}: empty assistant content (nothing to train on)")


# ----------------------------------------------------------------------------- templates


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@dataclasses.dataclass
class ChatTemplate:
    """A compiled chat template. `origin` names its file ('built-in' for
    `BUILTIN_TEMPLATE`); `special` holds the special tokens it is rendered with. `raw`:
    no template (`RAW_TEMPLATE`, see the module docstring); `source` is then unused."""

    source: str
    origin: str
    special: dict[str, str] = dataclasses.field(default_factory=dict)
    raw: bool = False

    def __post_init__(self):
        if self.raw:
            return
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"chat template {self.origin}: syntax error at line {e.lineno}: "
                            f"{e.message}") from e

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
               where: str = "") -> str:
        """The template's text for `messages`; a failure is a `UserError` naming the
        template and `where` (the record)."""
        try:
            return self._template.render(messages=list(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         **self.special)
        except Exception as e:  # untrusted code: any failure is the template's (or data's)
            at = f" (rendering {where})" if where else ""
            raise UserError(f"chat template {self.origin}: {type(e).__name__}: {e}{at}") from e


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "</s>", ...} in older files
        value = value.get("content", "")
    return value if isinstance(value, str) else ""


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path!r}: {getattr(e, 'strerror', None) or e}") from e
    if not isinstance(obj, dict):
        raise UserError(f"{path!r} is not a JSON object")
    return obj


def _config_template(path: str) -> str | None:
    """The `chat_template` of a tokenizer_config.json (the 'default' one of a list)."""
    t = _read_json(path).get("chat_template")
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    if t is not None and not isinstance(t, str):
        raise UserError(f"{path!r}: 'chat_template' is not a string")
    return t


def load_template(spec: str = "", tokenizer: Tokenizer | None = None) -> ChatTemplate:
    """The chat template that `spec` (`config.data.chat_template`) names, see the module
    docstring; `tokenizer` (its file's directory) is where "" looks."""
    spec = os.path.expanduser(str(spec))
    tok_path = getattr(tokenizer, "path", "")
    tok_dir = os.path.dirname(tok_path) if tok_path else ""
    special = {}
    if tok_dir and os.path.isfile(os.path.join(tok_dir, "tokenizer_config.json")):
        cfg = _read_json(os.path.join(tok_dir, "tokenizer_config.json"))
        special = {k: _token_text(cfg.get(k)) for k in _SPECIAL_KEYS if _token_text(cfg.get(k))}
    if tokenizer is not None and "eos_token" not in special and tok_path:
        special["eos_token"] = tokenizer.decode([tokenizer.eos_id])

    def beside(d: str) -> ChatTemplate | None:
        cfg = os.path.join(d, "tokenizer_config.json")
        if os.path.isfile(cfg) and (t := _config_template(cfg)) is not None:
            return ChatTemplate(t, cfg, special)
        jinja = os.path.join(d, "chat_template.jinja")
        if os.path.isfile(jinja):
            return ChatTemplate(_read_text(jinja), jinja, special)
        return None

    if spec == RAW_TEMPLATE:
        return ChatTemplate("", "raw (prompt + completion + EOS, no roles)", special, raw=True)
    if spec == "builtin":
        return ChatTemplate(BUILTIN_TEMPLATE, "built-in", special)
    if not spec:
        found = beside(tok_dir) if tok_dir else None
        return found or ChatTemplate(BUILTIN_TEMPLATE, "built-in", special)
    if os.path.isdir(spec):
        found = beside(spec)
        if found is None:
            raise UserError(f"config.data.chat_template={spec!r}: the directory has no "
                            "tokenizer_config.json with a chat_template nor chat_template.jinja")
        return found
    if not os.path.isfile(spec):
        raise UserError(f"config.data.chat_template={spec!r}: no such file ('' finds the "
                        "tokenizer's, 'builtin' is ChatML)")
    if spec.endswith(".json"):
        t = _config_template(spec)
        if t is None:
            raise UserError(f"config.data.chat_template={spec!r} has no 'chat_template'")
        return ChatTemplate(t, spec, special)
    return ChatTemplate(_read_text(spec), spec, special)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read chat template {path!r}: "
                        f"{getattr(e, 'strerror', None) or e}") from e


# ----------------------------------------------------------------------------- encoding


# A piece standing for the tokenizer's EOS token (the raw template's end of completion).
EOS_PIECE = "\0<eos>"


def _raw_pieces(messages: Sequence[dict[str, Any]], where: str) -> list[tuple[str, bool]]:
    """The raw template's pieces: prompt (untrained), completion and EOS (trained)."""
    roles = [m["role"] for m in messages]
    if roles not in (["user", "assistant"], ["assistant"]):
        raise UserError(
            f"{where}: config.data.chat_template='raw' takes a prompt and one completion "
            f"(a prompt/completion record, or messages: user then assistant), not the turns "
            f"{roles}; use a chat template for conversations")
    prompt = messages[0]["content"] if len(messages) == 2 else ""
    return [(t, w) for t, w in ((prompt, False), (messages[-1]["content"], True),
                                (EOS_PIECE, True)) if t]


def _pieces(messages: Sequence[dict[str, Any]], template: ChatTemplate, where: str,
            last_only: bool) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces (module docstring)."""
    if template.raw:
        return _raw_pieces(messages, where)
    full = template.render(messages, False, where)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if last_only:
        turns = turns[-1:]
    pieces, at = [], 0
    for i in turns:
        start = template.render(messages[:i], True, where)
        end = template.render(messages[: i + 1], False, where)
        if not (full.startswith(start) and full.startswith(end) and at <= len(start)):
            raise UserError(
                f"{where}: chat template {template.origin} is not prefix-stable: its rendering "
                f"of the messages before assistant turn {i} (with the generation prompt) or "
                f"through it is not a prefix of the whole conversation's, so the assistant "
                "tokens cannot be located; use another template (config.data.chat_template)")
        if len(end) <= len(start):
            raise UserError(f"{where}: chat template {template.origin} renders assistant turn "
                            f"{i} as no text (nothing to train on)")
        pieces += [(full[at:len(start)], False), (full[len(start):len(end)], True)]
        at = len(end)
    pieces.append((full[at:], False))
    return [(t, w) for t, w in pieces if t]


def _tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """`tokenizer.encode_batch(texts)`, with each `EOS_PIECE` the EOS token."""
    ids = tokenizer.encode_batch([t for t in texts if t != EOS_PIECE])
    eos = np.asarray([tokenizer.eos_id], np.int32)
    it = iter(ids)
    return [eos if t == EOS_PIECE else next(it) for t in texts]


def _assemble(pieces: list[tuple[str, bool]], ids: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    tokens = np.concatenate([np.asarray(i, np.int32) for i in ids] or [np.zeros(0, np.int32)])
    mask = np.concatenate([np.full(len(i), float(w), np.float32)
                           for (_, w), i in zip(pieces, ids, strict=True)]
                          or [np.zeros(0, np.float32)])
    return tokens, mask


def encode_messages(
    messages: Sequence[dict[str, Any]], template: ChatTemplate, tokenizer: Tokenizer, *,
    where: str = "", last_only: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """A conversation rendered by `template` and tokenized piecewise (module docstring).

    Returns:
      `(tokens int32 [n], mask float32 [n])`: mask 1 on the tokens of the assistant turns
      (only the last one with `last_only`), 0 elsewhere. Token j's mask says whether it is
      trained as the target predicted from tokens < j.
    """
    pieces = _pieces(messages, template, where, last_only)
    return _assemble(pieces, _tokenize(tokenizer, [t for t, _ in pieces]))


def encode_pair(
    prompt: str | Sequence[dict[str, Any]], completion: str, template: ChatTemplate,
    tokenizer: Tokenizer, *, where: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens, mask)` of a prompt and one completion (e.g. a preference pair's chosen or
    rejected answer): the conversation `[user: prompt]` (or the `prompt` messages) plus
    `[assistant: completion]`, with mask 1 exactly on the completion's tokens and its
    end of turn. Two completions of one prompt get the same prompt tokens."""
    messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                else list(prompt))
    messages.append({"role": "assistant", "content": completion})
    return encode_messages(messages, template, tokenizer, where=where, last_only=True)


def encode_records(records: Sequence[Record], template: ChatTemplate,
                   tokenizer: Tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """`encode_messages` of every record, tokenized in one batch."""
    all_pieces = [_pieces(r.messages, template, r.where, False) for r in records]
    flat = [t for p in all_pieces for t, _ in p]
    ids = _tokenize(tokenizer, flat) if flat else []
    out, at = [], 0
    for p in all_pieces:
        out.append(_assemble(p, ids[at : at + len(p)]))
        at += len(p)
    return out


# ----------------------------------------------------------------------------- batches


def resolve_tokenizer(data_cfg, init_from: str = "") -> str:
    """`config.data.tokenizer`, or when it is empty the `tokenizer.json` of `init_from`
    (an imported checkpoint) or the tokenizer of the run whose workdir `init_from` is (its
    saved `config.json`, resolved the same way), else "byte"."""
    name = str(data_cfg.get("tokenizer", "") or "")
    if name:
        return name
    if init_from and os.path.isfile(os.path.join(init_from, "tokenizer.json")):
        return os.path.join(init_from, "tokenizer.json")
    saved = os.path.join(init_from, "config.json") if init_from else ""
    if saved and os.path.isfile(saved):
        run = _read_json(saved)
        parent = str(run.get("init_from", "") or "")
        if os.path.abspath(parent) != os.path.abspath(init_from):
            return resolve_tokenizer(run.get("data") or {}, parent)
    return "byte"


def _to_chat_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row of `2 * token + trained` values -> `to_example` with the mask also 0
    where the target is not trained."""
    v = row["tokens"]
    ex = to_example(dict(row, tokens=v >> 1))
    ex["mask"] = ex["mask"] * (v[1:] & 1).astype(np.float32)
    return ex


class ChatData:
    """Packed, shuffled, process-local SFT batches as a pure function of (seed, step), with
    the interface of `train.data.DataPipeline` (`batch`, `batches`, `eval_batches`,
    `vocab_size`, `eos_id`, `tokenizer`, `summary`). See the module docstring."""

    def __init__(self, data_cfg, seq_len: int, global_batch: int, seed: int,
                 process_index: int = 0, process_count: int = 1,
                 eval_batches: int | None = None, init_from: str = ""):
        seq_len, global_batch = int(seq_len), int(global_batch)
        if global_batch < 1 or global_batch % process_count:
            raise UserError(f"config.data.batch_size={global_batch} must be a positive "
                            f"multiple of the number of processes ({process_count})")
        if not data_cfg.paths:
            raise UserError("config.data.paths is empty: the sft job needs JSONL chat files")
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch = global_batch // process_count
        self.tokenizer = make_tokenizer(resolve_tokenizer(data_cfg, init_from),
                                        str(data_cfg.get("eos_token", "")))
        self.vocab_size, self.eos_id = self.tokenizer.vocab_size, self.tokenizer.eos_id
        self.template = load_template(str(data_cfg.get("chat_template", "")), self.tokenizer)
        records = read_records(data_cfg.paths)
        permille = int(data_cfg.eval_permille)
        if not 0 <= permille <= 1000:
            raise UserError(f"config.data.eval_permille={permille} must be in [0, 1000]")
        wanted = permille > 0 and (eval_batches is None or int(eval_batches) > 0)
        width = seq_len + 1
        self.truncated = self.dropped = 0
        kept = []  # (tokens, mask, held out)
        for r, (tokens, mask) in zip(records, encode_records(records, self.template,
                                                              self.tokenizer), strict=True):
            if len(tokens) > width:
                self.truncated += 1
                tokens, mask = tokens[:width], mask[:width]
            if not mask[1:].any():
                self.dropped += 1
                continue
            kept.append((tokens, mask, wanted and r.key % 1000 < permille))
        if wanted and len(kept) > 1 and not any(h for *_, h in kept):
            kept[-1] = (*kept[-1][:2], True)
        train = [(t, m) for t, m, h in kept if not h]
        evals = [(t, m) for t, m, h in kept if h]
        if not train:
            raise UserError(
                f"config.data: no training example left from {len(records)} records"
                + (f" ({self.dropped} dropped: no assistant token within "
                   f"config.data.seq_len={seq_len})" if self.dropped else "")
                + (" (all in the eval split: lower config.data.eval_permille)" if evals else ""))
        self.train_rows, self.n_train = self._rows(train, width), len(train)
        self.eval_rows, self.n_eval = self._rows(evals, width), len(evals)
        self.eval_permille = permille
        self._train = (
            grain.MapDataset.source(self.train_rows)
            .shuffle(seed=self.seed % 2**32)
            .repeat(None)
            .map(_to_chat_example)
            .batch(self.local_batch, drop_remainder=True)
        )

    @staticmethod
    def _rows(examples: list[tuple[np.ndarray, np.ndarray]], width: int) -> PackedRows:
        """The examples packed; each slot holds `2 * token + trained` (int32, so the
        vocabulary must stay below 2**30), which `PackedRows` carries unchanged."""
        if examples:
            values = np.concatenate([2 * t.astype(np.int64) + (m > 0) for t, m in examples])
            lengths = np.array([len(t) for t, _ in examples], np.int64)
        else:
            values, lengths = np.zeros(0, np.int64), np.zeros(0, np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        docs = Documents(np.zeros(len(lengths), np.int32), starts, lengths)
        return PackedRows([values.astype(np.int32)], docs, width)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch for `step`."""
        return self._train[int(step) * self.process_count + self.process_index]

    def batches(self, start_step: int = 0, prefetch: int = 2):
        """`batch(start_step)`, `batch(start_step + 1)`, ... built ahead in Grain threads."""
        ds = self._train.slice(slice(int(start_step) * self.process_count + self.process_index,
                                     None, self.process_count))
        opts = grain.ReadOptions(num_threads=max(prefetch, 1), prefetch_buffer_size=prefetch)
        return iter(ds.to_iter_dataset(opts))

    def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
        """The first `n` batches of the eval rows in order (fewer when there are fewer
        rows; rows are reused when there is less than one batch); `n <= 0`: none."""
        if int(n) <= 0:
            return []
        rows = len(self.eval_rows)
        if rows == 0:
            raise UserError("the chat eval split is empty: raise config.data.eval_permille "
                            "(or add records)")
        n = min(int(n), max(1, rows // self.global_batch))
        ds = (grain.MapDataset.source(self.eval_rows).repeat(None).map(_to_chat_example)
              .batch(self.local_batch, drop_remainder=True))
        return [ds[i * self.process_count + self.process_index] for i in range(n)]

    def summary(self) -> str:
        """One line for the run log."""
        tok = getattr(self.tokenizer, "path", "byte")
        return (
            f"data: chat, {self.n_train} train / {self.n_eval} eval examples in "
            f"{len(self.train_rows):,} / {len(self.eval_rows):,} rows of {self.seq_len + 1} "
            f"({self.train_rows.fill():.0%} filled); {self.truncated} truncated to "
            f"{self.seq_len + 1} tokens, {self.dropped} dropped (no assistant token left); "
            f"tokenizer {tok}, template {self.template.origin}"
        )

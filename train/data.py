"""Training data: documents -> tokens -> fixed-length training windows.

Sources (`config.data.source`):
  stdlib: the Python standard library's source files of the running interpreter
          (real text that every machine has; the offline default).
  text:   UTF-8 text files; `config.data.paths` lists files, directories (searched
          recursively for `*.txt`, `*.md`, `*.py`) and globs.
  bin:    pre-tokenized flat token files (`.bin` raw uint16/uint32 per `config.data.dtype`,
          or `.npy`), concatenated in the given order.

Documents are tokenized (byte-level by default), joined with an EOS token between
documents and split into a train and a held-out eval stream (a document goes to eval
when crc32(name) % 1000 < eval_permille; for `bin` the last tokens form the eval split).

Batches are a pure function of (seed, step): row r of the batch for step s is the window
starting at a position drawn from `np.random.default_rng((seed, s))`. The data position
is therefore the step itself, which makes resuming exact.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sysconfig
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from train.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-document token 256."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def make_tokenizer(name: str) -> ByteTokenizer:
    if name == "byte":
        return ByteTokenizer()
    raise UserError(f"config.data.tokenizer={name!r} is not supported (available: 'byte')")


def stdlib_files() -> list[Path]:
    """The `.py` files of the running interpreter's standard library, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.parts))


def expand_paths(paths: Iterable[str], suffixes: tuple[str, ...] | None) -> list[Path]:
    """Files named by paths, directories (recursively) and globs; an unmatched entry is an error."""
    out: list[Path] = []
    for entry in paths:
        entry = os.path.expanduser(str(entry))
        if any(ch in entry for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(entry, recursive=True))
            if not matches:
                raise UserError(f"config.data.paths: glob {entry!r} matches no file")
            out.extend(m for m in matches if m.is_file())
        elif os.path.isdir(entry):
            found = sorted(
                p for p in Path(entry).rglob("*")
                if p.is_file() and (suffixes is None or p.suffix in suffixes)
            )
            if not found:
                raise UserError(f"config.data.paths: directory {entry!r} holds no {suffixes} file")
            out.extend(found)
        elif os.path.isfile(entry):
            out.append(Path(entry))
        else:
            raise UserError(f"config.data.paths: {entry!r} does not exist")
    return out


@dataclasses.dataclass
class TokenData:
    """Train and eval token streams."""

    train: np.ndarray
    eval: np.ndarray
    vocab_size: int
    eos_id: int


def _is_eval(name: str, permille: int) -> bool:
    return zlib.crc32(name.encode()) % 1000 < permille


def load_tokens(data_cfg) -> TokenData:
    """Loads and tokenizes the configured source into train/eval streams."""
    source = data_cfg.source
    permille = int(data_cfg.eval_permille)
    if source == "bin":
        if not data_cfg.paths:
            raise UserError("config.data.paths is empty; source='bin' needs token files")
        arrays = []
        for p in expand_paths(data_cfg.paths, (".bin", ".npy")):
            if p.suffix == ".npy":
                arr = np.load(p, mmap_mode="r")
            else:
                try:
                    arr = np.memmap(p, dtype=np.dtype(data_cfg.dtype), mode="r")
                except (TypeError, ValueError) as e:
                    raise UserError(f"config.data.dtype={data_cfg.dtype!r}: {e}") from e
            arrays.append(np.asarray(arr).reshape(-1))
        tokens = np.concatenate(arrays).astype(np.int32)
        vocab = int(data_cfg.vocab_size) if data_cfg.vocab_size > 0 else int(tokens.max()) + 1
        n_eval = max(len(tokens) * permille // 1000, 0)
        split = len(tokens) - n_eval
        return TokenData(tokens[:split], tokens[split:], vocab, int(data_cfg.eos_id))

    tok = make_tokenizer(data_cfg.tokenizer)
    if source == "stdlib":
        files = stdlib_files()
        if data_cfg.max_files > 0:
            files = files[: int(data_cfg.max_files)]
    elif source == "text":
        if not data_cfg.paths:
            raise UserError("config.data.paths is empty; source='text' needs files or directories")
        files = expand_paths(data_cfg.paths, TEXT_SUFFIXES)
    else:
        raise UserError(f"config.data.source={source!r} must be one of 'stdlib', 'text', 'bin'")
    train_parts: list[np.ndarray] = []
    eval_parts: list[np.ndarray] = []
    eos = np.array([tok.eos_id], np.int32)
    for f in files:
        try:
            raw = f.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read data file {str(f)!r}: {e}") from e
        if not raw:
            continue
        dst = eval_parts if _is_eval(str(f), permille) else train_parts
        dst.extend([tok.encode(raw), eos])
    if not train_parts:
        raise UserError(f"config.data: source {source!r} gave no training text")
    train = np.concatenate(train_parts)
    ev = np.concatenate(eval_parts) if eval_parts else train[-(len(train) // 100 + 2):]
    return TokenData(train, ev, tok.vocab_size, tok.eos_id)


def batch_at(
    tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int
) -> dict[str, np.ndarray]:
    """The batch for `step`: `inputs`, `targets` `[batch, seq_len]` int32 (targets shifted by one).

    Deterministic in (seed, step), independent of what was drawn before.
    """
    if len(tokens) < seq_len + 2:
        raise UserError(
            f"the token stream has {len(tokens)} tokens, fewer than config.data.seq_len+2={seq_len + 2}"
        )
    rng = np.random.default_rng((int(seed), int(step)))
    starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch_size)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    win = np.asarray(tokens[idx], dtype=np.int32)
    return {"inputs": win[:, :-1], "targets": win[:, 1:]}


def eval_batches(
    tokens: np.ndarray, n_batches: int, batch_size: int, seq_len: int
) -> list[dict[str, np.ndarray]]:
    """Fixed, non-overlapping held-out windows (the same every eval)."""
    need = seq_len + 1
    total = min(n_batches * batch_size, max((len(tokens) - 1) // need, 0))
    total -= total % batch_size
    if total == 0:
        raise UserError(
            f"the eval split has {len(tokens)} tokens: too few for one eval batch of "
            f"{batch_size} x {seq_len}; raise config.data.eval_permille"
        )
    win = np.asarray(tokens[: total * need], np.int32).reshape(total, need)
    return [
        {"inputs": win[i : i + batch_size, :-1], "targets": win[i : i + batch_size, 1:]}
        for i in range(0, total, batch_size)
    ]

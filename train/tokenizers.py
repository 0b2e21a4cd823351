"""Tokenizers for `config.data.tokenizer`: byte-level, Hugging Face `tokenizer.json`, SentencePiece.

Each has `vocab_size`, `eos_id`, `encode(text) -> int32 array`, `encode_batch(texts)` and
`decode(ids) -> str`. None adds BOS/EOS by itself: the data pipeline appends `eos_id` after
every document.

  "byte"                UTF-8 bytes 0..255 plus EOS 256 (vocab 257).
  path to a .json file  (or a directory holding `tokenizer.json`) the `tokenizers` library;
                        EOS = `config.data.eos_token` if set, else `eos_token` of a
                        `tokenizer_config.json` beside it, else the first of `EOS_CANDIDATES`
                        in the vocabulary.
  path to a .model file SentencePiece; EOS = `config.data.eos_token` if set, else the
                        model's own `eos_id`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from train.errors import UserError

EOS_CANDIDATES = (
    "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>", "<|end|>",
)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-document token 256."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (fast tokenizers library), without special tokens added."""

    def __init__(self, path: str, eos_token: str = ""):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # the library raises plain Exception on a bad file
            raise UserError(
                f"config.data.tokenizer={path!r} is not a valid tokenizer.json: {e}"
            ) from e
        self.path = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        if eos_token:
            eos = self._tok.token_to_id(eos_token)
            if eos is None:
                raise UserError(
                    f"config.data.eos_token={eos_token!r} is not in the vocabulary of {path!r}"
                )
        else:
            eos = None
            for name in (_config_eos(path), *EOS_CANDIDATES):
                if name and self._tok.token_to_id(name) is not None:
                    eos = self._tok.token_to_id(name)
                    break
            if eos is None:
                raise UserError(
                    f"tokenizer {path!r} has none of the EOS tokens {list(EOS_CANDIDATES)}: "
                    "set config.data.eos_token"
                )
        self.eos_id = int(eos)

    def encode(self, text: str | bytes) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        texts = [_as_str(t) for t in texts]
        encs = self._tok.encode_batch(texts, add_special_tokens=False)  # threaded in Rust
        return [np.asarray(e.ids, np.int32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class SentencePieceTokenizer:
    """A SentencePiece `.model` file, without BOS/EOS added."""

    def __init__(self, path: str, eos_token: str = ""):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=path)
        except (OSError, RuntimeError) as e:
            raise UserError(
                f"config.data.tokenizer={path!r} is not a valid SentencePiece model: {e}"
            ) from e
        self.path = path
        self.vocab_size = int(self._sp.get_piece_size())
        if eos_token:
            eos = self._sp.piece_to_id(eos_token)
            if eos == self._sp.unk_id() and eos_token != self._sp.id_to_piece(eos):
                raise UserError(
                    f"config.data.eos_token={eos_token!r} is not a piece of {path!r}"
                )
        else:
            eos = self._sp.eos_id()
            if eos < 0:
                raise UserError(f"SentencePiece model {path!r} has no EOS: set config.data.eos_token")
        self.eos_id = int(eos)

    def encode(self, text: str | bytes) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
        ids = self._sp.encode([_as_str(t) for t in texts], num_threads=os.cpu_count() or 1)
        return [np.asarray(i, np.int32) for i in ids]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


Tokenizer = ByteTokenizer | HFTokenizer | SentencePieceTokenizer


def make_tokenizer(name: str, eos_token: str = "") -> Tokenizer:
    """The tokenizer that `config.data.tokenizer` names ("byte" or a file path)."""
    name = str(name)
    if name == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(name)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
        raise UserError(
            f"config.data.tokenizer={name!r}: no such file (use 'byte', a tokenizer.json "
            "or a SentencePiece .model)"
        )
    if not os.access(path, os.R_OK) or os.path.isdir(path):
        raise UserError(f"config.data.tokenizer={name!r}: cannot read it")
    if path.endswith(".json"):
        return HFTokenizer(path, eos_token)
    if path.endswith(".model"):
        return SentencePieceTokenizer(path, eos_token)
    raise UserError(
        f"config.data.tokenizer={name!r}: expected 'byte', a tokenizer.json or a "
        "SentencePiece .model file"
    )


def _config_eos(path: str) -> str:
    """`eos_token` of the `tokenizer_config.json` next to `path`, or ''."""
    cfg = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    try:
        with open(cfg) as f:
            eos = json.load(f).get("eos_token", "")
    except (OSError, ValueError, AttributeError):
        return ""
    if isinstance(eos, dict):  # {"content": "</s>", ...} in older files
        eos = eos.get("content", "")
    return eos if isinstance(eos, str) else ""


def _as_str(text: str | bytes) -> str:
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text

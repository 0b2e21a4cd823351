"""Training data: documents -> tokens -> packed rows -> a Grain `MapDataset` of batches.

Sources (`config.data.source`):
  stdlib:      the `.py` files of the running interpreter's standard library (real text
               that every machine has; the offline default). `max_files > 0` keeps the
               first files in sorted order. One file is one document.
  text:        UTF-8 text files; `paths` lists files, directories (searched recursively
               for `TEXT_SUFFIXES`) and globs. One file is one document.
  bin:         pre-tokenized flat token files: `.bin` raw `dtype` (uint16/uint32/int32)
               values, or `.npy` integer arrays (any shape, flattened), memory-mapped;
               documents end after each `eos_id` token and at each file end.
  arrayrecord: ArrayRecord files (`paths`), one document per record. `record_format`
               says what a record is: "text" (UTF-8 text, tokenized like `text`) or
               "tokens" (the raw bytes of a `dtype` array, like `.bin`; a record is a
               document, further split after `eos_id` tokens).
A missing path, an empty glob or directory, or an unreadable file is a `UserError` naming it.

Tokenizers (`config.data.tokenizer`, see `train.tokenizers`): "byte" (UTF-8 bytes + EOS
256), a Hugging Face `tokenizer.json`, or a SentencePiece `.model`. Text documents are
tokenized once at start, the whole corpus in threaded batches, not lazily per document
(packing needs every length up front); each is followed by EOS and all are kept in memory
as one uint16 array (int32 for vocabularies over 65536). With a tokenizer file,
`cache_dir` keeps the tokenized corpus on disk (keyed by the tokenizer and the files'
sizes and mtimes), so a restart does not tokenize again. Token
sources (bin, arrayrecord tokens) use the tokens as they are: `vocab_size` (None -> the
tokenizer file's vocabulary, else max token + 1; a larger token is an error) and `eos_id`
(None -> the tokenizer file's EOS, else none: documents end only at file/record ends); a
`tokenizer` file there only serves these defaults and `DataPipeline.tokenizer` (which is
None with the "byte" default).

Held-out split: a text document goes to eval when crc32(name) % 1000 < `eval_permille`
(name: the path, relative to the stdlib root for `stdlib`; `path:index` for a record);
if none does, the last document is held out. For token sources the last `eval_permille`
thousandths of the tokens are the eval split. An eval split is wanted when
`eval_permille > 0` and `DataPipeline(eval_batches=n)` has n != 0 (None, the default:
n = 1). Where that split leaves no training document (a single-file corpus is one
document; or every name hashes into eval), or no eval token while one is wanted, the
split goes inside the documents instead, deterministically: the corpus (all documents end
to end, in order) is cut at one token and the tokens after the cut are the eval split (the
document cut in two goes in part to each side; a piece's first token is never a target,
so no token is both trained on and evaluated). The eval split then holds
E = max(total * eval_permille // 1000, min(n * batch_size * seq_len + 1, total // 2), 2)
tokens (the middle term: enough for the n eval batches asked for, at most half the
corpus), lowered so that the training split keeps one row of `seq_len + 1` tokens (if the
corpus has fewer than `seq_len + 3`, the eval split is its last 2 tokens). With no eval
split wanted and no training document, every document trains. A corpus with no training
row holding a target (under 2 tokens for training, plus 2 for an eval split where one is
wanted) is a `UserError` naming the files and their sizes.

Packing (`pack_documents`): documents are laid out greedily, in order, into rows of
`seq_len + 1` tokens. A document goes into the current row when it fits in the space left;
otherwise one no longer than a row starts a new row (the rest of the old row is padding),
and a longer one fills the rest of the current row (when at least 2 tokens are left) and
continues in the following rows. Each continuation piece repeats the last token of the
previous piece, so every token of a document but its first is a target exactly once.
Within a row `segment_ids` number the pieces 1, 2, ... (0 = padding, token 0) and
`positions` restart at 0 at every piece, continuations included (RoPE is relative, and
positions stay below `seq_len`). An example is `inputs = row[:-1]`, `targets = row[1:]`,
`positions`/`segment_ids` of the inputs, and `mask` (float32) = 1 where the target is a
real token of the input's own segment (0 on padding and where the next token starts
another document or piece). The model attends only within a segment.

Batches: the packed rows, `MapDataset.shuffle(seed % 2**32)` (a new permutation each
epoch), repeated without end and batched. The batch for step s is a pure function of
(seed, s): the data position is the step itself, so resuming is exact. Every process loads
and packs the whole corpus; with P processes process p gets rows [p * B/P, (p+1) * B/P) of
the same global batch (Grain batches of B/P, index s * P + p). Eval batches are the eval
rows in order, unshuffled.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NoReturn

import grain
import numpy as np

from train.errors import UserError
from train.tokenizers import ByteTokenizer, Tokenizer, make_tokenizer

__all__ = [
    "ByteTokenizer", "DataPipeline", "PackedRows", "make_tokenizer", "pack_documents",
    "load_corpus", "stdlib_files", "expand_paths",
]

SOURCES = ("stdlib", "text", "bin", "arrayrecord")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
TOKEN_DTYPES = ("uint16", "uint32", "int32")
_SCAN = 1 << 24  # tokens per chunk when scanning token files


# ----------------------------------------------------------------------------- files


def stdlib_files() -> list[Path]:
    """The `.py` files of the running interpreter's standard library, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__"}
    out = []
    for d, subdirs, files in os.walk(root):
        subdirs[:] = [s for s in subdirs if s not in skip]  # do not descend into them
        out.extend(Path(d, f) for f in files if f.endswith(".py"))
    return sorted(out)


def expand_paths(paths: Iterable[str], suffixes: tuple[str, ...] | None,
                 key: str = "config.data.paths") -> list[Path]:
    """Files named by paths, directories (recursively, files with `suffixes`) and globs;
    an entry that matches no file is a `UserError` naming it (and the config `key`)."""
    if isinstance(paths, str):
        paths = [paths]
    out: list[Path] = []
    for entry in paths:
        entry = os.path.expanduser(str(entry))
        if any(ch in entry for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(entry, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise UserError(f"{key}: glob {entry!r} matches no file")
            out.extend(files)
        elif os.path.isdir(entry):
            found = sorted(
                p for p in Path(entry).rglob("*")
                if p.is_file() and (suffixes is None or p.suffix in suffixes)
            )
            if not found:
                raise UserError(
                    f"{key}: directory {entry!r} holds no file"
                    + (f" ending in {' '.join(suffixes)}" if suffixes else "")
                )
            out.extend(found)
        elif os.path.isfile(entry):
            out.append(Path(entry))
        else:
            raise UserError(f"{key}: {entry!r} does not exist")
    return out


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read data file {str(path)!r}: {e.strerror or e}") from e


def _paths(data_cfg, suffixes: tuple[str, ...] | None) -> list[Path]:
    if not data_cfg.paths:
        raise UserError(f"config.data.paths is empty; source={data_cfg.source!r} needs files")
    return expand_paths(data_cfg.paths, suffixes)


def _token_dtype(data_cfg) -> np.dtype:
    if str(data_cfg.dtype) not in TOKEN_DTYPES:
        raise UserError(f"config.data.dtype={data_cfg.dtype!r} must be one of {TOKEN_DTYPES}")
    return np.dtype(str(data_cfg.dtype))


def _array_record_reader(path: Path):
    from array_record.python.array_record_module import ArrayRecordReader

    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read ArrayRecord file {str(path)!r}")
    try:
        reader = ArrayRecordReader(str(path))
        n = reader.num_records()
    except Exception as e:  # the C++ reader raises RuntimeError/ValueError variants
        raise UserError(f"cannot read ArrayRecord file {str(path)!r}: {e}") from e
    if n == 0:
        raise UserError(f"ArrayRecord file {str(path)!r} holds no records (or is not one)")
    return reader


def _records(path: Path) -> list[bytes]:
    reader = _array_record_reader(path)
    try:
        return list(reader.read_all())
    except Exception as e:
        raise UserError(f"cannot read ArrayRecord file {str(path)!r}: {e}") from e
    finally:
        reader.close()


# ----------------------------------------------------------------------------- corpus


@dataclasses.dataclass(frozen=True)
class Documents:
    """Documents as slices `shards[shard][start : start + length]` of token arrays."""

    shard: np.ndarray
    start: np.ndarray
    length: np.ndarray

    def __len__(self) -> int:
        return len(self.length)

    def take(self, idx) -> Documents:
        return Documents(self.shard[idx], self.start[idx], self.length[idx])


@dataclasses.dataclass
class Corpus:
    """Tokenized train and eval documents over shared token arrays."""

    shards: list[np.ndarray]
    train: Documents
    eval: Documents
    vocab_size: int
    eos_id: int  # -1: none (a token source without EOS: documents end at file/record ends)
    tokenizer: Tokenizer | None
    # How train and eval were split: "documents" (text: by name), "tokens" (token sources:
    # the last tokens), "in-document" (the fallback of the module docstring), "none".
    split: str = "documents"


@dataclasses.dataclass
class _Loaded:
    """A source read and tokenized: every document in corpus order, its first split."""

    shards: list[np.ndarray]
    docs: Documents
    train: Documents
    eval: Documents
    split: str
    vocab_size: int
    eos_id: int
    tokenizer: Tokenizer | None
    files: list[Path]  # for the too-small error
    sizes: list[str]  # the size of each file, in words ("12 bytes", "7 tokens")


def load_corpus(data_cfg, eval_tokens: int = 2, row_tokens: int = 2) -> Corpus:
    """Reads, tokenizes and splits the configured source (see the module docstring).

    `eval_tokens`: how many tokens an in-document eval split should hold at least (0: no
    eval split is wanted); `row_tokens`: the width of a training row, which such a split
    leaves to the training split when the corpus has that many to spare."""
    source = str(data_cfg.source)
    if source not in SOURCES:
        raise UserError(f"config.data.source={source!r} must be one of {', '.join(SOURCES)}")
    permille = int(data_cfg.eval_permille)
    if not 0 <= permille <= 1000:
        raise UserError(f"config.data.eval_permille={permille} must be in [0, 1000]")
    is_tokens = source == "bin" or (
        source == "arrayrecord" and _record_format(data_cfg) == "tokens"
    )
    if is_tokens:
        loaded = _token_corpus(data_cfg, source, permille)
    else:
        tok = make_tokenizer(data_cfg.tokenizer, str(data_cfg.get("eos_token", "")))
        loaded = _text_corpus(data_cfg, source, tok, permille)
    train, held, split = _final_split(loaded, permille, int(eval_tokens), int(row_tokens))
    return Corpus(loaded.shards, train, held, loaded.vocab_size, loaded.eos_id,
                  loaded.tokenizer, split)


def _cut(docs: Documents, cut: int) -> tuple[Documents, Documents]:
    """The documents end to end split at corpus token `cut`: those before it (the one
    straddling it shortened) and those after it (the straddling one's rest)."""
    if len(docs) == 0:
        return docs, docs
    begin = np.concatenate([[0], np.cumsum(docs.length)[:-1]]).astype(np.int64)
    before, after = begin < cut, begin + docs.length > cut
    head, tail = docs.take(before), docs.take(after)
    skip = np.maximum(cut - begin[after], 0)
    return (
        Documents(head.shard, head.start, np.minimum(head.length, cut - begin[before])),
        Documents(tail.shard, tail.start + skip, tail.length - skip),
    )


def _final_split(
    c: _Loaded, permille: int, eval_tokens: int, row_tokens: int
) -> tuple[Documents, Documents, str]:
    """The first split when it holds training documents (and eval ones, when wanted), else
    everything for training (no eval wanted) or the in-document split (module docstring)."""
    wanted = permille > 0 and eval_tokens > 0
    train, held, split = c.train, c.eval, c.split
    total = int(c.docs.length.sum())
    if not (len(train) and (len(held) or not wanted)):
        if wanted:
            if total < 4:
                _too_small(c, total, wanted)
            size = max(total * permille // 1000, min(eval_tokens, total // 2), 2)
            size = min(size, total - min(max(row_tokens, 2), total - 2))  # >= 2
            (train, held), split = _cut(c.docs, total - size), "in-document"
        else:
            train, held, split = c.docs, c.docs.take(slice(0, 0)), "none"
    if not (train.length >= 2).any():  # no training row holds a target
        _too_small(c, total, wanted)
    return train, held, split if len(held) else "none"


def _too_small(c: _Loaded, total: int, wanted: bool) -> NoReturn:
    listed = [f"{f} ({n})" for f, n in zip(c.files[:4], c.sizes[:4], strict=True)]
    if len(c.files) > 4:
        listed.append(f"... {len(c.files) - 4} more")
    raise UserError(
        f"config.data: the corpus is too small for one training row: {', '.join(listed)}: "
        f"{total} tokens in all; a training row needs 2 or more"
        + (" and the eval split 2 more (config.data.eval_permille=0: none)" if wanted else "")
    )


def _record_format(data_cfg) -> str:
    fmt = str(data_cfg.get("record_format", "text"))
    if fmt not in ("text", "tokens"):
        raise UserError(f"config.data.record_format={fmt!r} must be 'text' or 'tokens'")
    return fmt


def _text_sources(data_cfg, source: str) -> list[Path]:
    if source == "stdlib":
        files = stdlib_files()
        if int(data_cfg.max_files) > 0:
            files = files[: int(data_cfg.max_files)]
        return files
    if source == "text":
        return _paths(data_cfg, TEXT_SUFFIXES)
    return _paths(data_cfg, None)  # arrayrecord


def _iter_text_documents(source: str, files: list[Path]) -> Iterator[tuple[str, bytes]]:
    """(name, UTF-8 bytes) of each document; the name decides the eval split."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in files:
        if source == "arrayrecord":
            for i, rec in enumerate(_records(f)):
                yield f"{f}:{i}", rec
        else:
            yield (str(f.relative_to(root)) if source == "stdlib" else str(f)), _read(f)


def _storage_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def _text_corpus(data_cfg, source: str, tok: Tokenizer, permille: int) -> _Loaded:
    files = _text_sources(data_cfg, source)
    cache = _cache_path(data_cfg, tok, files)
    if cache is not None and os.path.exists(cache):
        with np.load(cache) as z:
            tokens, lengths, is_eval = z["tokens"], z["lengths"], z["is_eval"]
    else:
        tokens, lengths, is_eval = _tokenize(source, files, tok, permille)
        if cache is not None:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp.npz"  # processes may share the directory
            np.savez(tmp, tokens=tokens, lengths=lengths, is_eval=is_eval)
            os.replace(tmp, cache)
    if len(lengths) == 0:
        raise UserError(f"config.data: source {source!r} gave no text (all files are empty)")
    if permille > 0 and not is_eval.any() and len(lengths) > 1:
        is_eval = is_eval.copy()
        is_eval[-1] = True  # nothing hashed into eval: hold out the last document
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    docs = Documents(np.zeros(len(lengths), np.int32), starts, lengths.astype(np.int64))
    return _Loaded(
        [tokens], docs, docs.take(~is_eval), docs.take(is_eval), "documents",
        tok.vocab_size, tok.eos_id, tok, files, [_file_size(f) for f in files],
    )


def _file_size(path: Path) -> str:
    try:
        n = path.stat().st_size
    except OSError:
        return "size unknown"
    return f"{n} byte{'s' * (n != 1)}"


def _tokenize(source, files, tok, permille, chunk: int = 512):
    """Flat tokens (each document followed by EOS), document lengths, eval flags."""
    dtype = _storage_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype)
    parts: list[np.ndarray] = []
    lengths: list[int] = []
    is_eval: list[bool] = []
    names: list[str] = []
    raws: list[bytes] = []

    def flush():
        for name, ids in zip(names, tok.encode_batch(raws), strict=True):
            parts.extend([ids.astype(dtype), eos])
            lengths.append(len(ids) + 1)
            is_eval.append(zlib.crc32(name.encode()) % 1000 < permille)
        names.clear()
        raws.clear()

    for name, raw in _iter_text_documents(source, files):
        if raw:
            names.append(name)
            raws.append(raw)
            if len(raws) >= chunk:
                flush()
    flush()
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype)
    return tokens, np.asarray(lengths, np.int64), np.asarray(is_eval, bool)


def _cache_path(data_cfg, tok: Tokenizer, files: list[Path]) -> str | None:
    """Where the tokenized corpus is cached (tokenizer files only, when `cache_dir` is set)."""
    cache_dir = str(data_cfg.get("cache_dir", "") or "")
    if not cache_dir or isinstance(tok, ByteTokenizer):
        return None
    h = hashlib.sha256()
    st = os.stat(tok.path)
    key = [tok.path, st.st_size, st.st_mtime_ns, tok.eos_id, int(data_cfg.eval_permille)]
    h.update(json.dumps(key).encode())
    for f in files:
        st = os.stat(f)
        h.update(json.dumps([str(f), st.st_size, st.st_mtime_ns]).encode())
    return os.path.join(os.path.expanduser(cache_dir), f"tokens-{h.hexdigest()[:24]}.npz")


def _token_corpus(data_cfg, source: str, permille: int) -> _Loaded:
    dtype = _token_dtype(data_cfg)
    tok = None if str(data_cfg.tokenizer) == "byte" else make_tokenizer(
        data_cfg.tokenizer, str(data_cfg.get("eos_token", ""))
    )
    eos_id, vocab_size = data_cfg.eos_id, data_cfg.vocab_size
    if eos_id is not None and int(eos_id) < 0:
        raise UserError(f"config.data.eos_id={eos_id} must be >= 0 (None: the tokenizer "
                        "file's EOS, else no EOS)")
    if vocab_size is not None and int(vocab_size) < 1:
        raise UserError(f"config.data.vocab_size={vocab_size} must be >= 1 (None: the "
                        "tokenizer file's vocabulary, else max token + 1)")
    # eos = -1: no EOS token (documents end only at file/record ends).
    eos = int(eos_id) if eos_id is not None else (tok.eos_id if tok is not None else -1)
    # shards: token arrays; ends: extra document ends inside a shard (record ends).
    shards: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    files = _paths(data_cfg, (".bin", ".npy") if source == "bin" else None)
    for f in files:
        if source == "arrayrecord":
            recs = _records(f)
            if any(len(r) % dtype.itemsize for r in recs):
                raise UserError(
                    f"ArrayRecord file {str(f)!r}: a record's size is not a multiple of "
                    f"config.data.dtype={dtype.name!r} ({dtype.itemsize} bytes)"
                )
            arr = np.frombuffer(b"".join(recs), dtype)
            ends.append(np.cumsum([len(r) // dtype.itemsize for r in recs]))
        else:
            arr = _load_bin(f, dtype)
            ends.append(np.array([len(arr)], np.int64))
        shards.append(arr)
    max_tok, eos_pos = _scan(shards, eos)
    if vocab_size is not None:
        vocab = int(vocab_size)
    else:
        vocab = tok.vocab_size if tok is not None else max(max_tok, eos) + 1
    if max_tok >= vocab or eos >= vocab:
        raise UserError(
            f"config.data.vocab_size={vocab} is too small: the tokens go up to {max_tok}"
            + (f" and eos_id={eos}" if eos >= vocab else "")
        )
    total = sum(len(s) for s in shards)
    if total == 0:
        raise UserError(f"config.data.paths: source {source!r} holds no tokens")
    shard_ids, starts, lengths = [], [], []
    for k, arr in enumerate(shards):
        bounds = np.concatenate([eos_pos[k], ends[k]])
        bounds = np.unique(bounds[(bounds > 0) & (bounds <= len(arr))])
        if len(bounds) == 0:  # an empty file
            continue
        begin = np.concatenate([[0], bounds[:-1]])
        shard_ids.append(np.full(len(bounds), k, np.int32))
        starts.append(begin)
        lengths.append(bounds - begin)
    docs = Documents(
        np.concatenate(shard_ids), np.concatenate(starts).astype(np.int64),
        np.concatenate(lengths).astype(np.int64),
    )
    train, held = _cut(docs, total - total * permille // 1000)
    sizes = [f"{len(a)} token{'s' * (len(a) != 1)}" for a in shards]
    return _Loaded(shards, docs, train, held, "tokens", vocab, eos, tok, files, sizes)


def _load_bin(path: Path, dtype: np.dtype) -> np.ndarray:
    if not os.access(path, os.R_OK):
        raise UserError(f"cannot read data file {str(path)!r}")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r")
            if not np.issubdtype(arr.dtype, np.integer):
                raise UserError(f"data file {str(path)!r} holds {arr.dtype} values, not tokens")
            return arr.reshape(-1)
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise UserError(
                f"data file {str(path)!r} has {size} bytes, not a multiple of "
                f"config.data.dtype={dtype.name!r} ({dtype.itemsize} bytes)"
            )
        if size == 0:
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read data file {str(path)!r}: {e}") from e


def _scan(shards: list[np.ndarray], eos: int) -> tuple[int, list[np.ndarray]]:
    """Largest token, and per shard the positions just after each EOS (chunked)."""
    max_tok, eos_pos = -1, []
    for arr in shards:
        found = []
        for i in range(0, len(arr), _SCAN):
            part = np.asarray(arr[i : i + _SCAN])
            if part.min() < 0:
                raise UserError("the token files hold negative values: check config.data.dtype")
            max_tok = max(max_tok, int(part.max()))
            if eos >= 0:
                found.append(np.flatnonzero(part == eos) + (i + 1))
        eos_pos.append(np.concatenate(found) if found else np.zeros(0, np.int64))
    return max_tok, eos_pos


# ----------------------------------------------------------------------------- packing


@dataclasses.dataclass(frozen=True)
class Packing:
    """Row r holds pieces `row_ptr[r] : row_ptr[r+1]`; piece i is tokens
    `[offset[i], offset[i] + length[i])` of document `doc[i]`."""

    doc: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    row_ptr: np.ndarray

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1


def pack_documents(lengths: np.ndarray, width: int) -> Packing:
    """Greedy in-order packing of documents of `lengths` into rows of `width` tokens (the
    rules are in the module docstring). One Python iteration per document; the pieces of a
    long document are laid out vectorized."""
    if width < 2:
        raise UserError(f"config.data.seq_len={width - 1} must be >= 1")
    pending: tuple[list[int], ...] = ([], [], [], [])  # doc, offset, length, row
    blocks: list[tuple[np.ndarray, ...]] = []

    def flush():
        if pending[0]:
            blocks.append(tuple(np.asarray(c, np.int64) for c in pending))
            for c in pending:
                c.clear()

    row, used = 0, 0
    for d, n in enumerate(np.asarray(lengths, np.int64).tolist()):
        if n <= 0:
            continue
        if n > width - used and (n <= width or width - used < 2) and used:
            row, used = row + 1, 0  # start a new row
        if n <= width - used:
            for c, v in zip(pending, (d, 0, n, row), strict=True):
                c.append(v)
            used += n
            continue
        # Longer than the rest of the row: the first piece fills it, each further piece
        # (one row each) starts at the last token of the previous one.
        first = width - used
        rest = n - (first - 1)
        k = 1 if rest <= width else 1 + -(-(rest - width) // (width - 1))
        last = first - 1 + (width - 1) * (k - 1)
        if k <= 64:
            spans = [(0, first)] + [(s, min(width, n - s))
                                    for s in range(first - 1, last + 1, width - 1)]
            for j, (s, m) in enumerate(spans):
                for c, v in zip(pending, (d, s, m, row + j), strict=True):
                    c.append(v)
        else:
            starts = first - 1 + (width - 1) * np.arange(k, dtype=np.int64)
            flush()
            blocks.append((
                np.full(k + 1, d, np.int64),
                np.concatenate([[0], starts]),
                np.concatenate([[first], np.minimum(width, n - starts)]),
                row + np.arange(k + 1, dtype=np.int64),
            ))
        row, used = row + k, n - last
    flush()
    if not blocks:
        return Packing(*(np.zeros(0, np.int64),) * 3, np.zeros(1, np.int64))
    doc, offset, length, rows = (np.concatenate(col) for col in zip(*blocks, strict=True))
    row_ptr = np.searchsorted(rows, np.arange(row + 2), side="left")
    return Packing(doc, offset, length, row_ptr.astype(np.int64))


class PackedRows:
    """A Grain random-access source: row r -> `tokens`, `segment_ids`, `positions`
    (int32 `[width]`) of the packed documents."""

    def __init__(self, shards: list[np.ndarray], docs: Documents, width: int):
        self.shards, self.docs, self.width = shards, docs, width
        self.packing = pack_documents(docs.length, width)

    def __len__(self) -> int:
        return self.packing.num_rows

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        p, d, w = self.packing, self.docs, self.width
        tokens = np.zeros(w, np.int32)
        segment_ids = np.zeros(w, np.int32)
        positions = np.zeros(w, np.int32)
        at = 0
        for seg, i in enumerate(range(p.row_ptr[r], p.row_ptr[r + 1]), start=1):
            doc, n = p.doc[i], int(p.length[i])
            start = d.start[doc] + p.offset[i]
            tokens[at : at + n] = self.shards[d.shard[doc]][start : start + n]
            segment_ids[at : at + n] = seg
            positions[at : at + n] = np.arange(n)
            at += n
        return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

    def fill(self) -> float:
        """Fraction of row slots holding tokens (the rest is padding)."""
        return float(self.packing.length.sum()) / max(len(self) * self.width, 1)


def to_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row -> `inputs`, `targets`, `positions`, `segment_ids` (int32) and `mask`
    (float32), each `[width - 1]`."""
    seg = row["segment_ids"]
    return {
        "inputs": row["tokens"][:-1],
        "targets": row["tokens"][1:],
        "positions": row["positions"][:-1],
        "segment_ids": seg[:-1],
        "mask": ((seg[:-1] != 0) & (seg[1:] == seg[:-1])).astype(np.float32),
    }


# ----------------------------------------------------------------------------- pipeline


class DataPipeline:
    """Packed, shuffled, process-local batches as a pure function of (seed, step).

    `batch(step)` and `eval_batches(n)` return numpy dicts (`inputs`, `targets`,
    `positions`, `segment_ids`, `mask`, each `[global_batch / process_count, seq_len]`)
    holding rows `[process_index * B/P, (process_index + 1) * B/P)` of the global batch.

    `eval_batches`: how many eval batches the caller will ask for (0: none, so no eval split
    is needed; None: one). It only matters where the split goes inside the documents (see
    the module docstring), which then holds out enough tokens for them (at most half).
    """

    def __init__(
        self,
        data_cfg,
        seq_len: int,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        eval_batches: int | None = None,
    ):
        seq_len, global_batch = int(seq_len), int(global_batch)
        if seq_len < 1:
            raise UserError(f"config.data.seq_len={seq_len} must be >= 1")
        if global_batch < 1 or global_batch % process_count:
            raise UserError(
                f"config.data.batch_size={global_batch} must be a positive multiple of the "
                f"number of processes ({process_count})"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, int(seed)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch = global_batch // process_count
        self.source = str(data_cfg.source)
        n_eval = 1 if eval_batches is None else max(int(eval_batches), 0)
        # n_eval batches of global_batch rows; a long piece fills a row per seq_len tokens.
        eval_tokens = n_eval * global_batch * seq_len + 1 if n_eval else 0
        self.corpus = corpus = load_corpus(data_cfg, eval_tokens, seq_len + 1)
        self.tokenizer = corpus.tokenizer
        self.vocab_size, self.eos_id = corpus.vocab_size, corpus.eos_id
        self.train_rows = PackedRows(corpus.shards, corpus.train, seq_len + 1)
        self.eval_rows = PackedRows(corpus.shards, corpus.eval, seq_len + 1)
        self.eval_permille = int(data_cfg.eval_permille)
        if len(self.train_rows) == 0:  # load_corpus checks this: kept as a guard
            raise UserError(f"config.data: source {self.source!r} gave no training tokens")
        self._train = (
            grain.MapDataset.source(self.train_rows)
            .shuffle(seed=self.seed % 2**32)
            .repeat(None)
            .map(to_example)
            .batch(self.local_batch, drop_remainder=True)
        )

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch for `step`."""
        return self._train[int(step) * self.process_count + self.process_index]

    def batches(self, start_step: int = 0, prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
        """`batch(start_step)`, `batch(start_step + 1)`, ... built ahead in Grain threads."""
        ds = self._train.slice(
            slice(int(start_step) * self.process_count + self.process_index, None,
                  self.process_count)
        )
        opts = grain.ReadOptions(num_threads=max(prefetch, 1), prefetch_buffer_size=prefetch)
        return iter(ds.to_iter_dataset(opts))

    def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
        """The first `n` batches of the eval rows in order (fewer when the split has fewer
        rows; rows are reused when it has less than one batch): the same on every call.
        `n <= 0`: none (never an error); `n > 0` with an empty eval split: a `UserError`."""
        if int(n) <= 0:
            return []
        rows = len(self.eval_rows)
        if rows == 0:
            if self.eval_permille == 0:
                raise UserError("the eval split is empty: raise config.data.eval_permille")
            raise UserError("the eval split is empty: the data pipeline was built with "
                            "eval_batches=0 (no eval split wanted)")
        n = min(int(n), max(1, rows // self.global_batch))
        ds = (
            grain.MapDataset.source(self.eval_rows)
            .repeat(None)
            .map(to_example)
            .batch(self.local_batch, drop_remainder=True)
        )
        return [ds[i * self.process_count + self.process_index] for i in range(n)]

    def summary(self) -> str:
        """One line for the run log."""
        c = self.corpus
        return (
            f"data: {self.source}, {len(c.train)} train / {len(c.eval)} eval documents, "
            f"{int(c.train.length.sum()):,} train tokens in {len(self.train_rows):,} rows of "
            f"{self.seq_len + 1} ({self.train_rows.fill():.0%} filled), vocab "
            f"{self.vocab_size}, eos {self.eos_id}"
            + (f"; eval: the last {int(c.eval.length.sum()):,} tokens (inside the documents)"
               if c.split == "in-document" else "")
        )

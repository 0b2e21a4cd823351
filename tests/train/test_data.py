"""train.data: packing (by hand, every token a target once, attention never crosses
documents in a real model), determinism and process splits, each source (stdlib, text,
bin/npy, arrayrecord text and tokens), HF and SentencePiece tokenizers, the tokenized-corpus
cache, the error paths, and corpora whose split goes inside the documents (one file, every
document held out): they train, end to end too, on rows disjoint from the eval rows."""

import io
import json
import pathlib
import subprocess
import sys
import sysconfig
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from tokenizers import Tokenizer

from configs import base
from model import ModelConfig, Transformer
from train import data as data_lib
from train import tokenizers as tok_lib
from train.data import DataPipeline, Documents, PackedRows, pack_documents, to_example
from train.errors import UserError


def _cfg(**kw):
    c = base.get_config().data
    c.update(kw)
    return c


def _write_docs(tmp_path, texts, suffix=".txt"):
    d = tmp_path / "docs"
    d.mkdir(exist_ok=True)
    paths = []
    for i, t in enumerate(texts):
        p = d / f"doc{i:02d}{suffix}"
        p.write_text(t)
        paths.append(p)
    return d, paths


def _pieces(rows):
    """Token lists of every (row, segment) of a PackedRows, in row order."""
    out = []
    for r in range(len(rows)):
        row = rows[r]
        for s in range(1, int(row["segment_ids"].max()) + 1):
            out.append(row["tokens"][row["segment_ids"] == s].tolist())
    return out


def _texts(pipe, rows):
    """Decoded documents (EOS dropped) of rows holding whole documents."""
    return sorted(pipe.tokenizer.decode([t for t in p if t != pipe.eos_id]) for p in _pieces(rows))


# ----------------------------------------------------------------------------- packing


def test_pack_documents_by_hand():
    # width 5: [3, 2] fill row 0; 7 starts row 1 (row 0 is full) and continues in row 2 from
    # its token 4; 12 fills the 2 slots left in row 2, then rows 3, 4, 5 (each continuation
    # starts at the previous piece's last token); 1 joins row 5; 4 does not fit: row 6.
    p = pack_documents(np.array([3, 2, 7, 12, 1, 4]), 5)
    rows = [
        [(int(p.doc[i]), int(p.offset[i]), int(p.length[i]))
         for i in range(p.row_ptr[r], p.row_ptr[r + 1])]
        for r in range(p.num_rows)
    ]
    assert rows == [
        [(0, 0, 3), (1, 0, 2)],
        [(2, 0, 5)],
        [(2, 4, 3), (3, 0, 2)],
        [(3, 1, 5)],
        [(3, 5, 5)],
        [(3, 9, 3), (4, 0, 1)],
        [(5, 0, 4)],
    ]


def test_row_values_by_hand():
    eos = 9
    docs_tokens = [[1, 2, eos], [3, 4, 5, eos], [6, 7, 8, 6, 7, 8, 6, eos]]
    flat = np.array(sum(docs_tokens, []), np.uint16)
    lengths = np.array([len(d) for d in docs_tokens])
    docs = Documents(np.zeros(3, np.int32), np.concatenate([[0], np.cumsum(lengths)[:-1]]),
                     lengths)
    rows = PackedRows([flat], docs, width=6)
    assert len(rows) == 4
    want = [  # tokens, segment_ids, positions, mask of the example
        ([1, 2, 9, 0, 0, 0], [1, 1, 1, 0, 0, 0], [0, 1, 2, 0, 0, 0], [1, 1, 0, 0, 0]),
        ([3, 4, 5, 9, 6, 7], [1, 1, 1, 1, 2, 2], [0, 1, 2, 3, 0, 1], [1, 1, 1, 0, 1]),
        ([7, 8, 6, 7, 8, 6], [1, 1, 1, 1, 1, 1], [0, 1, 2, 3, 4, 5], [1, 1, 1, 1, 1]),
        ([6, 9, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0]),
    ]
    for r, (tokens, seg, pos, mask) in enumerate(want):
        row = rows[r]
        np.testing.assert_array_equal(row["tokens"], tokens)
        np.testing.assert_array_equal(row["segment_ids"], seg)
        np.testing.assert_array_equal(row["positions"], pos)
        ex = to_example(row)
        np.testing.assert_array_equal(ex["inputs"], tokens[:-1])
        np.testing.assert_array_equal(ex["targets"], tokens[1:])
        np.testing.assert_array_equal(ex["positions"], pos[:-1])
        np.testing.assert_array_equal(ex["segment_ids"], seg[:-1])
        np.testing.assert_array_equal(ex["mask"], mask)
        assert ex["mask"].dtype == np.float32 and ex["inputs"].dtype == np.int32


@pytest.mark.parametrize("width", [2, 3, 7, 16])
def test_every_token_but_the_first_is_a_target_exactly_once(width):
    rng = np.random.default_rng(width)
    lengths = rng.integers(1, 3 * width, size=40)
    lengths[[5, 20]] = 100 * width + 1  # long documents (laid out vectorized)
    flat = rng.integers(1, 1000, size=int(lengths.sum())).astype(np.int32)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    docs = Documents(np.zeros(len(lengths), np.int32), starts, lengths)
    rows = PackedRows([flat], docs, width)
    # Masked targets, read row by row, are each document minus its first token, in order.
    got = []
    for r in range(len(rows)):
        row = rows[r]
        ex = to_example(row)
        assert (row["positions"] < width).all()
        got.extend(ex["targets"][ex["mask"] == 1].tolist())
    want = sum((flat[s + 1 : s + n].tolist() for s, n in zip(starts, lengths, strict=True)), [])
    assert got == want
    assert rows.fill() > 0.5


def test_packed_attention_never_crosses_documents(tmp_path):
    """A real packed batch through a 1-layer Transformer: the logits of every document equal
    those of the document run alone from position 0."""
    texts = ["def f(x):\n    return x", "import os", "hello world", "a = [1, 2, 3]",
             "print('packed')", "class A: pass", "x += 1", "while True: break"]
    d, _ = _write_docs(tmp_path, texts)
    pipe = DataPipeline(_cfg(source="text", paths=(str(d),), eval_permille=0), 32, 4, seed=0)
    batch = pipe.batch(0)
    cfg = ModelConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, ffn_dim=64,
                      max_seq_len=64)
    model = Transformer(cfg)
    variables = _random_variables(model)
    segs = [(r, s) for r in range(4) for s in range(1, int(batch["segment_ids"][r].max()) + 1)]
    assert len(segs) > 4, "the batch should pack several documents per row"
    # Each document alone from position 0, padded at the end (causality keeps padding out).
    alone = np.zeros((len(segs), 32), np.int32)
    for i, (r, s) in enumerate(segs):
        tok = batch["inputs"][r][batch["segment_ids"][r] == s]
        alone[i, : len(tok)] = tok
    arange = np.broadcast_to(np.arange(32, dtype=np.int32), alone.shape)
    ones = np.ones_like(batch["inputs"])
    # One forward: packed rows, the documents alone, packed rows with a single segment.
    logits = np.asarray(_forward(model)(
        variables,
        np.concatenate([batch["inputs"], alone, batch["inputs"]]),
        np.concatenate([batch["positions"], arange, batch["positions"]]),
        np.concatenate([batch["segment_ids"], np.ones_like(alone), ones]),
    ))
    packed, single, mixed = logits[:4], logits[4:-4], logits[-4:]
    crossed = 0.0
    for i, (r, s) in enumerate(segs):
        where = batch["segment_ids"][r] == s
        n = int(where.sum())
        np.testing.assert_allclose(packed[r][where], single[i, :n], rtol=1e-5, atol=1e-5)
        crossed = max(crossed, np.abs(mixed[r][where] - single[i, :n]).max())
    # Without segment ids later documents would see earlier ones (the check is not vacuous).
    assert crossed > 1e-3


def _random_variables(model, gain=1.5):
    """Parameters far from uniform attention (init std 0.02 would hide mask bugs), built from
    the abstract shapes without compiling the initializers."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(0)

    def fill(leaf):
        if leaf.ndim == 1:
            return jnp.asarray(1 + 0.2 * rng.standard_normal(leaf.shape), leaf.dtype)
        return jnp.asarray(gain * rng.standard_normal(leaf.shape) / np.sqrt(leaf.shape[-2]),
                           leaf.dtype)

    return jax.tree.map(fill, abstract)


def _forward(model):
    fast = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    return jax.jit(lambda v, t, p, s: model.apply(v, t, p, s)[0], compiler_options=fast)


# ----------------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def stdlib_cfg():
    return _cfg(source="stdlib", max_files=30, eval_permille=100)


def test_batch_is_a_pure_function_of_seed_and_step(stdlib_cfg):
    a = DataPipeline(stdlib_cfg, 32, 8, seed=0)
    b = DataPipeline(stdlib_cfg, 32, 8, seed=0)
    c = DataPipeline(stdlib_cfg, 32, 8, seed=1)
    for step in (0, 7, 123456):
        for k, v in a.batch(step).items():
            np.testing.assert_array_equal(v, b.batch(step)[k])
    assert not np.array_equal(a.batch(0)["inputs"], a.batch(1)["inputs"])
    assert not np.array_equal(a.batch(0)["inputs"], c.batch(0)["inputs"])
    x = a.batch(3)
    assert set(x) == {"inputs", "targets", "positions", "segment_ids", "mask"}
    assert all(v.shape == (8, 32) for v in x.values())
    # The prefetching iterator yields the same batches.
    it = a.batches(start_step=5)
    for step in (5, 6, 7):
        np.testing.assert_array_equal(next(it)["inputs"], a.batch(step)["inputs"])


@pytest.mark.parametrize("processes", [2, 4])
def test_process_batches_concatenate_to_the_global_batch(stdlib_cfg, processes):
    one = DataPipeline(stdlib_cfg, 32, 8, seed=3)
    parts = [DataPipeline(stdlib_cfg, 32, 8, seed=3, process_index=p, process_count=processes)
             for p in range(processes)]
    for step in (0, 1, 50):
        local = [p.batch(step) for p in parts]
        assert local[0]["inputs"].shape == (8 // processes, 32)
        for k, v in one.batch(step).items():
            np.testing.assert_array_equal(np.concatenate([x[k] for x in local]), v)
    evals = [p.eval_batches(2) for p in parts]
    for i, full in enumerate(one.eval_batches(2)):
        for k, v in full.items():
            np.testing.assert_array_equal(np.concatenate([e[i][k] for e in evals]), v)


def test_each_epoch_visits_every_row_once(tmp_path):
    d, _ = _write_docs(tmp_path, [f"document number {i} " * (i + 1) for i in range(6)])
    pipe = DataPipeline(_cfg(source="text", paths=(str(d),), eval_permille=0), 15, 1, seed=5)
    n = len(pipe.train_rows)
    all_rows = sorted(to_example(pipe.train_rows[r])["inputs"].tobytes() for r in range(n))
    epoch1 = [pipe.batch(s)["inputs"][0].tobytes() for s in range(n)]
    epoch2 = [pipe.batch(s)["inputs"][0].tobytes() for s in range(n, 2 * n)]
    assert sorted(epoch1) == all_rows and sorted(epoch2) == all_rows
    assert epoch1 != epoch2  # reshuffled each epoch


def test_eval_batches_are_fixed_and_held_out(stdlib_cfg):
    pipe = DataPipeline(stdlib_cfg, 32, 8, seed=0)
    a, b = pipe.eval_batches(3), pipe.eval_batches(3)
    assert len(a) == 3
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    # The eval documents are the files whose name hashes below eval_permille.
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = data_lib.stdlib_files()[:30]
    want = sorted(f.read_bytes() for f in files
                  if zlib.crc32(str(f.relative_to(root)).encode()) % 1000 < 100)
    c = pipe.corpus
    got = sorted(bytes(c.shards[0][s : s + n - 1].astype(np.uint8))
                 for s, n in zip(c.eval.start, c.eval.length, strict=True))
    assert 0 < len(got) == len(want) < len(files) and got == want


# ----------------------------------------------------------------------------- sources


def test_stdlib_default_corpus_is_fast():
    t0 = time.perf_counter()
    pipe = DataPipeline(base.get_config().data, 128, 16, seed=0)
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, f"tokenizing the standard library took {elapsed:.1f}s"
    assert (pipe.vocab_size, pipe.eos_id) == (257, 256)
    assert isinstance(pipe.tokenizer, tok_lib.ByteTokenizer)
    assert len(pipe.corpus.train) > 500 and len(pipe.corpus.eval) > 0
    b = pipe.batch(0)
    assert b["inputs"].max() <= 256 and b["mask"].mean() > 0.9
    assert "stdlib" in pipe.summary()


def test_text_source_files_dirs_globs_and_eval_split(tmp_path):
    texts = [f"text document {i}\n" + "ü" * i for i in range(12)]
    d, paths = _write_docs(tmp_path, texts)
    (d / "skipped.bin").write_bytes(b"\x00\x01")  # not a text suffix: skipped in directories
    extra = tmp_path / "extra.log"
    extra.write_text("named explicitly")
    globbed = tmp_path / "g"
    globbed.mkdir()
    (globbed / "one.csv").write_text("a,b")
    cfg = _cfg(source="text", paths=(str(d), str(extra), str(globbed / "*.csv")),
               eval_permille=500)
    pipe = DataPipeline(cfg, 64, 2, seed=0)
    every = texts + ["named explicitly", "a,b"]
    names = [str(p) for p in paths] + [str(extra), str(globbed / "one.csv")]
    held = sorted(t for t, n in zip(every, names, strict=True)
                  if zlib.crc32(n.encode()) % 1000 < 500)
    assert 0 < len(held) < len(every)
    assert _texts(pipe, pipe.eval_rows) == held
    assert _texts(pipe, pipe.train_rows) == sorted(set(every) - set(held))


def test_bin_and_npy_token_files(tmp_path):
    eos = 1
    (tmp_path / "a.bin").write_bytes(np.array([5, 6, eos, 7, 8, 9, eos, 10], np.uint16).tobytes())
    np.save(tmp_path / "b.npy", np.array([11, 12, eos, 13], np.int32))
    paths = (str(tmp_path / "a.bin"), str(tmp_path / "b.npy"))
    pipe = DataPipeline(_cfg(source="bin", paths=paths, eos_id=eos, eval_permille=0), 6, 1, 0)
    # Documents end after each EOS and at each file end.
    assert _pieces(pipe.train_rows) == [[5, 6, 1], [7, 8, 9, 1], [10], [11, 12, 1], [13]]
    assert (pipe.vocab_size, pipe.eos_id, pipe.tokenizer) == (14, eos, None)
    # The last 250 permille of the 12 tokens (3) are the eval split.
    pipe = DataPipeline(_cfg(source="bin", paths=paths, eos_id=eos, eval_permille=250), 6, 1, 0)
    assert _pieces(pipe.train_rows) == [[5, 6, 1], [7, 8, 9, 1], [10], [11]]
    assert _pieces(pipe.eval_rows) == [[12, 1], [13]]
    # uint32 files, given vocabulary, no EOS: a file is one document.
    (tmp_path / "c.bin").write_bytes(np.arange(70000, 70010, dtype=np.uint32).tobytes())
    pipe = DataPipeline(_cfg(source="bin", paths=(str(tmp_path / "c.bin"),), dtype="uint32",
                             vocab_size=80000, eval_permille=0), 4, 1, 0)
    assert _pieces(pipe.train_rows) == [[70000 + i for i in r] for r in
                                        ([0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9])]
    assert pipe.vocab_size == 80000 and pipe.batch(0)["inputs"].max() >= 70000


def _write_array_record(path, records):
    w = ArrayRecordWriter(str(path), "group_size:1")
    for r in records:
        w.write(r)
    w.close()


def test_arrayrecord_text_records(tmp_path):
    texts = ["alpha beta", "gamma", "délta épsilon"]
    _write_array_record(tmp_path / "t.array_record", [t.encode() for t in texts])
    cfg = _cfg(source="arrayrecord", paths=(str(tmp_path / "*.array_record"),), eval_permille=0)
    pipe = DataPipeline(cfg, 16, 2, seed=0)
    assert _texts(pipe, pipe.train_rows) == sorted(texts)
    assert pipe.batch(0)["inputs"].shape == (2, 16)


def test_arrayrecord_token_records(tmp_path):
    recs = [np.array([1, 2, 3], np.uint32), np.array([4, 5], np.uint32)]
    _write_array_record(tmp_path / "t.array_record", [r.tobytes() for r in recs])
    cfg = _cfg(source="arrayrecord", record_format="tokens", dtype="uint32",
               paths=(str(tmp_path / "t.array_record"),), eval_permille=0)
    pipe = DataPipeline(cfg, 8, 1, seed=0)
    assert _pieces(pipe.train_rows) == [[1, 2, 3], [4, 5]]  # a record is a document
    assert pipe.vocab_size == 6


# ----------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def build(specials):
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(["hello world", "the quick brown fox", "def f(x): return x"],
                                trainer=trainer)
        return tok

    d = tmp_path_factory.mktemp("hf")
    build(["<pad>", "<|endoftext|>"]).save(str(d / "tokenizer.json"))
    build(["<pad>"]).save(str(d / "no_eos.json"))
    return d


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm

    buf = io.BytesIO()
    sents = ["hello world", "the quick brown fox jumps over the lazy dog",
             "a tiny sentencepiece model"] * 10
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sents), model_writer=buf,
                                   vocab_size=60, model_type="bpe", minloglevel=2,
                                   num_threads=1)
    path = tmp_path_factory.mktemp("sp") / "sp.model"
    path.write_bytes(buf.getvalue())
    return path


def test_byte_tokenizer_round_trip():
    tok = tok_lib.make_tokenizer("byte")
    ids = tok.encode("héllo\n")
    assert ids.tolist() == list("héllo\n".encode()) and tok.decode(ids) == "héllo\n"
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.decode([104, 256, 105]) == "hi"
    assert data_lib.ByteTokenizer is tok_lib.ByteTokenizer


def test_hf_tokenizer_round_trip_and_eos(hf_json, tmp_path):
    tok = tok_lib.make_tokenizer(str(hf_json / "tokenizer.json"))
    s = "hello world, the quick fox!\n\tdef f(x): return x  # ünïcode"
    assert tok.decode(tok.encode(s)) == s
    assert tok.eos_id == 1
    assert tok.vocab_size == Tokenizer.from_file(str(hf_json / "tokenizer.json")).get_vocab_size()
    assert tok_lib.make_tokenizer(str(hf_json)).eos_id == 1  # a directory holding it
    assert tok_lib.make_tokenizer(str(hf_json / "no_eos.json"), eos_token="<pad>").eos_id == 0
    texts = ["hello world", "the quick brown fox", "return x"]
    d, _ = _write_docs(tmp_path, texts)
    cfg = _cfg(source="text", paths=(str(d),), tokenizer=str(hf_json / "tokenizer.json"),
               eval_permille=0)
    pipe = DataPipeline(cfg, 16, 2, seed=0)
    assert (pipe.vocab_size, pipe.eos_id) == (tok.vocab_size, 1)
    assert _texts(pipe, pipe.train_rows) == sorted(texts)


def test_sentencepiece_round_trip_and_eos(sp_model, tmp_path):
    tok = tok_lib.make_tokenizer(str(sp_model))
    s = "the lazy fox jumps over a tiny world"
    assert tok.decode(tok.encode(s)) == s
    assert tok.vocab_size == 60 and tok.eos_id == 2
    assert tok_lib.make_tokenizer(str(sp_model), eos_token="<s>").eos_id == 1
    texts = ["hello world", "the quick brown fox"]
    d, _ = _write_docs(tmp_path, texts)
    cfg = _cfg(source="text", paths=(str(d),), tokenizer=str(sp_model), eval_permille=0)
    pipe = DataPipeline(cfg, 16, 2, seed=0)
    assert (pipe.vocab_size, pipe.eos_id) == (60, 2)
    assert _texts(pipe, pipe.train_rows) == sorted(texts)


def test_tokenized_corpus_cache(hf_json, tmp_path, monkeypatch):
    d, _ = _write_docs(tmp_path, ["hello world", "the quick brown fox"])
    cfg = _cfg(source="text", paths=(str(d),), tokenizer=str(hf_json / "tokenizer.json"),
               cache_dir=str(tmp_path / "cache"), eval_permille=0)
    first = DataPipeline(cfg, 8, 2, seed=0).batch(0)
    assert len(list((tmp_path / "cache").glob("tokens-*.npz"))) == 1

    def fail(self, texts):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(tok_lib.HFTokenizer, "encode_batch", fail)
    second = DataPipeline(cfg, 8, 2, seed=0).batch(0)
    for k, v in first.items():
        np.testing.assert_array_equal(v, second[k])


# ----------------------------------------------------------------------------- errors


def _error_cases(tmp: pathlib.Path, hf: pathlib.Path):
    (tmp / "odd.bin").write_bytes(b"\x01\x02\x03")
    (tmp / "ok.bin").write_bytes(np.array([1, 2, 3], np.uint16).tobytes())
    (tmp / "bad.json").write_text("{not json")
    (tmp / "vocab.txt").write_text("x")
    (tmp / "empty").mkdir(exist_ok=True)
    (tmp / "empty.array_record").write_bytes(b"")
    missing = str(tmp / "missing.txt")
    return {
        "missing path": (dict(source="text", paths=(missing,)), ["config.data.paths", missing]),
        "empty glob": (dict(source="text", paths=(str(tmp / "*.nothing"),)), ["*.nothing"]),
        "empty dir": (dict(source="text", paths=(str(tmp / "empty"),)), ["empty"]),
        "no paths": (dict(source="bin"), ["config.data.paths"]),
        "bad source": (dict(source="nowhere"), ["config.data.source", "nowhere"]),
        "bad dtype": (dict(source="bin", paths=(str(tmp / "ok.bin"),), dtype="float32"),
                      ["config.data.dtype", "float32"]),
        "odd bin size": (dict(source="bin", paths=(str(tmp / "odd.bin"),)),
                         ["odd.bin", "config.data.dtype"]),
        "vocab too small": (dict(source="bin", paths=(str(tmp / "ok.bin"),), vocab_size=2),
                            ["config.data.vocab_size"]),
        "zero vocab": (dict(source="bin", paths=(str(tmp / "ok.bin"),), vocab_size=0),
                       ["config.data.vocab_size=0", "None"]),
        "negative eos": (dict(source="bin", paths=(str(tmp / "ok.bin"),), eos_id=-1),
                         ["config.data.eos_id=-1", "None"]),
        "missing tokenizer": (dict(tokenizer=str(tmp / "tok.json")),
                              ["config.data.tokenizer", "tok.json"]),
        "bad tokenizer file": (dict(tokenizer=str(tmp / "bad.json")), ["bad.json"]),
        "unknown tokenizer kind": (dict(tokenizer=str(tmp / "vocab.txt")),
                                   ["config.data.tokenizer", "vocab.txt"]),
        "eos not in vocab": (dict(tokenizer=str(hf / "tokenizer.json"), eos_token="<nope>"),
                             ["config.data.eos_token", "<nope>"]),
        "tokenizer without eos": (dict(tokenizer=str(hf / "no_eos.json")),
                                  ["config.data.eos_token", "no_eos.json"]),
        "empty arrayrecord": (dict(source="arrayrecord", paths=(str(tmp / "empty.array_record"),)),
                              ["empty.array_record"]),
        "bad record format": (dict(source="arrayrecord", paths=(str(tmp / "ok.bin"),),
                                   record_format="json"), ["config.data.record_format"]),
    }


ERROR_CASES = [
    "missing path", "empty glob", "empty dir", "no paths", "bad source", "bad dtype",
    "odd bin size", "vocab too small", "zero vocab", "negative eos", "missing tokenizer",
    "bad tokenizer file", "unknown tokenizer kind", "eos not in vocab", "tokenizer without eos",
    "empty arrayrecord", "bad record format",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_user_errors_name_the_key_or_path(tmp_path, hf_json, case):
    cases = _error_cases(tmp_path, hf_json)
    assert sorted(cases) == sorted(ERROR_CASES)
    kw, needles = cases[case]
    with pytest.raises(UserError) as e:
        DataPipeline(_cfg(max_files=5, **kw), 16, 2, seed=0)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_unreadable_file_is_a_user_error(tmp_path, monkeypatch):
    d, paths = _write_docs(tmp_path, ["fine", "locked"])
    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if self == paths[1]:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)
    with pytest.raises(UserError, match="doc01.txt.*Permission denied"):
        DataPipeline(_cfg(source="text", paths=(str(d),)), 16, 2, seed=0)


def test_batch_and_eval_errors(stdlib_cfg, tmp_path):
    with pytest.raises(UserError, match="config.data.batch_size"):
        DataPipeline(stdlib_cfg, 32, 6, seed=0, process_count=4)
    stdlib_cfg = _cfg(source="stdlib", max_files=30, eval_permille=0)
    pipe = DataPipeline(stdlib_cfg, 32, 8, seed=0)
    with pytest.raises(UserError, match="config.data.eval_permille"):
        pipe.eval_batches(1)
    assert pipe.eval_batches(0) == []  # asking for none is never an error
    # Built wanting no eval split, a single file has none; asking for one says why.
    pipe = DataPipeline(_cfg(source="text", paths=(str(_one_file(tmp_path)),)), 32, 8, seed=0,
                        eval_batches=0)
    with pytest.raises(UserError, match="eval_batches=0"):
        pipe.eval_batches(1)


# ----------------------------------------------------------------------------- one document


def _one_file(tmp_path, lines=200):
    """One text file of distinct lines (a single document)."""
    p = tmp_path / "one.txt"
    p.write_text("".join(f"line {i:05d} of the only file\n" for i in range(lines)))
    return p


def _targets(rows):
    """The masked targets of every row, in row order."""
    out = []
    for r in range(len(rows)):
        ex = to_example(rows[r])
        out.extend(ex["targets"][ex["mask"] == 1].tolist())
    return out


@pytest.mark.parametrize("eval_batches", [None, 0, 1, 4])
def test_single_file_corpus_trains(tmp_path, eval_batches):
    path = _one_file(tmp_path)
    cfg = _cfg(source="text", paths=(str(path),))  # the default eval_permille (20)
    pipe = DataPipeline(cfg, 32, 8, seed=0, eval_batches=eval_batches)
    b = pipe.batch(0)
    assert b["inputs"].shape == (8, 32) and b["mask"].sum() > 0
    total = path.stat().st_size + 1  # bytes + EOS
    c = pipe.corpus
    if eval_batches == 0:  # no eval split wanted: the whole file trains
        assert c.split == "none" and len(c.eval) == 0
        assert int(c.train.length.sum()) == total
        assert pipe.eval_batches(0) == []
        return
    n = 1 if eval_batches is None else eval_batches
    held = max(total * 20 // 1000, min(n * 8 * 32 + 1, total // 2), 2)
    assert c.split == "in-document" and int(c.eval.length.sum()) == held
    assert int(c.train.length.sum()) == total - held
    assert "inside the documents" in pipe.summary()
    evals = pipe.eval_batches(n)
    assert len(evals) == n  # enough held out for the batches asked for
    again = DataPipeline(cfg, 32, 8, seed=0, eval_batches=eval_batches)  # deterministic
    np.testing.assert_array_equal(again.eval_batches(n)[-1]["inputs"], evals[-1]["inputs"])
    np.testing.assert_array_equal(again.batch(5)["inputs"], pipe.batch(5)["inputs"])


def test_eval_split_inside_a_document_is_disjoint_from_training_rows(tmp_path):
    path = _one_file(tmp_path, lines=400)
    raw = list(path.read_bytes()) + [256]
    pipe = DataPipeline(_cfg(source="text", paths=(str(path),), eval_permille=100), 16, 4,
                        seed=0, eval_batches=2)
    cut = len(raw) - len(raw) * 100 // 1000  # 10% > 2 batches of 4 rows: the permille wins
    c = pipe.corpus
    assert (c.train.start.tolist(), c.train.length.tolist()) == ([0], [cut])
    assert (c.eval.start.tolist(), c.eval.length.tolist()) == ([cut], [len(raw) - cut])
    # Every token but a piece's first is a target exactly once: the training rows predict
    # tokens [1, cut), the eval rows [cut + 1, end); none is both.
    assert _targets(pipe.train_rows) == raw[1:cut]
    assert _targets(pipe.eval_rows) == raw[cut + 1 :]
    train_inputs = {t.tobytes() for s in range(len(pipe.train_rows))
                    for t in pipe.batch(s)["inputs"]}
    for e in pipe.eval_batches(2):
        assert not train_inputs & {t.tobytes() for t in e["inputs"]}


def test_one_long_document_and_every_document_held_out(tmp_path):
    # A single long document (much longer than a row) with eval_permille=1000 keeps a row.
    path = _one_file(tmp_path, lines=50)
    pipe = DataPipeline(_cfg(source="text", paths=(str(path),), eval_permille=1000), 32, 2,
                        seed=0, eval_batches=1)
    assert int(pipe.corpus.train.length.sum()) == 33 and len(pipe.train_rows) == 1
    assert pipe.batch(0)["mask"].sum() > 0 and len(pipe.eval_batches(1)) == 1
    # Several documents that all hash into eval: the split goes inside them too.
    d, _ = _write_docs(tmp_path, [f"document {i} " * 20 for i in range(3)])
    pipe = DataPipeline(_cfg(source="text", paths=(str(d),), eval_permille=1000), 16, 2, seed=0)
    assert pipe.corpus.split == "in-document" and len(pipe.train_rows) >= 1
    assert _targets(pipe.train_rows) and pipe.eval_batches(1)
    # A token file whose permille share rounds to no token: the split moves inside it too.
    (tmp_path / "t.bin").write_bytes(np.arange(1, 41, dtype=np.uint16).tobytes())
    pipe = DataPipeline(_cfg(source="bin", paths=(str(tmp_path / "t.bin"),), eval_permille=20),
                        8, 1, seed=0)
    assert _pieces(pipe.eval_rows) == [list(range(32, 41))]  # min(1 * 1 * 8 + 1, 40 // 2)
    assert sum(_pieces(pipe.train_rows), [])[-1] == 31


def test_multi_document_split_does_not_depend_on_eval_batches(tmp_path, stdlib_cfg):
    d, _ = _write_docs(tmp_path, [f"text document {i}\n" * (i + 1) for i in range(12)])
    for cfg in (stdlib_cfg, _cfg(source="text", paths=(str(d),), eval_permille=100)):
        pipes = [DataPipeline(cfg, 32, 4, seed=0, eval_batches=n) for n in (None, 0, 4)]
        for p in pipes:
            assert p.corpus.split == "documents" and len(p.corpus.eval) > 0
            for k in ("start", "length"):
                np.testing.assert_array_equal(getattr(p.corpus.train, k),
                                              getattr(pipes[0].corpus.train, k))
                np.testing.assert_array_equal(getattr(p.corpus.eval, k),
                                              getattr(pipes[0].corpus.eval, k))
            np.testing.assert_array_equal(p.batch(3)["inputs"], pipes[0].batch(3)["inputs"])


def test_corpus_too_small_for_a_training_row(tmp_path):
    (tmp_path / "a.txt").write_text("a")  # 2 tokens: "a" and EOS
    cfg = _cfg(source="text", paths=(str(tmp_path / "a.txt"),))
    with pytest.raises(UserError) as e:
        DataPipeline(cfg, 16, 2, seed=0)
    msg = str(e.value)
    assert "a.txt (1 byte)" in msg and "2 tokens" in msg and "\n" not in msg
    assert "config.data.eval_permille" in msg
    # With no eval split wanted, 2 tokens make a training row (one target).
    assert DataPipeline(cfg, 16, 2, seed=0, eval_batches=0).batch(0)["mask"][0].sum() == 1
    (tmp_path / "one.bin").write_bytes(np.array([7], np.uint16).tobytes())
    with pytest.raises(UserError, match=r"one\.bin \(1 token\).*too small|too small.*one\.bin"):
        DataPipeline(_cfg(source="bin", paths=(str(tmp_path / "one.bin"),), eval_permille=0),
                     16, 2, seed=0)


def test_single_file_trains_end_to_end(tmp_path, tiny_args, cpu_env, root):
    """`python -m train` on one text file: the eval split goes inside it, 3 steps, exit 0."""
    path = _one_file(tmp_path, lines=300)
    work = tmp_path / "w"
    r = subprocess.run(
        [sys.executable, "-m", "train", *tiny_args, "--config.data.source=text",
         f"--config.data.paths=('{path}',)", "--config.train.steps=3",
         "--config.optim.warmup_steps=1", f"--config.workdir={work}"],
        cwd=root, env=cpu_env(1), capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads((work / "final_metrics.json").read_text())
    assert np.isfinite(final["loss"]) and np.isfinite(final["eval_loss"])  # evaluated at step 3

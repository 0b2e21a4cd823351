"""Chat data (train.chat): record errors, templates (built-in, a tokenizer_config.json one,
the sandbox), the assistant-only loss mask, packing, and the DFT loss (train.step)."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from model import ModelConfig, Transformer
from train.chat import (
    BUILTIN_TEMPLATE,
    ChatData,
    ChatTemplate,
    encode_messages,
    encode_pair,
    load_template,
    read_records,
    resolve_tokenizer,
)
from train.errors import UserError
from train.step import chunked_cross_entropy, cross_entropy
from train.tokenizers import ByteTokenizer, make_tokenizer

CHATML = BUILTIN_TEMPLATE  # the same text as a Hugging Face ChatML chat_template
CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"}]


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


# ----------------------------------------------------------------------------- records

GOOD = {"prompt": "hi", "completion": "hello"}


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "hi", "completion": ', "not valid JSON"),
    ('["prompt", "completion"]', "JSON object"),
    ({"prompt": "hi"}, "missing field 'completion'"),
    ({"prompt": "hi", "completion": 3}, "'completion' must be a string"),
    ({"prompt": "hi", "completion": ""}, "empty 'completion'"),
    ({"text": "hi"}, "needs 'messages' or 'prompt' and 'completion'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\]: missing field 'content'"),
    ({"messages": "hi"}, "non-empty list"),
])
def test_malformed_record_names_file_and_line(tmp_path, bad, message):
    path = _write_jsonl(tmp_path / "d.jsonl", [GOOD, "", bad])
    with pytest.raises(UserError, match=f"{tmp_path / 'd.jsonl'}:3: .*{message}"):
        read_records([str(tmp_path / "d.jsonl")])
    assert path.exists()


def test_records_of_both_kinds(tmp_path):
    _write_jsonl(tmp_path / "d.jsonl", [GOOD, {"messages": CONV}])
    recs = read_records(str(tmp_path))  # a directory: its .jsonl files
    assert recs[0].messages == ({"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"})
    assert recs[1].messages == tuple(CONV) and recs[1].where.endswith("d.jsonl:2")


# ----------------------------------------------------------------------------- templates


def test_builtin_template_and_mask():
    t = load_template("builtin")
    text = t.render(CONV[:3])
    assert text == ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4<|im_end|>\n")
    assert t.render(CONV[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    tok = ByteTokenizer()
    tokens, mask = encode_messages(CONV, t, tok)
    assert tok.decode(tokens) == t.render(CONV)
    # Trained: each assistant turn's content and end of turn, nothing else.
    assert tok.decode(tokens[mask > 0]) == "4<|im_end|>\n6<|im_end|>\n"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, chatml_bpe):
    """A BPE tokenizer.json with ChatML special tokens and a tokenizer_config.json holding
    the ChatML chat_template (as an imported checkpoint has them)."""
    d = tmp_path_factory.mktemp("hf")
    chatml_bpe(["be brief", "what is 2+2? and 3+3?", "the answer is 4"], d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHATML, "eos_token": "<|im_end|>", "bos_token": None}))
    return d


def test_template_from_tokenizer_config(hf_dir):
    tok = make_tokenizer(str(hf_dir / "tokenizer.json"))
    t = load_template("", tok)
    assert t.origin == str(hf_dir / "tokenizer_config.json")
    assert t.render(CONV[:3]) == load_template("builtin").render(CONV[:3])
    tokens, mask = encode_messages(CONV, t, tok)
    im_end = tok._tok.token_to_id("<|im_end|>")
    assert tok.eos_id == im_end  # from tokenizer_config.json
    trained = tokens[mask > 0].tolist()
    assert trained.count(im_end) == 2 and tok.decode(trained) == "4<|im_end|>\n6<|im_end|>\n"
    # A pair: two completions share the prompt tokens; only the completion is trained.
    a, ma = encode_pair("2+2?", "4", t, tok)
    b, mb = encode_pair("2+2?", "five", t, tok)
    n = int(np.argmax(ma))
    assert n == int(np.argmax(mb)) and (a[:n] == b[:n]).all() and not ma[:n].any()
    assert tok.decode(b[mb > 0]) == "five<|im_end|>\n"
    # Multi-turn prompt: earlier assistant turns are prompt.
    c, mc = encode_pair(CONV[:4], "6", t, tok)
    assert tok.decode(c[mc > 0]) == "6<|im_end|>\n"
    assert resolve_tokenizer(ConfigDict({"tokenizer": ""}), str(hf_dir)) == str(
        hf_dir / "tokenizer.json")


@pytest.mark.parametrize("source, message", [
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{% for m in messages %}{{ m.__init__.__globals__ }}{% endfor %}", "unsafe"),
    ("{{ raise_exception('only user/assistant roles') }}", "only user/assistant roles"),
    ("{% for m in messages %}", "syntax error at line 1"),
])
def test_template_errors_name_the_file(tmp_path, source, message):
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": source}))
    with pytest.raises(UserError, match=f"chat template {cfg}: .*{message}"):
        load_template(str(cfg)).render(CONV)


def test_template_that_is_not_prefix_stable(tmp_path):
    # Renders the conversation newest first: no prefix of it renders as a prefix.
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages|reverse %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    t = load_template(str(tmp_path))
    with pytest.raises(UserError, match="rec.jsonl:7: chat template .*not prefix-stable"):
        encode_messages(CONV, t, ByteTokenizer(), where="rec.jsonl:7")


def test_raw_template_is_prompt_completion_eos(tmp_path):
    """`chat_template="raw"`: the bytes of the RL task's prompt, then the answer, then EOS;
    the mask on the answer and EOS only; multi-turn records refused naming the record."""
    t = load_template("raw")
    tok = ByteTokenizer()
    tokens, mask = encode_pair("47+38=", "85", t, tok)
    assert tokens.tolist() == [*b"47+38=85", tok.eos_id]
    assert mask.tolist() == [0] * 6 + [1, 1, 1]
    _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2=", "completion": "3"},
                                        {"messages": CONV[1:3]}])
    data = ChatData(_data_cfg(tmp_path / "d.jsonl", chat_template="raw"), 16, 1, seed=0)
    b = data.batch(0)
    row = b["targets"][0][b["mask"][0] > 0].tolist()
    assert row in ([*b"3", tok.eos_id, *b"4", tok.eos_id], [*b"4", tok.eos_id, *b"3", tok.eos_id])
    assert "raw" in data.summary()
    with pytest.raises(UserError, match=r"rec.jsonl:3: .*chat_template='raw'.*'system'"):
        encode_messages(CONV[:3], t, tok, where="rec.jsonl:3")


# ----------------------------------------------------------------------------- batches


def _data_cfg(path, **kw):
    d = dict(paths=(str(path),), tokenizer="byte", eos_token="", chat_template="",
             eval_permille=0)
    d.update(kw)
    return ConfigDict(d)


def _records(n):
    return [{"prompt": f"add {i} and {i + 1}", "completion": f"it is {2 * i + 1}"}
            for i in range(n)]


def test_packing_truncation_and_eval_split(tmp_path):
    recs = _records(12) + [{"prompt": "x" * 200, "completion": "y"}]
    _write_jsonl(tmp_path / "d.jsonl", recs)
    data = ChatData(_data_cfg(tmp_path / "d.jsonl", eval_permille=300), 160, 2, seed=0)
    assert data.dropped == 1 and data.truncated == 1  # the long prompt leaves no target
    assert data.n_train + data.n_eval == 12 and data.n_eval > 0
    assert "1 truncated" in data.summary() and "1 dropped" in data.summary()
    b = data.batch(0)
    assert b["inputs"].shape == (2, 160) and b["mask"].dtype == np.float32
    assert (b["segment_ids"].max(axis=1) > 1).all()  # several examples per row
    # The targets the mask keeps are exactly the completions and their end of turn.
    for row in range(2):
        tgt = b["targets"][row][b["mask"][row] > 0]
        for piece in ByteTokenizer().decode(tgt).split("<|im_end|>\n")[:-1]:
            assert piece.startswith("it is ")
    again = ChatData(_data_cfg(tmp_path / "d.jsonl", eval_permille=300), 160, 2, seed=0)
    assert again.n_eval == data.n_eval  # the split is a function of the records
    assert len(data.eval_batches(1)) == 1


@pytest.fixture(scope="module")
def tiny_model():
    cfg = ModelConfig(vocab_size=260, d_model=32, n_layers=1, n_heads=2, ffn_dim=64,
                      max_seq_len=256)
    model = Transformer(cfg)
    v = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    return model, v


def _logits(model, v, inputs, positions, segment_ids):
    fwd = jax.jit(lambda v, x, p, s: model.apply(v, x, p, s)[0])
    return fwd(v, jnp.asarray(inputs), jnp.asarray(positions), jnp.asarray(segment_ids))


_ce = jax.jit(cross_entropy)


def test_prompt_targets_never_change_the_loss(tmp_path, tiny_model):
    model, v = tiny_model
    _write_jsonl(tmp_path / "d.jsonl", _records(6))
    b = ChatData(_data_cfg(tmp_path / "d.jsonl"), 160, 2, seed=0).batch(0)
    logits = _logits(model, v, b["inputs"], b["positions"], b["segment_ids"])
    base, n, _ = cross_entropy(logits, jnp.asarray(b["targets"]), jnp.asarray(b["mask"]))
    assert 0 < float(n) < b["mask"].size
    rng = np.random.default_rng(0)
    prompt = np.argwhere(b["mask"] == 0)
    for r, t in prompt[rng.choice(len(prompt), 20, replace=False)]:
        targets = b["targets"].copy()
        targets[r, t] = (targets[r, t] + 7) % 256
        loss, _, _ = _ce(logits, jnp.asarray(targets), jnp.asarray(b["mask"]))
        assert float(loss) == float(base)
    r, t = np.argwhere(b["mask"] > 0)[0]
    targets = b["targets"].copy()
    targets[r, t] = (targets[r, t] + 7) % 256
    assert float(cross_entropy(logits, jnp.asarray(targets), jnp.asarray(b["mask"]))[0]) != \
        float(base)


def test_packed_loss_equals_unpacked(tmp_path, tiny_model):
    model, v = tiny_model
    _write_jsonl(tmp_path / "d.jsonl", _records(6))
    b = ChatData(_data_cfg(tmp_path / "d.jsonl"), 160, 1, seed=0).batch(0)
    seg = b["segment_ids"][0]
    assert seg.max() >= 2
    logits = _logits(model, v, b["inputs"], b["positions"], b["segment_ids"])
    packed, n_packed, _ = cross_entropy(logits, jnp.asarray(b["targets"]), jnp.asarray(b["mask"]))
    # Each example alone at the start of its own row (padded: segment 0, mask 0).
    alone = {k: np.zeros((seg.max(), len(seg)), b[k].dtype) for k in b}
    for s in range(1, seg.max() + 1):
        at = seg == s
        for k in b:
            alone[k][s - 1, : at.sum()] = b[k][0][at]
        alone["segment_ids"][s - 1, : at.sum()] = 1
    lg = _logits(model, v, alone["inputs"], alone["positions"], alone["segment_ids"])
    total, n_total, _ = cross_entropy(lg, jnp.asarray(alone["targets"]),
                                      jnp.asarray(alone["mask"]))
    assert float(n_total) == float(n_packed)
    np.testing.assert_allclose(float(packed), float(total), rtol=1e-5)


# ----------------------------------------------------------------------------- DFT


def test_dft_loss_by_hand():
    logits = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [1.0, 3.0, 0.0]]])
    targets = jnp.array([[0, 2, 1]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    p = np.exp(np.asarray(logits[0])) / np.exp(np.asarray(logits[0])).sum(-1, keepdims=True)
    pt = p[[0, 1, 2], [0, 2, 1]]
    want = float(np.sum(np.asarray(mask[0]) * pt * -np.log(pt)))  # sum_t m sg(p_t) (-log p_t)
    got, n, _ = cross_entropy(logits, targets, mask, loss="dft")
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    assert float(n) == 2.0
    # d/dlogits = m * p_t * (softmax - onehot): the probability is a constant weight.
    onehot = np.eye(3)[[0, 2, 1]]
    want_grad = (np.asarray(mask[0]) * pt)[:, None] * (p - onehot)
    grad = jax.grad(lambda x: cross_entropy(x, targets, mask, loss="dft")[0])(logits)
    np.testing.assert_allclose(np.asarray(grad[0]), want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_dft_matches_unchunked(z_loss):
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    h = jax.random.normal(k[0], (2, 7, 8))
    w = jax.random.normal(k[1], (8, 11))
    t = jax.random.randint(k[2], (2, 7), 0, 11)
    m = (jax.random.uniform(k[3], (2, 7)) > 0.3).astype(jnp.float32)

    def reference(h, w):
        obj, _, z = cross_entropy(h @ w * 0.5, t, m, loss="dft")
        return obj + z_loss * z

    def chunked(h, w):
        return chunked_cross_entropy(h, w, t, m, logit_scale=0.5, z_loss=z_loss,
                                     chunk_tokens=6, loss="dft")[0]

    np.testing.assert_allclose(float(jax.jit(chunked)(h, w)), float(jax.jit(reference)(h, w)),
                               rtol=1e-5)
    grads = jax.jit(jax.grad(chunked, (0, 1)))(h, w)
    for a, b in zip(grads, jax.jit(jax.grad(reference, (0, 1)))(h, w), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    ce = jax.jit(lambda h, w: chunked_cross_entropy(h, w, t, m, logit_scale=0.5, chunk_tokens=6,
                                                    loss="dft")[1])(h, w)
    np.testing.assert_allclose(float(ce), float(cross_entropy(h @ w * 0.5, t, m)[0]), rtol=1e-5)


def test_chat_template_class_is_sandboxed():
    # The template object itself runs in the sandbox: an unsafe attribute is undefined
    # (renders as nothing), and using it further raises.
    assert ChatTemplate("{{ messages.__class__ }}", "x.jinja").render(CONV) == ""
    with pytest.raises(UserError, match="x.jinja: SecurityError"):
        ChatTemplate("{{ messages.__class__.__base__ }}", "x.jinja").render(CONV)

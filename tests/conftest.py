"""Test-wide setup: 8 fake CPU devices, set before JAX is imported anywhere; the shared
`imported` fixture (a tiny imported checkpoint with its tokenizer and chat template)."""

import json
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The `imported` checkpoint's tiny dense model: compiles and trains in seconds.
IMPORTED_MODEL = dict(vocab_size=320, d_model=32, n_layers=2, n_heads=2, ffn_dim=64,
                      max_seq_len=64)


def train_chatml_bpe(sentences, path):
    """A byte-level BPE `tokenizer.json` (vocab 300, ChatML special tokens) trained on
    `sentences`, saved at `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(list(sentences), trainer=trainer)
    tok.save(str(path))


@pytest.fixture(scope="session")
def chatml_bpe():
    """`train_chatml_bpe(sentences, path)`, for test modules (conftest is not imported)."""
    return train_chatml_bpe


@pytest.fixture(scope="session")
def imported(tmp_path_factory):
    """An 'imported checkpoint': random weights of IMPORTED_MODEL in the `model.hf` Orbax
    format, with a BPE tokenizer.json trained on a few sentences (EOS <|im_end|>) and a
    tokenizer_config.json (ChatML chat template)."""
    import flax.linen as nn
    import jax.numpy as jnp

    from model import ModelConfig, Transformer
    from model.hf.checkpoint import write_orbax
    from train.chat import BUILTIN_TEMPLATE

    d = tmp_path_factory.mktemp("imported")
    cfg = ModelConfig(**IMPORTED_MODEL)
    v = nn.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    write_orbax(str(d), cfg, v)
    train_chatml_bpe(["user assistant add sum", "add 1 2", "sum 3 4 5 6 7 8 9 0"],
                     d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": BUILTIN_TEMPLATE, "eos_token": "<|im_end|>"}))
    return d

"""The Orbax format that `python -m model.hf import` writes and `export` reads.

```
DST/
  model_config.json   ModelConfig.to_dict()
  variables/          Orbax StandardCheckpointer: {"params": ..., "router_bias": ...}
                      (no "router_bias" for dense models), unboxed, the layout of
                      `nn.unbox(Transformer(cfg).init(...))`
  hf_config.json      the source checkpoint's config.json (token ids etc. for export)
  tokenizer.json ...  the source checkpoint's tokenizer files, copied as they are
```

Restore with `read_orbax(DST, mesh)` (each array straight into its sharding), or, in a
trainer, `ocp.StandardCheckpointer().restore(DST + "/variables", abstract)` with an abstract
tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` for a model built from
`ModelConfig.from_dict(json.load(open(DST + "/model_config.json")))` (the stacked layout if
that config has `scan_layers=True`).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from model.config import ModelConfig
from model.hf.convert import abstract_variables, load, save

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "tiktoken.model",
)
CONFIG_FILE = "model_config.json"
VARIABLES_DIR = "variables"
HF_CONFIG_FILE = "hf_config.json"
_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copies the tokenizer (and generation config) files present in `src` to `dst`."""
    copied = []
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def write_orbax(path: str, cfg: ModelConfig, variables: dict[str, Any]) -> None:
    """Writes `cfg` and `variables` in the format above (`path` must not hold variables yet)."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, VARIABLES_DIR)):
        raise ValueError(f"{path}/{VARIABLES_DIR} already exists; choose a new destination")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, VARIABLES_DIR), variables)
        ckptr.wait_until_finished()
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2)


def read_orbax(path: str, mesh: Mesh | None = None) -> tuple[ModelConfig, dict[str, Any]]:
    """Reads what `write_orbax` wrote; with `mesh`, each array restores into its sharding."""
    path = os.path.abspath(path)
    fname = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(fname):
        raise ValueError(f"{path} is not a model.hf Orbax checkpoint (no {CONFIG_FILE})")
    with open(fname) as f:
        cfg = ModelConfig.from_dict(json.load(f))
    abstract, shardings = abstract_variables(cfg, mesh)
    if shardings is not None:
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
    with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(os.path.join(path, VARIABLES_DIR), abstract)
    return cfg, variables


def import_checkpoint(
    src: str, dst: str, mesh: Mesh | None = None, dtype: str | None = None, **overrides: Any
) -> ModelConfig:
    """HF checkpoint directory `src` -> Orbax checkpoint `dst` (+ tokenizer files)."""
    cfg, variables = load(src, mesh=mesh, dtype=dtype, **overrides)
    write_orbax(dst, cfg, variables)
    shutil.copy2(os.path.join(src, "config.json"), os.path.join(dst, HF_CONFIG_FILE))
    copy_tokenizer(src, dst)
    return cfg


def export_checkpoint(
    src: str, dst: str, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30
) -> ModelConfig:
    """Orbax checkpoint `src` (from `import_checkpoint` or `write_orbax`) -> HF directory
    `dst`, keeping the original token ids and tokenizer files when `src` has them."""
    cfg, variables = read_orbax(src)
    extra = None
    if os.path.exists(os.path.join(src, HF_CONFIG_FILE)):
        with open(os.path.join(src, HF_CONFIG_FILE)) as f:
            hf = json.load(f)
        extra = {k: hf[k] for k in _TOKEN_KEYS if k in hf}
    save(dst, cfg, variables, dtype=dtype, max_shard_bytes=max_shard_bytes, extra_config=extra)
    copy_tokenizer(src, dst)
    return cfg

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

import contextlib
import gc
import json
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from model import lora
from model.config import ModelConfig
from model.hf.convert import abstract_variables, load, save
from model.hf.safetensors_io import read_json_object

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
    """Reads what `write_orbax` wrote; with `mesh`, each array restores into its sharding.

    Raises:
      ValueError: naming the file or directory, when `path` is not such a checkpoint, its
        `model_config.json` is not a valid config, or its variables do not fit that config
        or cannot be read.
    """
    path = os.path.abspath(path)
    fname = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(fname):
        raise ValueError(f"{path} is not a model.hf Orbax checkpoint (no {CONFIG_FILE})")
    d = read_json_object(fname)
    try:
        cfg = ModelConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{fname}: {e}") from e
    abstract, shardings = abstract_variables(cfg, mesh)
    vdir = os.path.join(path, VARIABLES_DIR)
    if not os.path.isdir(vdir):
        raise ValueError(f"{path} is not a model.hf Orbax checkpoint (no {VARIABLES_DIR}/)")
    _check_stored_shapes(vdir, abstract, fname)
    if shardings is not None:
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
    error = None
    with ocp.StandardCheckpointer() as ckptr:
        try:
            variables = ckptr.restore(vdir, abstract)
        except Exception as e:  # orbax raises many types for unreadable checkpoints
            error = (f"{vdir}: cannot restore the arrays (corrupt or incomplete checkpoint?): "
                     f"{type(e).__name__}: {_first_line(e)}")
    if error is not None:
        gc.collect()  # the failed read's un-awaited coroutines, now rather than at random later
        raise ValueError(error)
    return cfg, variables


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def stored_shape_diff(path: str, abstract: Any, only_wanted: bool = False) -> list[str]:
    """`"name: stored S, config C"` for each array of the Orbax checkpoint item at
    `path` whose stored shape differs from `abstract`'s (or that is on one side only; with
    `only_wanted`, arrays that `abstract` does not ask for are ignored), read from the
    metadata before any array is: a read that fails halfway leaves asynchronous reads that
    print tracebacks long after the error.

    Raises:
      ValueError: the metadata cannot be read (corrupt or incomplete checkpoint).
    """
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.CRITICAL)  # orbax logs what fails here; it is reported below
    try:
        with ocp.StandardCheckpointer() as ckptr:
            meta = ckptr.metadata(path)
        meta = getattr(meta, "item_metadata", meta)
    except Exception as e:  # orbax raises many types for unreadable checkpoints
        meta, error = None, f" ({type(e).__name__}: {_first_line(e)})"
    else:
        error = ""
    finally:
        absl_logger.setLevel(level)

    def shapes(tree: Any) -> dict[str, tuple[int, ...] | None]:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(kp, simple=True, separator="/"):
                None if getattr(x, "shape", None) is None else tuple(x.shape) for kp, x in leaves}

    stored, want = shapes(meta), shapes(abstract)
    if not any(v is not None for v in stored.values()):
        raise ValueError(f"{path}: not a readable Orbax checkpoint (corrupt or incomplete: its "
                         f"metadata cannot be read){error}")
    names = set(want) if only_wanted else set(stored) | set(want)
    return [f"{k}: stored {stored.get(k)}, config {want.get(k)}"
            for k in sorted(names) if stored.get(k) != want.get(k)]


def _check_stored_shapes(vdir: str, abstract: Any, config_file: str) -> None:
    """`ValueError` naming the leaves whose stored shape differs from the config's."""
    diff = stored_shape_diff(vdir, abstract)
    if diff:
        raise ValueError(f"{vdir} does not match {config_file} ({len(diff)} arrays differ): "
                         + "; ".join(diff[:5]) + (" ..." if len(diff) > 5 else ""))


def check_destination(dst: str) -> bool:
    """Checks that `dst` can receive a new checkpoint without overwriting anything: it must
    not exist yet or be an empty directory, and be creatable. Returns whether it exists.

    Raises:
      ValueError: naming `dst` (it is a file, a non-empty directory, or cannot be created).
    """
    if os.path.isdir(dst):
        entries = sorted(os.listdir(dst))
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ValueError(f"destination {dst} is not empty ({shown}); refusing to overwrite it: "
                             "choose a new or empty directory")
        return True
    if os.path.lexists(dst):
        raise ValueError(f"destination {dst} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(dst))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"cannot create destination {dst}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create destination {dst}: {parent} is not writable")
    return False


@contextlib.contextmanager
def new_destination(dst: str) -> Iterator[None]:
    """Runs the body that writes `dst` (checked by `check_destination`); if it fails, what
    it wrote is removed again (`dst` held nothing before), so no half-written checkpoint
    stays behind."""
    existed = check_destination(dst)
    try:
        yield
    except Exception:
        if existed:
            for name in os.listdir(dst):
                full = os.path.join(dst, name)
                if os.path.isdir(full) and not os.path.islink(full):
                    shutil.rmtree(full, ignore_errors=True)
                else:
                    os.remove(full)
        else:
            shutil.rmtree(dst, ignore_errors=True)
        raise


def import_checkpoint(
    src: str, dst: str, mesh: Mesh | None = None, dtype: str | None = None, **overrides: Any
) -> ModelConfig:
    """HF checkpoint directory `src` -> Orbax checkpoint `dst` (+ tokenizer files). `dst`
    must be new or an empty directory (`ValueError` naming it otherwise, before anything
    is read); if the import fails, `dst` is left as it was."""
    check_destination(dst)
    cfg, variables = load(src, mesh=mesh, dtype=dtype, **overrides)
    with new_destination(dst):
        write_orbax(dst, cfg, variables)
        shutil.copy2(os.path.join(src, "config.json"), os.path.join(dst, HF_CONFIG_FILE))
        copy_tokenizer(src, dst)
    return cfg


def export_checkpoint(
    src: str, dst: str, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30
) -> ModelConfig:
    """Orbax checkpoint `src` (from `import_checkpoint` or `write_orbax`) -> HF directory
    `dst`, keeping the original token ids and tokenizer files when `src` has them. `dst`
    must be new or an empty directory (`ValueError` naming it otherwise, before anything
    is read); if the export fails, `dst` is left as it was. LoRA adapters (`model.lora`)
    are merged into their kernels (`W + alpha/r * A @ B`): the written weights are those of
    the adapted model, and the returned config has `lora_rank=0`."""
    check_destination(dst)
    cfg, variables = read_orbax(src)
    extra = None
    if os.path.exists(os.path.join(src, HF_CONFIG_FILE)):
        hf = read_json_object(os.path.join(src, HF_CONFIG_FILE))
        extra = {k: hf[k] for k in _TOKEN_KEYS if k in hf}
    with new_destination(dst):
        save(dst, cfg, variables, dtype=dtype, max_shard_bytes=max_shard_bytes, extra_config=extra)
        copy_tokenizer(src, dst)
    return lora.base_config(cfg)

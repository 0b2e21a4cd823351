"""Lazy reading and streaming writing of safetensors files, with numpy + ml_dtypes.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the raw little-endian tensor bytes. Reading memory-maps each file: a tensor is a
zero-copy view, and only the slices that are used are ever read from disk. The
`safetensors` package's numpy backend cannot represent bfloat16 or float8 (and its other
backends pull in torch or place every tensor on a device, the wrong place for a checkpoint
larger than the accelerator), hence this small reader and writer, and no dependency on the
`safetensors` package. tests/model/test_hf.py checks both against it: transformers reads what
`write_safetensors` writes, and `SafetensorsReader` reads what transformers writes.

Writing streams one tensor at a time: the header is computed from shapes and dtypes, then
each tensor is produced (e.g. fetched from the accelerator), written and dropped.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any

import ml_dtypes
import numpy as np

DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsReader:
    """All tensors of a checkpoint directory (one file, or shards named by the HF index file,
    or every `*.safetensors` file when there is no index), memory-mapped.

    `reader.keys()`, `reader.shape(name)`, `reader.dtype(name)`, `reader.get(name)` (a
    read-only, lazily paged numpy view).
    """

    def __init__(self, path: str):
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in {path}")
        self._entries: dict[str, tuple[str, dict[str, Any], int]] = {}
        self._maps: dict[str, np.memmap] = {}
        for name in files:
            fname = os.path.join(path, name)
            header, start = read_header(fname)
            for key, info in header.items():
                if key != "__metadata__":
                    self._entries[key] = (fname, info, start)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self._entries[name][1]["dtype"]])

    def get(self, name: str) -> np.ndarray:
        fname, info, start = self._entries[name]
        if fname not in self._maps:
            self._maps[fname] = np.memmap(fname, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._maps[fname][start + begin : start + end]
        return raw.view(self.dtype(name)).reshape(info["shape"])


def read_header(fname: str) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where its data begins."""
    with open(fname, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return header, 8 + n


def write_safetensors(
    path: str,
    specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
    produce: Callable[[str], np.ndarray],
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Writes tensors to `path` in the Hugging Face layout, one tensor in memory at a time.

    Args:
      specs: `(name, shape, dtype)` of every tensor, in file order.
      produce: `name -> np.ndarray` (called once per tensor, in order).
      max_shard_bytes: above this, tensors are split over `model-0000i-of-0000n.safetensors`
        files plus `model.safetensors.index.json`; else one `model.safetensors`.
    Returns:
      The file names written.
    """
    specs = [(n, tuple(s), np.dtype(d)) for n, s, d in specs]
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * spec[2].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    n = len(shards)
    names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    os.makedirs(path, exist_ok=True)
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards, strict=True):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in shard:
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        total += offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned
        with open(os.path.join(path, fname), "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, dtype in shard:
                arr = np.ascontiguousarray(produce(name))
                if arr.shape != shape or arr.dtype != dtype:
                    raise AssertionError(f"{name}: produced {arr.shape} {arr.dtype}, "
                                         f"expected {shape} {dtype}")
                f.write(arr.tobytes())
    if n > 1:
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names

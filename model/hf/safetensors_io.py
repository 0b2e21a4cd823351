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
import math
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

    `reader.keys()`, `reader.shape(name)`, `reader.dtype(name)`, `reader.file(name)`,
    `reader.get(name)` (a read-only, lazily paged numpy view).

    Opening reads and checks every header (`read_header`): a truncated or malformed file,
    a malformed index or a tensor stored twice is a `ValueError` naming the file.
    """

    def __init__(self, path: str):
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            files = _index_files(index)
            for name in files:
                if not os.path.isfile(os.path.join(path, name)):
                    raise ValueError(f"{index}: names the shard {name!r}, which is not a file in {path}")
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
                if key == "__metadata__":
                    continue
                if key in self._entries:
                    raise ValueError(f"tensor {key} is in both {self._entries[key][0]} and {fname}")
                self._entries[key] = (fname, info, start)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self._entries[name][1]["dtype"]])

    def file(self, name: str) -> str:
        """The file that holds tensor `name`."""
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        fname, info, start = self._entries[name]
        if fname not in self._maps:
            self._maps[fname] = np.memmap(fname, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._maps[fname][start + begin : start + end]
        return raw.view(self.dtype(name)).reshape(info["shape"])


def read_json_object(fname: str, what: str = "") -> dict[str, Any]:
    """A JSON object file; `ValueError` naming the file when it is not valid JSON or not an
    object (`what` says what it should have been)."""
    with open(fname, "rb") as f:
        raw = f.read()
    try:
        content = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{fname}: not valid JSON ({e})") from e
    if not isinstance(content, dict):
        raise ValueError(f"{fname}: not {what} (not a JSON object)" if what
                         else f"{fname}: not a JSON object")
    return content


def _index_files(index: str) -> list[str]:
    """The shard file names of an HF index file (`ValueError` naming it when malformed)."""
    content = read_json_object(index, "a safetensors index")
    weight_map = content.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: not a safetensors index (no 'weight_map' of tensor -> file name)")
    return sorted(set(weight_map.values()))


def read_header(fname: str) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the byte offset where its data begins.

    Raises:
      ValueError: naming `fname` (and the tensor, where one is at fault) when the file is
        truncated (in the header, or before the end of a tensor's bytes), the header is not
        JSON, or an entry has an unknown dtype or a byte range that does not fit its shape.
    """
    size = os.path.getsize(fname)
    with open(fname, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{fname}: truncated safetensors file ({size} bytes, not even the "
                             "8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise ValueError(f"{fname}: not a safetensors file (its first 8 bytes give a header "
                             f"length of {n} bytes)")
        if 8 + n > size:
            raise ValueError(f"{fname}: truncated safetensors file (the header needs {8 + n} "
                             f"bytes, the file has {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{fname}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{fname}: the safetensors header is not a JSON object")
    start = 8 + n
    for name, info in header.items():
        if name != "__metadata__":
            _check_entry(fname, name, info, size - start)
    return header, start


_MAX_HEADER = 100_000_000  # the limit of the `safetensors` package


def _check_entry(fname: str, name: str, info: Any, data_bytes: int) -> None:
    """Raises `ValueError` naming `fname` and tensor `name` if its header entry is malformed
    or its bytes lie beyond the `data_bytes` the file holds after the header."""

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if not isinstance(info, dict):
        raise ValueError(f"{fname}: tensor {name}: malformed header entry {str(info)[:80]}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise ValueError(f"{fname}: tensor {name}: unsupported dtype {dtype!r} "
                         f"(supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(is_int(d) for d in shape):
        raise ValueError(f"{fname}: tensor {name}: malformed shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise ValueError(f"{fname}: tensor {name}: malformed data_offsets {offsets!r}")
    begin, end = offsets
    nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
    if end - begin != nbytes:
        raise ValueError(f"{fname}: tensor {name}: data_offsets [{begin}, {end}] hold {end - begin} "
                         f"bytes, but shape {shape} {dtype} needs {nbytes}")
    if end > data_bytes:
        raise ValueError(f"{fname}: truncated safetensors file: tensor {name} needs bytes "
                         f"[{begin}, {end}) of the data, which has only {data_bytes}")


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

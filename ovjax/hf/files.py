"""Safetensors I/O in the hub layout: the index, one-tensor-at-a-time reading, a streaming sharded writer.

Only safetensors are read (never pickle), with plain reads (`SafetensorsFile`). Shard names in an index are
checked to be plain file names in the checkpoint directory. The writer plans shards from shapes alone and
writes each tensor's bytes as it comes, so a shard is never held in memory; the files are the standard format
(8-byte header size, JSON header padded to 8 bytes, raw little-endian data) that `safetensors.safe_open` and
transformers read.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

SAFE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024 ** 3

_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
           np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


class CheckpointError(ValueError):
    """A checkpoint directory (or file) that does not hold what it should; the message is one line."""


def read_json(path: str, what: str = "") -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{os.path.dirname(path) or '.'} has no {os.path.basename(path)}{what}")
    try:
        with open(path) as f:
            out = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return out


def read_index(path: str) -> dict[str, str]:
    """Stored key -> shard file name (a single `model.safetensors` or the shards of an index)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    index_path = os.path.join(path, INDEX_NAME)
    if os.path.exists(index_path):
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no weight_map")
        for shard in set(weight_map.values()):
            if not isinstance(shard, str) or os.path.basename(shard) != shard or not shard.endswith(".safetensors"):
                raise CheckpointError(f"{index_path} names an unsafe shard file {shard!r}")
            if not os.path.isfile(os.path.join(path, shard)):
                raise CheckpointError(f"shard {shard} listed in {INDEX_NAME} is missing from {path}")
        return weight_map
    single = os.path.join(path, SAFE_NAME)
    if not os.path.isfile(single):
        raise CheckpointError(f"{path} has neither {SAFE_NAME} nor {INDEX_NAME} (only safetensors are read)")
    return {k: SAFE_NAME for k in _open(single).keys()}


_NUMPY = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2 ** 20


class SafetensorsFile:
    """One .safetensors file read with plain `read()` calls (no mmap: a mapped file's pages would count in
    the process's resident memory as they are touched). Header offsets are checked against the file size."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else -1
                if not 0 < n <= min(_MAX_HEADER, size - 8):
                    raise ValueError("bad header size")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError, struct.error) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = {}
        data_size = size - 8 - n
        for key, info in header.items():
            try:
                dtype = _NUMPY[info["dtype"]] if info["dtype"] != "BOOL" else np.dtype(bool)
                shape = tuple(int(x) for x in info["shape"])
                start, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {key!r} has an unreadable header entry {info!r}") from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if not 0 <= start <= end <= data_size or end - start != nbytes:
                raise CheckpointError(f"{path}: tensor {key!r} has data offsets that do not fit its shape or the file")
            self.entries[key] = (dtype, shape, 8 + n + start)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def get(self, key: str) -> np.ndarray:
        dtype, shape, offset = self.entries[key]
        count = int(np.prod(shape, dtype=np.int64))
        out = np.empty(count, dtype.newbyteorder("<"))
        with open(self.path, "rb") as f:
            f.seek(offset)
            if f.readinto(out.view(np.uint8)) != out.nbytes:
                raise CheckpointError(f"{self.path}: tensor {key!r} is truncated")
        return out.astype(dtype, copy=False).reshape(shape)


def _open(path: str) -> SafetensorsFile:
    return SafetensorsFile(path)


class TensorSource:
    """The tensors of one checkpoint directory, read one at a time by stored key; shard headers read lazily."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.weight_map = read_index(self.path)
        self._handles: dict = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, key: str) -> SafetensorsFile:
        shard = self.weight_map[key]
        if shard not in self._handles:
            self._handles[shard] = _open(os.path.join(self.path, shard))
        handle = self._handles[shard]
        if key not in handle.entries:
            raise CheckpointError(f"{self.path}: {key} is listed in the index but not stored in {shard}")
        return handle

    def shape(self, key: str) -> tuple[int, ...]:
        return self._handle(key).shape(key)

    def get(self, key: str) -> np.ndarray:
        return self._handle(key).get(key)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DictSource(TensorSource):
    """In-memory tensors ({stored key: numpy}) behind the TensorSource interface (tests, state dicts)."""

    def __init__(self, tensors: dict, name: str = "<state dict>"):
        self.path = name
        self.tensors = tensors
        self.weight_map = {k: name for k in tensors}
        self._handles = {}

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(np.shape(self.tensors[key]))

    def get(self, key: str) -> np.ndarray:
        return np.asarray(self.tensors[key])


def plan_shards(specs: dict[str, tuple[tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list[str]]:
    """Sorted keys grouped into shards of at most max_shard_bytes (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for key in sorted(specs):
        shape, dtype = specs[key]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    return shards


def write_checkpoint(path: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                     tensors: Iterable[tuple[str, np.ndarray]], *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     metadata: dict | None = None) -> dict[str, str]:
    """Write tensors (yielded in any order, each exactly once, matching `specs`) as `model.safetensors` or
    shards + index. Tensors that arrive before their shard is open are held until it is; yield them in
    sorted key order to keep one tensor in memory. Returns the weight map."""
    shards = plan_shards(specs, max_shard_bytes)
    names = ([SAFE_NAME] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for stale in [SAFE_NAME, INDEX_NAME] + [n for n in os.listdir(path) if n.startswith("model-")]:
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    shard_of = {k: i for i, keys in enumerate(shards) for k in keys}
    pending: dict[str, np.ndarray] = {}
    it: Iterator = iter(tensors)
    for i, keys in enumerate(shards):
        with open(os.path.join(path, names[i]), "wb") as f:
            _write_header(f, [(k, specs[k]) for k in keys], metadata or {"format": "pt"})
            for key in keys:
                while key not in pending:
                    try:
                        k, value = next(it)
                    except StopIteration:
                        raise CheckpointError(f"export produced no tensor {key}") from None
                    if k not in shard_of:
                        raise CheckpointError(f"export produced an unplanned tensor {k}")
                    pending[k] = value
                value = pending.pop(key)
                shape, dtype = specs[key]
                if tuple(value.shape) != tuple(shape) or value.dtype != np.dtype(dtype):
                    raise CheckpointError(f"{key}: produced {value.shape} {value.dtype}, planned {shape} {dtype}")
                f.write(np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<"), copy=False).tobytes())
    weight_map = {k: names[shard_of[k]] for k in specs}
    if len(shards) > 1:
        total = sum(int(np.prod(s, dtype=np.int64)) * np.dtype(d).itemsize for s, d in specs.values())
        with open(os.path.join(path, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return weight_map


def _write_header(f, items, metadata: dict) -> None:
    header, offset = {"__metadata__": metadata}, 0
    for key, (shape, dtype) in items:
        dt = np.dtype(dtype)
        if dt not in _DTYPES:
            raise CheckpointError(f"{key}: dtype {dt} cannot be written to safetensors here")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        header[key] = {"dtype": _DTYPES[dt], "shape": [int(s) for s in shape],
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)


def verify_written(path: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """Reopen what was written: the same keys, shapes and dtypes as planned."""
    with TensorSource(path) as src:
        if set(src.keys()) != set(specs):
            raise CheckpointError(f"export check failed: written keys differ from the model's ({path})")
        for key, (shape, dtype) in specs.items():
            got = src.shape(key)
            if got != tuple(shape):
                raise CheckpointError(f"export check failed: {key} shape {got} != {tuple(shape)}")

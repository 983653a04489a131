"""An on-disk cache of arrays computed in chunks, so an interrupted run resumes where it stopped.

Layout of a cache folder:
    key.json                  what the cached arrays were computed from (encoder, inputs, chunk size ...)
    PREFIX-NNNNNN.npy         chunk NNNNNN of the array PREFIX (plain .npy, loaded with allow_pickle=False)
A chunk is written to a temporary name and renamed when complete, so a killed run leaves only whole chunks;
a rerun with the same key loads them and computes only the missing ones. A cache made for another key is
refused (one line naming the differing fields), never silently reused or overwritten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

KEY_FILE = "key.json"


class CacheError(ValueError):
    """A cache folder that belongs to other inputs, or a damaged chunk."""


class ChunkCache:
    """Chunks of named arrays in `folder`, valid for `key` (a JSON-able dict)."""

    def __init__(self, folder: str | os.PathLike, key: dict):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        key = json.loads(json.dumps(key, sort_keys=True))
        key_path = self.folder / KEY_FILE
        if key_path.exists():
            try:
                old = json.loads(key_path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise CacheError(f"{key_path} is not JSON ({e}); delete the cache folder") from None
            if old != key:
                diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
                raise CacheError(f"cache {self.folder} was made for other inputs (differs in {diff}); "
                                 "use a new --cache folder or delete this one")
        else:
            tmp = key_path.with_name(KEY_FILE + ".tmp")
            tmp.write_text(json.dumps(key, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, key_path)
        self.computed: dict[str, list[int]] = {}  # prefix -> chunks computed (not loaded) by this process

    def path(self, prefix: str, index: int) -> Path:
        return self.folder / f"{prefix}-{index:06d}.npy"

    def has(self, prefix: str, index: int) -> bool:
        return self.path(prefix, index).is_file()

    def load(self, prefix: str, index: int, rows: int) -> np.ndarray:
        path = self.path(prefix, index)
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CacheError(f"{path} is unreadable ({e}); delete it to recompute") from None
        if arr.shape[0] != rows:
            raise CacheError(f"{path} holds {arr.shape[0]} rows, chunk {index} has {rows}; delete it to recompute")
        return arr

    def store(self, prefix: str, index: int, arr: np.ndarray) -> None:
        path = self.path(prefix, index)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        os.replace(tmp, path)
        self.computed.setdefault(prefix, []).append(index)

    def chunks(self, prefix: str, bounds: list[tuple[int, int]], compute: Callable[[int, int], np.ndarray],
               progress=None) -> Iterator[np.ndarray]:
        """Yields chunk i of `prefix` (rows bounds[i]) in order: loaded if cached, else compute(a, b) + stored.

        progress: an optional tqdm-like object; `update(rows)` is called per chunk."""
        for i, (a, b) in enumerate(bounds):
            if self.has(prefix, i):
                arr = self.load(prefix, i, b - a)
            else:
                arr = np.asarray(compute(a, b))
                if arr.shape[0] != b - a:
                    raise CacheError(f"chunk {i} of {prefix}: computed {arr.shape[0]} rows for [{a}, {b})")
                self.store(prefix, i, arr)
            if progress is not None:
                progress.update(b - a)
            yield arr


def chunk_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """[(start, stop)] of consecutive chunks of `size` rows covering range(n)."""
    if size < 1:
        raise CacheError(f"chunk size must be positive, got {size}")
    return [(a, min(n, a + size)) for a in range(0, n, size)]

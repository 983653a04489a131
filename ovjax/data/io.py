"""Writing datasets: atomic ArrayRecord shards with their sha256, JSON manifests, the rejects log with reason
counts, the "output exists" refusal, and the ordered parallel map. `convert` and `pack` both write through here.

A shard is written to a hidden temporary name and renamed into place only when closed, so a crash never leaves
a shard that looks complete; the manifest is written last (atomically), so a folder with a manifest is whole.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

WRITER_OPTIONS = "group_size:1"  # one record per chunk: random access reads exactly one record
RANDOM_ACCESS = "readahead_buffer_size:0,max_parallelism:0"
MANIFEST = "manifest.json"
REJECTS_FILE = "rejects.jsonl"


class OutputExists(ValueError):
    """The output folder already holds a dataset."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2, newline: bool = True) -> None:
    """Write `obj` as sorted-key JSON atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True) + ("\n" if newline else ""), encoding="utf-8")
    os.replace(tmp, path)


def refuse_existing(out_dir: str | os.PathLike, prefix: str, error: type[Exception] = OutputExists) -> None:
    """Raise `error` when out_dir already holds a manifest or `prefix`-*.array_record shards."""
    out = Path(out_dir)
    if (out / MANIFEST).exists() or any(out.glob(f"{prefix}-*.array_record")):
        raise error(f"{out} already holds a {MANIFEST} or {prefix}-*.array_record shards; choose a new output folder")


def read_complete_manifest(raw_dir: str | os.PathLike, error: type[Exception] = ValueError) -> tuple[dict, str]:
    """(manifest, its path) of a dataset folder; raises `error` unless the manifest exists with status complete."""
    path = os.path.join(raw_dir, MANIFEST)
    if not os.path.isfile(path):
        raise error(f"{raw_dir} has no {MANIFEST} (not a converted raw directory)")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("status", "complete") != "complete":
        raise error(f"{path} has status {meta.get('status')!r} (conversion did not complete)")
    return meta, path


def num_records(path: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path, RANDOM_ACCESS)
    try:
        return int(reader.num_records())
    finally:
        reader.close()


class _AtomicShard:
    """One ArrayRecord file written under a temporary name; `commit` renames it and describes it."""

    def __init__(self, tmp_path: Path):
        from array_record.python.array_record_module import ArrayRecordWriter

        self.tmp = tmp_path
        self.records = 0
        self._writer = ArrayRecordWriter(str(tmp_path), WRITER_OPTIONS)

    def write(self, data: bytes) -> None:
        self._writer.write(data)
        self.records += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def commit(self, final: Path) -> dict:
        """-> {"file", "records", "bytes", "sha256"} of the renamed shard."""
        self.close()
        os.replace(self.tmp, final)
        return {"file": final.name, "records": self.records, "bytes": final.stat().st_size,
                "sha256": sha256_file(final)}


def write_shard(path: str | os.PathLike, records: Iterable[bytes]) -> dict:
    """Write one shard atomically; -> {"file", "records", "bytes", "sha256"}."""
    final = Path(path)
    shard = _AtomicShard(final.with_name(final.name + ".tmp"))
    try:
        for r in records:
            shard.write(r)
    finally:
        shard.close()
    return shard.commit(final)


def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}.array_record"


class ShardWriter:
    """Streams records into `<prefix>-NNNNN-of-MMMMM.array_record` shards of `records_per_shard` records
    (the count M is known at `finish`, which renames the hidden partial files)."""

    def __init__(self, out_dir: str | os.PathLike, prefix: str, records_per_shard: int):
        self.out_dir, self.prefix, self.per_shard = Path(out_dir), prefix, records_per_shard
        self._shards: list[_AtomicShard] = []

    def write(self, data: bytes) -> None:
        if not self._shards or self._shards[-1].records == self.per_shard:
            if self._shards:
                self._shards[-1].close()
            self._shards.append(_AtomicShard(self.out_dir / f".{self.prefix}-{len(self._shards):05d}.partial"))
        self._shards[-1].write(data)

    def finish(self) -> list[dict]:
        """Close and rename every shard; -> [{"file", "records", "bytes", "sha256"}] in order."""
        n = len(self._shards)
        return [s.commit(self.out_dir / shard_name(self.prefix, i, n)) for i, s in enumerate(self._shards)]


class RejectLog:
    """rejects.jsonl (one sorted-key JSON line per rejected sample) plus the count of each reason."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._file = open(self.path, "w", encoding="utf-8")
        self._counts: collections.Counter = collections.Counter()

    def add(self, reason: str, **fields) -> None:
        self._counts[reason] += 1
        self._file.write(json.dumps({"reason": reason, **fields}, sort_keys=True) + "\n")

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def by_reason(self) -> dict[str, int]:
        return dict(sorted(self._counts.items()))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RejectLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ordered_map(fn: Callable, items: Iterable, workers: int, *, initializer: Callable | None = None,
                initargs: tuple = (), in_flight_per_worker: int = 4) -> Iterator:
    """fn(item) for every item, in input order, over `workers` processes (in this process when workers <= 1).

    Reads `items` lazily and keeps at most in_flight_per_worker * workers results pending, so memory stays
    bounded on long streams. Closing the generator early stops the pool. Processes are spawned, not forked:
    the parent may hold threads (jax, grain, tokenizers) that a fork would copy in a broken state.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= in_flight_per_worker * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

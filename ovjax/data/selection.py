"""Selection manifests: which raw samples go into a pack, in which order, how many times.

Written by the steps that choose samples (`balance`, weighted mixtures) and read by `pack` as its input.
A selection is two files side by side:

    NAME.json        {"format": "ovjax-selection", "version": 1,
                      "sources": [{"dir": RAW_DIR, "manifest_sha256": HEX}, ...],
                      "picks_file": "NAME.picks.npy", "picks_sha256": HEX, "num_picks": N,
                      "producer": {...free-form: the step, its parameters and seed...}}
    NAME.picks.npy   int64 [N, 3]: (source, shard, record) per pick, in the order pack reads them;
                     a sample picked twice appears twice.

`source` indexes `sources`, `shard` indexes that raw directory's `manifest.json` "shards" list and
`record` is the record's index inside that shard. The picks are a plain .npy (never pickled) and are
checked against their sha256 and against each source's manifest when read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ovjax.data import io

FORMAT = "ovjax-selection"
VERSION = 1


class SelectionError(ValueError):
    """A selection manifest that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Selection:
    """A read and checked selection. `shard_paths[s][k]` is the path of shard k of source s."""
    sources: list[dict]
    picks: np.ndarray  # int64 [N, 3]: (source, shard, record)
    shard_paths: list[list[str]]
    producer: dict


def _read_raw_manifest(raw_dir: str) -> tuple[dict, str]:
    meta, path = io.read_complete_manifest(raw_dir, SelectionError)
    return meta, io.sha256_file(path)


def is_selection(path: str | os.PathLike) -> bool:
    """True when `path` is a JSON file that declares itself a selection manifest."""
    p = Path(path)
    if not (p.is_file() and p.suffix == ".json"):
        return False
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_selection(path: str | os.PathLike, raw_dirs: list[str], picks, producer: dict) -> dict:
    """Writes NAME.json + NAME.picks.npy atomically; returns the header.

    raw_dirs: converted raw directories (the `source` column indexes this list).
    picks: int [N, 3] (source, shard, record), validated against each source's manifest.
    """
    p = Path(path)
    if p.suffix != ".json":
        raise SelectionError(f"a selection manifest is a .json path, got {p}")
    picks = np.asarray(picks, dtype=np.int64).reshape(-1, 3)
    sources = []
    for d in raw_dirs:
        _, sha = _read_raw_manifest(d)
        sources.append({"dir": os.path.abspath(d), "manifest_sha256": sha})
    _check_picks(picks, [_read_raw_manifest(d)[0] for d in raw_dirs], str(p))
    p.parent.mkdir(parents=True, exist_ok=True)
    picks_path = p.with_name(p.stem + ".picks.npy")
    tmp = picks_path.with_name(picks_path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, picks, allow_pickle=False)
    os.replace(tmp, picks_path)
    header = {"format": FORMAT, "version": VERSION, "sources": sources, "picks_file": picks_path.name,
              "picks_sha256": io.sha256_file(picks_path), "num_picks": int(picks.shape[0]),
              "producer": producer}
    io.write_json(p, header)
    return header


def _check_picks(picks: np.ndarray, manifests: list[dict], where: str) -> None:
    if picks.ndim != 2 or picks.shape[1] != 3:
        raise SelectionError(f"{where}: picks must be [N, 3] (source, shard, record), got {picks.shape}")
    if picks.shape[0] == 0:
        raise SelectionError(f"{where}: the selection picks no sample")
    if (picks < 0).any():
        raise SelectionError(f"{where}: negative index in picks")
    if picks[:, 0].max() >= len(manifests):
        raise SelectionError(f"{where}: pick names source {int(picks[:, 0].max())}, "
                             f"only {len(manifests)} source(s) listed")
    for s, meta in enumerate(manifests):
        counts = np.array([int(sh["records"]) for sh in meta.get("shards", [])], dtype=np.int64)
        mine = picks[picks[:, 0] == s]
        if not mine.size:
            continue
        if mine[:, 1].max() >= counts.size:
            raise SelectionError(f"{where}: source {s} has {counts.size} shard(s), a pick names shard "
                                 f"{int(mine[:, 1].max())}")
        bad = mine[:, 2] >= counts[mine[:, 1]]
        if bad.any():
            sh, rec = (int(v) for v in mine[bad][0, 1:])
            raise SelectionError(f"{where}: source {s} shard {sh} holds {int(counts[sh])} records, "
                                 f"a pick names record {rec}")


def read_selection(path: str | os.PathLike) -> Selection:
    """Reads and checks a selection: format, picks checksum, each source's manifest checksum and sizes."""
    p = Path(path)
    if not p.is_file():
        raise SelectionError(f"no selection manifest at {p}")
    try:
        header = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SelectionError(f"{p} is not JSON: {e}") from None
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise SelectionError(f"{p} is not an {FORMAT} v{VERSION} manifest "
                             f"(format={header.get('format')!r}, version={header.get('version')!r})")
    picks_name = header.get("picks_file", "")
    if not picks_name or os.path.basename(picks_name) != picks_name:
        raise SelectionError(f"{p}: picks_file must be a bare file name beside the manifest, got {picks_name!r}")
    picks_path = p.with_name(picks_name)
    if not picks_path.is_file():
        raise SelectionError(f"{p} names {picks_name}, which is missing")
    if io.sha256_file(picks_path) != header.get("picks_sha256"):
        raise SelectionError(f"{picks_path} does not match the sha256 in {p} (changed after writing)")
    picks = np.load(picks_path, allow_pickle=False)
    if picks.dtype != np.int64:
        raise SelectionError(f"{picks_path} holds {picks.dtype}, expected int64")
    manifests, shard_paths = [], []
    for i, src in enumerate(header.get("sources", [])):
        meta, sha = _read_raw_manifest(src["dir"])
        if sha != src.get("manifest_sha256"):
            raise SelectionError(f"{p}: source {i} ({src['dir']}) changed since the selection was made "
                                 "(manifest sha256 differs)")
        manifests.append(meta)
        shard_paths.append([os.path.join(src["dir"], sh["file"]) for sh in meta.get("shards", [])])
    if picks.shape[0:1] != (int(header.get("num_picks", -1)),):
        raise SelectionError(f"{p}: num_picks {header.get('num_picks')} but {picks_path} holds {picks.shape[0]}")
    _check_picks(picks, manifests, str(p))
    return Selection(sources=header["sources"], picks=picks, shard_paths=shard_paths,
                     producer=header.get("producer", {}))

"""Offline, parallel, deterministic packing of raw samples into bins (the I/O and the CLI around the pure
planner `ovjax.data.plan`).

    python -m ovjax pack --input RAW_DIR_OR_GLOB_OR_SELECTION.json --out PACKED_DIR --seq-len 8192 \
        --max-patches 32768 --max-segments 64 --max-images 64 --seed 0 --workers 8
    python -m ovjax pack --plan-only --lengths LENGTHS.txt --seq-len 8192 --out PLAN.jsonl

Input: a converted raw directory (its manifest's shards, every record once), a glob of raw shards, or a
selection manifest (`ovjax.data.selection`: exactly the picked records, in pick order, repeats included).
Lengths are read from the records by worker processes; the plan depends only on the lengths and the seed
(never on the worker count or on which worker finishes first), so the same inputs and seed give
byte-identical packed shards. Samples that are not valid records or do not fit a bin alone are rejected to
rejects.jsonl with their reason (duplicate ids are rejected once, earlier, by `ovjax.data.convert`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob as globlib
import json
import math
import os
import sys
import time
from typing import Sequence

import numpy as np

from ovjax.data import io, schema, selection
from ovjax.data.plan import (Budgets, PackError, Plan, check_plan, plan_bins, plan_stats,  # noqa: F401 (API)
                             reject_reasons)

MANIFEST_FORMAT = "ovjax-packed"
ALGORITHM = "best-fit/v1"
REASON_INVALID = "invalid_record"
_CHUNK = 2048  # records per length task


def _log(msg: str) -> None:
    print(f"[pack] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- lengths file


def read_lengths_file(path: str) -> tuple[list[str], np.ndarray, list[tuple[int, str, str]]]:
    """Parse the upstream `name:length` format. Returns (names, lengths int64 [N], bad lines).

    bad lines: (line number from 1, line text, why). A name may itself contain ':' (split at the last).
    """
    names: list[str] = []
    lengths: list[int] = []
    bad: list[tuple[int, str, str]] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            name, sep, value = line.rpartition(":")
            name, value = name.strip(), value.strip()
            if not line.strip():
                why = "empty line"
            elif not sep:
                why = "no ':' separator"
            elif not name:
                why = "empty name"
            elif not (value.isascii() and value.isdigit()):
                why = f"length {value!r} is not a non-negative integer"
            elif int(value) <= 0:
                why = "length must be positive"
            elif name in seen:
                why = f"duplicate name (first on line {seen[name]})"
            else:
                seen[name] = lineno
                names.append(name)
                lengths.append(int(value))
                continue
            bad.append((lineno, line[:200], why))
    return names, np.asarray(lengths, dtype=np.int64), bad


def plan_only(lengths_path: str, out_path: str, budgets: Budgets, *, seed: int = 0,
              skip_bad_lines: bool = False) -> dict:
    """Lengths-only mode: write one bin per line {"names": [...], "tokens": n}; returns the summary.

    Samples longer than seq_len are rejected and counted (and listed in the summary file
    `<out>.manifest.json`); bad lines raise PackError unless `skip_bad_lines`.
    """
    names, lengths, bad = read_lengths_file(lengths_path)
    if bad:
        for lineno, text, why in bad[:20]:
            _log(f"{lengths_path}:{lineno}: {why}: {text!r}")
        if len(bad) > 20:
            _log(f"... {len(bad) - 20} more bad lines")
        if not skip_bad_lines:
            raise PackError(f"{len(bad)} bad line(s) in {lengths_path} (first: line {bad[0][0]}: {bad[0][2]}); "
                            "fix them or pass --skip-bad-lines")
    zeros = np.zeros_like(lengths)
    reasons = reject_reasons(lengths, zeros, zeros, budgets)
    keep = np.flatnonzero(reasons == None)  # noqa: E711
    t0 = time.perf_counter()
    plan = plan_bins(lengths[keep], budgets=budgets, seed=seed)
    seconds = time.perf_counter() - t0
    check_plan(plan, lengths[keep], None, None, budgets)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        for b in plan.bins():
            idx = keep[b]
            f.write(json.dumps({"names": [names[i] for i in idx], "tokens": int(lengths[idx].sum())}) + "\n")
    rejected = [{"name": names[i], "length": int(lengths[i]), "reason": reasons[i]}
                for i in np.flatnonzero(reasons != None)]  # noqa: E711
    summary = {
        "mode": "plan-only", "lengths_file": os.path.abspath(lengths_path), "out": os.path.abspath(out_path),
        "budgets": budgets.as_dict(), "seed": seed, "lines_bad": len(bad),
        "bad_lines": [{"line": ln, "text": t, "why": w} for ln, t, w in bad],
        "samples_in": len(names), "samples_packed": len(keep), "samples_rejected": len(rejected),
        "rejected_by_reason": dict(sorted(collections.Counter(r["reason"] for r in rejected).items())),
        "rejected": rejected,
        "plan_seconds": seconds, "stats": plan_stats(plan, lengths[keep], None, None, budgets),
    }
    with open(out_path + ".manifest.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary



# ----------------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Inputs:
    """What to pack: refs[i] = (shard, record) of input sample i, into `paths` (one row per sample packed)."""

    spec: str
    paths: list[str]
    counts: list[int]            # records per shard
    refs: np.ndarray             # int64 [N, 2]
    manifest: str | None = None  # the raw directory's manifest.json
    selection: str | None = None  # the selection manifest read instead


def resolve_inputs(spec: str) -> Inputs:
    """A raw directory (complete `convert` manifest; shards in manifest order, record counts checked), a
    selection manifest (its picks, in order), or a glob of shards (sorted)."""
    if selection.is_selection(spec):
        try:
            sel = selection.read_selection(spec)
        except selection.SelectionError as e:
            raise PackError(str(e)) from None
        paths = [p for source in sel.shard_paths for p in source]
        first = np.cumsum([0] + [len(source) for source in sel.shard_paths])[:-1]
        refs = np.stack([first[sel.picks[:, 0]] + sel.picks[:, 1], sel.picks[:, 2]], axis=1).astype(np.int64)
        return Inputs(spec, paths, [io.num_records(p) for p in paths], refs, selection=spec)
    manifest = None
    if os.path.isdir(spec):
        meta, manifest = io.read_complete_manifest(spec, PackError)
        if not meta.get("shards"):
            raise PackError(f"{manifest} lists no shards")
        paths = []
        for s in meta["shards"]:
            path = os.path.join(spec, s["file"])
            if not os.path.exists(path):
                raise PackError(f"{manifest} lists {s['file']}, which is missing")
            if "records" in s and io.num_records(path) != int(s["records"]):
                raise PackError(f"{path} holds {io.num_records(path)} records, its manifest says {s['records']}")
            paths.append(path)
    else:
        paths = sorted(globlib.glob(spec))
    if not paths:
        raise PackError(f"no ArrayRecord shards found for {spec!r}")
    counts = [io.num_records(p) for p in paths]
    refs = np.array([(s, i) for s, c in enumerate(counts) for i in range(c)], np.int64).reshape(-1, 2)
    return Inputs(spec, paths, counts, refs, manifest=manifest)


def _sample_lengths(data: bytes) -> tuple[str | None, int, int, int, int, str | None]:
    """(id, tokens, patches, images, supervised tokens, invalid-record detail) of one raw record."""
    try:
        rec = schema.validate_raw(schema.loads(data))
    except schema.RecordError as e:
        return None, 0, 0, 0, 0, str(e)
    return (rec["id"], int(rec["tokens"].shape[0]), schema.num_patches(rec), len(rec["images"]),
            int(np.count_nonzero(rec["loss_mask"])), None)


def _lengths_task(task: tuple[str, list[int]]) -> list:
    """Worker: lengths of the given records of one shard."""
    from array_record.python.array_record_module import ArrayRecordReader

    path, indices = task
    reader = ArrayRecordReader(path)
    try:
        return [_sample_lengths(d) for d in reader.read(indices)]
    finally:
        reader.close()


def _write_task(task: tuple[str, list[str], list[list[tuple[int, int]]]]) -> dict:
    """Worker: write one packed shard. bins: per bin, its samples as (input shard, record index)."""
    from array_record.python.array_record_module import ArrayRecordReader

    out_path, inputs, bins = task
    readers: dict[int, ArrayRecordReader] = {}

    def packed_records():
        for members in bins:
            recs = []
            for shard, idx in members:
                if shard not in readers:
                    readers[shard] = ArrayRecordReader(inputs[shard], io.RANDOM_ACCESS)
                recs.append(schema.loads(readers[shard].read([idx])[0]))
            yield schema.dumps(schema.make_packed(recs))
    try:
        entry = io.write_shard(out_path, packed_records())
    finally:
        for r in readers.values():
            r.close()
    return {**entry, "samples": sum(len(members) for members in bins)}


def _map(fn, tasks: list, workers: int, what: str) -> list:
    """Ordered results of fn over tasks; logs progress."""
    out, every = [], max(1, len(tasks) // 20)
    for k, r in enumerate(io.ordered_map(fn, tasks, min(workers, len(tasks))), start=1):
        out.append(r)
        if k % every == 0 or k == len(tasks):
            _log(f"{what}: {k}/{len(tasks)} tasks")
    return out


def read_lengths(inputs: Inputs, workers: int) -> list[tuple]:
    """_sample_lengths of every input sample (refs order); each distinct record is read once."""
    uniq, inverse = np.unique(inputs.refs, axis=0, return_inverse=True)
    tasks = []
    for s in np.unique(uniq[:, 0]).tolist():
        idx = uniq[uniq[:, 0] == s, 1].tolist()
        if idx and idx[-1] >= inputs.counts[s]:
            raise PackError(f"record {idx[-1]} asked of {inputs.paths[s]}, which holds {inputs.counts[s]}")
        tasks += [(inputs.paths[s], idx[a:a + _CHUNK]) for a in range(0, len(idx), _CHUNK)]
    per_record = [row for rows in _map(_lengths_task, tasks, workers, "lengths") for row in rows]
    return [per_record[i] for i in inverse.reshape(-1).tolist()]


# ----------------------------------------------------------------------------------------------- pack


def pack(inputs: str, out_dir: str, budgets: Budgets, *, seed: int = 0, workers: int = 1,
         bins_per_shard: int = 1024, num_shards: int | None = None, prefix: str = "packed") -> dict:
    """Pack raw samples (`resolve_inputs`) into packed shards + manifest.json + rejects.jsonl in out_dir.

    Returns the manifest. Deterministic in (inputs, budgets, seed, shard count); `workers` only changes speed.
    """
    t_start = time.perf_counter()
    src = resolve_inputs(inputs)
    io.refuse_existing(out_dir, prefix, PackError)
    os.makedirs(out_dir, exist_ok=True)
    n = len(src.refs)
    _log(f"{len(src.paths)} input shard(s), {sum(src.counts)} records, {n} samples to pack, {workers} worker(s)")
    lengths = read_lengths(src, workers)
    tok, pat, img, sup = (np.array([row[k] for row in lengths], np.int64).reshape(n) for k in (1, 2, 3, 4))
    reasons = reject_reasons(tok, pat, img, budgets)
    invalid = np.array([row[5] is not None for row in lengths], bool).reshape(n)
    reasons[invalid] = REASON_INVALID
    keep = np.flatnonzero(reasons == None)  # noqa: E711
    t_lengths = time.perf_counter() - t_start

    t0 = time.perf_counter()
    plan = plan_bins(tok[keep], pat[keep], img[keep], budgets=budgets, seed=seed)
    check_plan(plan, tok[keep], pat[keep], img[keep], budgets)
    t_plan = time.perf_counter() - t0
    stats = plan_stats(plan, tok[keep], pat[keep], img[keep], budgets)
    _log(f"plan: {plan.num_bins} bins for {len(keep)} samples in {t_plan:.2f}s, "
         f"token fill {stats['token_fill'] or 0:.4f}, bins/lower bound {stats['bins_over_lower_bound'] or 0:.4f}")

    nb = plan.num_bins
    n_shards = num_shards if num_shards is not None else max(1, math.ceil(nb / bins_per_shard))
    if n_shards < 1:
        raise PackError("num_shards must be >= 1")
    bounds = np.linspace(0, nb, n_shards + 1).round().astype(np.int64)
    refs = src.refs.tolist()
    bins = [[tuple(refs[g]) for g in keep[b].tolist()] for b in plan.bins()]
    write_tasks = [(os.path.join(out_dir, io.shard_name(prefix, s, n_shards)), src.paths, bins[bounds[s]:bounds[s + 1]])
                   for s in range(n_shards)]
    t0 = time.perf_counter()
    shards = _map(_write_task, write_tasks, workers, "write")
    t_write = time.perf_counter() - t0

    rejected = np.flatnonzero(reasons != None)  # noqa: E711
    with io.RejectLog(os.path.join(out_dir, io.REJECTS_FILE)) as rejects:
        for g in rejected.tolist():
            shard, index = refs[g]
            name = os.path.basename(src.paths[shard])
            rejects.add(reasons[g], id=lengths[g][0] or f"{name}#{index}", shard=name, index=index,
                        tokens=int(tok[g]), patches=int(pat[g]), images=int(img[g]), detail=lengths[g][5] or "")
    manifest = {
        "format": MANIFEST_FORMAT, "schema_version": schema.PACKED_VERSION, "status": "complete",
        "inputs": {"spec": inputs, "manifest": src.manifest,
                   "manifest_sha256": io.sha256_file(src.manifest) if src.manifest else None,
                   "shards": [{"file": p, "records": c} for p, c in zip(src.paths, src.counts)]},
        "parameters": {**budgets.as_dict(), "num_shards": n_shards, "prefix": prefix,
                       "writer_options": io.WRITER_OPTIONS, "algorithm": ALGORITHM, "order": plan.strategy},
        "seed": seed,
        "counts": {"samples_in": n, "samples_packed": int(len(keep)), "samples_rejected": int(len(rejected)),
                   "bins": nb, "tokens": stats["tokens"], "patches": stats["patches"], "images": stats["images"],
                   "supervised_tokens": int(sup[keep].sum())},
        "rejected_by_reason": rejects.by_reason(),
        "rejects_file": io.REJECTS_FILE,
        "stats": stats,
        "shards": shards,
        "seconds": {"lengths": t_lengths, "plan": t_plan, "write": t_write,
                    "total": time.perf_counter() - t_start},
    }
    if src.selection:
        manifest["inputs"].update(selection=os.path.abspath(src.selection),
                                  selection_sha256=io.sha256_file(src.selection))
    io.write_json(os.path.join(out_dir, io.MANIFEST), manifest, indent=1, newline=False)
    _log(f"wrote {nb} bins in {n_shards} shard(s) to {out_dir}; rejected {len(rejected)} "
         f"{manifest['rejected_by_reason']}")
    return manifest


# ----------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovjax pack", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="directory of raw shards with manifest.json, a glob of .array_record files, "
                   "or a selection manifest (.json, see ovjax.data.selection)")
    p.add_argument("--out", required=True, help="output directory (or PLAN.jsonl with --plan-only)")
    p.add_argument("--seq-len", type=int, default=8192, help="tokens per bin (default 8192)")
    p.add_argument("--max-patches", type=int, default=None,
                   help="ViT patches per bin (default 4*seq_len; 0 = unlimited)")
    p.add_argument("--max-segments", type=int, default=None,
                   help="samples per bin (default 64; with --plan-only default unlimited; 0 = unlimited)")
    p.add_argument("--max-images", type=int, default=None,
                   help="images per bin (default 64; 0 = unlimited)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="processes for lengths and writing (does not change the output)")
    p.add_argument("--bins-per-shard", type=int, default=1024)
    p.add_argument("--num-shards", type=int, default=None, help="output shards (default bins/bins-per-shard)")
    p.add_argument("--prefix", default="packed")
    p.add_argument("--plan-only", action="store_true", help="pack a lengths file into a JSONL plan")
    p.add_argument("--lengths", help="with --plan-only: file of `name:length` lines")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="with --plan-only: report bad lines and go on instead of failing")
    return p


def _opt(v: int | None, default: int | None) -> int | None:
    if v is None:
        return default
    return None if v == 0 else v


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.plan_only:
            if not args.lengths:
                raise PackError("--plan-only needs --lengths FILE")
            budgets = Budgets(args.seq_len, max_segments=_opt(args.max_segments, None))
            s = plan_only(args.lengths, args.out, budgets, seed=args.seed, skip_bad_lines=args.skip_bad_lines)
            st = s["stats"]
            _log(f"{s['samples_packed']} samples -> {st['bins']} bins (token lower bound "
                 f"{st['lower_bound_bins']['tokens']}), fill {st['token_fill'] or 0:.4f}, rejected "
                 f"{s['rejected_by_reason']}, bad lines {s['lines_bad']}; wrote {args.out}")
            return 0
        if not args.input:
            raise PackError("--input is required (or use --plan-only --lengths FILE)")
        budgets = Budgets(args.seq_len, max_patches=_opt(args.max_patches, 4 * args.seq_len),
                          max_segments=_opt(args.max_segments, 64), max_images=_opt(args.max_images, 64))
        pack(args.input, args.out, budgets, seed=args.seed, workers=args.workers,
             bins_per_shard=args.bins_per_shard, num_shards=args.num_shards, prefix=args.prefix)
        return 0
    except (PackError, schema.RecordError, OSError) as e:
        print(f"pack: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

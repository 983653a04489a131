"""Offline, parallel, deterministic packing of raw samples into bins of four budgets.

    python -m ovjax pack --input RAW_DIR_OR_GLOB --out PACKED_DIR --seq-len 8192 --max-patches 32768 \
        --max-segments 64 --max-images 64 --seed 0 --workers 8
    python -m ovjax pack --plan-only --lengths LENGTHS.txt --seq-len 8192 --out PLAN.jsonl

A bin holds at most `seq_len` tokens, `max_patches` ViT patches, `max_segments` samples and `max_images`
images. Lengths are read from the raw records by worker processes; the plan depends only on the lengths and
the seed (never on the worker count or on which worker finishes first), so the same inputs and seed give
byte-identical packed shards.

Algorithm (`plan_bins`): best fit over exact-length buckets, in two item orders.
  * Primary resource: tokens, or patches when the patch lower bound is the higher one (max_patches
    below ~4*seq_len with image-heavy data); the other one is the secondary resource.
  * Items are shuffled with the seed, then stably sorted by (primary, secondary) descending: buckets
    of equal length, visited longest first, in a seeded order inside each bucket.
  * Each item goes to the open bin whose remaining primary space is the smallest that still holds it,
    among bins that also have room for its secondary size, its images and one more segment. Open bins
    sit in one list per remaining space with a bitmap over 0..capacity (a Python int), so the query
    "smallest space >= length" is one shift and one lowest-bit; image items look only at bins in
    secondary-space classes that can hold them (8 classes), so bins out of patches but not of tokens
    are never tried again and again. A bin out of space or out of segments leaves the index.
  * Decreasing order fills bins almost perfectly when tokens bind (large items open bins, the tail of
    short ones fills the gaps) but not when a count binds (max_segments, max_images): then the short
    tail crowds bins capped by count. So when the decreasing plan is more than 0.2% above the lower
    bound, the same best fit is run on the seeded random order too, and the plan with fewer bins wins.
  * The bins are written in a seeded shuffled order; samples inside a bin in packing order.

Lower bounds reported: tokens ceil(sum tokens / seq_len), patches ceil(sum patches / max_patches),
segments ceil(n / max_segments), images ceil(sum images / max_images).
Padding compression = padding tokens when every sample is padded alone to seq_len (n*seq_len - tokens)
divided by padding tokens in the packed bins (bins*seq_len - tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob as globlib
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Iterable, Sequence

import numpy as np

from ovjax.data import schema

WRITER_OPTIONS = "group_size:1"
MANIFEST_FORMAT = "ovjax-packed"
ALGORITHM = "best-fit/v1"
REJECTS_FILE = "rejects.jsonl"
_RANDOM_ACCESS = "readahead_buffer_size:0,max_parallelism:0"
_CHUNK = 2048  # records per length task
_UNLIMITED = 1 << 62

REASON_EMPTY = "empty"
REASON_TOKENS = "too_many_tokens"
REASON_PATCHES = "too_many_patches"
REASON_IMAGES = "too_many_images"
REASON_INVALID = "invalid_record"
REASON_DUPLICATE = "duplicate_id"


class PackError(ValueError):
    """Bad input or arguments for packing."""


def _log(msg: str) -> None:
    print(f"[pack] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- budgets


@dataclasses.dataclass(frozen=True)
class Budgets:
    """Per-bin limits. None means unlimited (only `seq_len` is mandatory)."""

    seq_len: int
    max_patches: int | None = None
    max_segments: int | None = None
    max_images: int | None = None

    def __post_init__(self):
        for name in ("seq_len", "max_patches", "max_segments", "max_images"):
            v = getattr(self, name)
            if v is None and name == "seq_len":
                raise PackError("seq_len is required")
            if v is not None and (not isinstance(v, (int, np.integer)) or v <= 0):
                raise PackError(f"{name} must be a positive integer, got {v!r}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def reject_reasons(tokens, patches, images, budgets: Budgets) -> np.ndarray:
    """First failing budget of each sample alone: object [N] of reason str, or None when it fits.

    tokens, patches, images: int [N].
    """
    tokens, patches, images = (np.asarray(a, dtype=np.int64) for a in (tokens, patches, images))
    out = np.full(tokens.shape, None, dtype=object)
    checks = [(tokens <= 0, REASON_EMPTY), (tokens > budgets.seq_len, REASON_TOKENS)]
    if budgets.max_patches is not None:
        checks.append((patches > budgets.max_patches, REASON_PATCHES))
    if budgets.max_images is not None:
        checks.append((images > budgets.max_images, REASON_IMAGES))
    for bad, reason in reversed(checks):  # reversed so the first check wins
        out[bad] = reason
    return out


# ----------------------------------------------------------------------------------------------- planner


@dataclasses.dataclass
class Plan:
    """Bins as CSR: bin b holds items[offsets[b]:offsets[b+1]] (indices into the planner's inputs)."""

    items: np.ndarray    # int64 [N]
    offsets: np.ndarray  # int64 [B+1]
    strategy: str = ""   # item order that won: "decreasing" or "random"

    @property
    def num_bins(self) -> int:
        return len(self.offsets) - 1

    def bins(self) -> list[np.ndarray]:
        return [self.items[self.offsets[b]:self.offsets[b + 1]] for b in range(self.num_bins)]

    def permuted(self, perm: np.ndarray) -> "Plan":
        """Bins reordered so that new bin k is old bin perm[k]."""
        sizes = np.diff(self.offsets)[perm]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        items = (np.concatenate([self.items[self.offsets[b]:self.offsets[b + 1]] for b in perm])
                 if len(perm) else self.items[:0])
        return Plan(items.astype(np.int64), offsets, self.strategy)


def plan_bins(tokens, patches=None, images=None, *, budgets: Budgets, seed: int = 0,
              candidates: int = 4, shuffle_bins: bool = True, retry_above: float = 0.002) -> Plan:
    """Pack items into bins within all budgets (see the module docstring for the algorithm).

    tokens, patches, images: int [N] per item (patches/images default to 0). Every item must fit a bin
    alone (filter with `reject_reasons` first). Returns a Plan over indices 0..N-1; the bin order is
    shuffled with `seed` when `shuffle_bins`.
    """
    tok = np.asarray(tokens, dtype=np.int64)
    n = len(tok)
    pat = np.zeros(n, np.int64) if patches is None else np.asarray(patches, dtype=np.int64)
    img = np.zeros(n, np.int64) if images is None else np.asarray(images, dtype=np.int64)
    if pat.shape != (n,) or img.shape != (n,):
        raise PackError(f"tokens, patches, images must all be [N]; got {tok.shape}, {pat.shape}, {img.shape}")
    bad = reject_reasons(tok, pat, img, budgets)
    if n and (bad != None).any():  # noqa: E711 (object array comparison)
        k = int(np.flatnonzero(bad != None)[0])  # noqa: E711
        raise PackError(f"item {k} does not fit a bin alone ({bad[k]}); filter with reject_reasons first")
    if candidates < 1:
        raise PackError("candidates must be >= 1")
    # Best fit on the resource that binds overall (tokens unless the patch lower bound is higher).
    size_a, cap_a, size_b, cap_b = tok, budgets.seq_len, pat, budgets.max_patches
    if cap_b is not None and int(pat.sum()) * cap_a > int(tok.sum()) * cap_b:
        size_a, cap_a, size_b, cap_b = pat, cap_b, tok, cap_a
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    args = (size_a.tolist(), size_b.tolist(), img.tolist(), cap_a, cap_b or _UNLIMITED,
            budgets.max_segments or _UNLIMITED, budgets.max_images or _UNLIMITED, candidates)
    order = perm[np.lexsort((-size_b[perm], -size_a[perm]))]
    bin_of = _best_fit_decreasing(order.tolist(), *args)
    strategy = "decreasing"
    lower = _lower_bound(tok, pat, img, budgets)
    if n and max(bin_of) + 1 > lower * (1 + retry_above):
        # Count budgets (segments, images) or two binding resources: decreasing order puts a few large
        # items in each early bin and leaves the short tail crowding bins capped by count; the seeded
        # random order mixes sizes in every bin. Keep whichever needs fewer bins.
        bin_of_random = _best_fit_decreasing(perm.tolist(), *args)
        if max(bin_of_random) < max(bin_of):
            order, bin_of, strategy = perm, bin_of_random, "random"
    bin_of = np.asarray(bin_of, dtype=np.int64)
    num_bins = int(bin_of.max()) + 1 if n else 0
    by_bin = np.argsort(bin_of, kind="stable")
    plan = Plan(order[by_bin].astype(np.int64),
                np.concatenate([[0], np.cumsum(np.bincount(bin_of, minlength=num_bins))]).astype(np.int64),
                strategy)
    if shuffle_bins:
        plan = plan.permuted(np.random.default_rng([seed, 1]).permutation(num_bins))
    return plan


def _lower_bound(tok: np.ndarray, pat: np.ndarray, img: np.ndarray, budgets: Budgets) -> int:
    """Bins no plan can beat: max over the four budgets of ceil(total / per-bin budget)."""
    lb = math.ceil(int(tok.sum()) / budgets.seq_len)
    for total, cap in ((int(pat.sum()), budgets.max_patches), (len(tok), budgets.max_segments),
                       (int(img.sum()), budgets.max_images)):
        if cap is not None:
            lb = max(lb, math.ceil(total / cap))
    return lb


def _best_fit_decreasing(order: list[int], size_a: list[int], size_b: list[int], img: list[int],
                         A: int, B: int, S: int, I: int, K: int, Q: int = 8) -> list[int]:
    """Bin id of each position of `order` (items visited in that order). Pure Python on lists: speed.

    a is the primary resource (capacity A, best fit on it), b the secondary one (capacity B), plus at
    most S items and I images per bin. Open bins sit in lists keyed by remaining primary space r, with
    bitmaps (Python ints, bit r set <=> some list at r is non-empty) so that "smallest r >= a" is one
    shift and one lowest-bit:
      plain index: bins with primary space and a free segment, for items with b == 0 and no image;
      class index: bins with a free segment, a free image slot and secondary space, split into Q
      classes by remaining secondary space; bitmap c covers classes >= c (with per-r counts), so an
      item asks the bitmap of the lowest class that can hold its b, and only bins of that lowest class
      need an exact check. Without the classes, bins out of b but not out of a would be tried, and
      rejected, by every later item. After K failed exact checks the item stops looking at the
      lowest class.
    """
    free_u: list[list[int]] = [[] for _ in range(A + 1)]
    mask_u = 0
    free_c: list[list[list[int]]] = [[[] for _ in range(A + 1)] for _ in range(Q)]
    count_ge: list[list[int]] = [[0] * (A + 1) for _ in range(Q)]  # bins in classes >= c at r
    mask_ge = [0] * Q
    rem_a: list[int] = []
    rem_b: list[int] = []
    n_items: list[int] = []
    n_img: list[int] = []
    pos_u: list[int] = []  # slot of the bin in its plain-index list, -1 if not indexed
    pos_c: list[int] = []  # slot in its class-index list, -1 if not indexed
    cls_c: list[int] = []  # class of the bin in the class index
    qdiv = B + 1
    bin_of = [0] * len(order)
    for pos, i in enumerate(order):
        a = size_a[i]
        sb = size_b[i]
        m = img[i]
        b = -1
        if sb == 0 and m == 0:
            x = mask_u >> a
            if x:
                b = free_u[a + (x & -x).bit_length() - 1][-1]
        else:
            c0 = sb * Q // qdiv
            failures = 0
            r = a - 1
            while c0 < Q:
                x = mask_ge[c0] >> (r + 1)
                if not x:
                    break
                r += (x & -x).bit_length()
                lst = free_c[c0][r]  # lowest class: exact check
                for j in range(len(lst) - 1, -1, -1):
                    cand = lst[j]
                    if rem_b[cand] >= sb and n_img[cand] + m <= I:
                        b = cand
                        break
                    failures += 1
                    if failures >= K:
                        break
                if b >= 0:
                    break
                if m <= 1:  # higher classes at r: secondary fits, an image slot is free
                    for c in range(c0 + 1, Q):
                        lst = free_c[c][r]
                        if lst:
                            b = lst[-1]
                            break
                else:
                    for c in range(c0 + 1, Q):
                        for cand in free_c[c][r]:
                            if n_img[cand] + m <= I:
                                b = cand
                                break
                        if b >= 0:
                            break
                if b >= 0:
                    break
                if failures >= K:
                    c0 += 1
                    failures = 0
                    r -= 1  # look at this r again without the lowest class
        if b < 0:
            b = len(rem_a)
            rem_a.append(A)
            rem_b.append(B)
            n_items.append(0)
            n_img.append(0)
            pos_u.append(-1)
            pos_c.append(-1)
            cls_c.append(0)
        else:  # take b out of both indexes (swap-remove, fixing the moved bin's slot)
            r = rem_a[b]
            j = pos_u[b]
            if j >= 0:
                lst = free_u[r]
                last = lst.pop()
                if last != b:
                    lst[j] = last
                    pos_u[last] = j
                if not lst:
                    mask_u ^= 1 << r
                pos_u[b] = -1
            j = pos_c[b]
            if j >= 0:
                c = cls_c[b]
                lst = free_c[c][r]
                last = lst.pop()
                if last != b:
                    lst[j] = last
                    pos_c[last] = j
                pos_c[b] = -1
                for cc in range(c + 1):
                    counts = count_ge[cc]
                    counts[r] -= 1
                    if not counts[r]:
                        mask_ge[cc] ^= 1 << r
        left = rem_a[b] - a
        rem_a[b] = left
        left_b = rem_b[b] - sb
        rem_b[b] = left_b
        im = n_img[b] + m
        n_img[b] = im
        cnt = n_items[b] + 1
        n_items[b] = cnt
        bin_of[pos] = b
        if cnt < S:
            if left > 0:
                lst = free_u[left]
                if not lst:
                    mask_u |= 1 << left
                pos_u[b] = len(lst)
                lst.append(b)
            if im < I and left_b > 0:
                c = left_b * Q // qdiv
                cls_c[b] = c
                lst = free_c[c][left]
                pos_c[b] = len(lst)
                lst.append(b)
                for cc in range(c + 1):
                    counts = count_ge[cc]
                    if not counts[left]:
                        mask_ge[cc] |= 1 << left
                    counts[left] += 1
    return bin_of


def plan_stats(plan: Plan, tokens, patches, images, budgets: Budgets) -> dict:
    """Fill and lower-bound numbers of a plan (JSON-ready). tokens/patches/images: int [N] per item."""
    tok = np.asarray(tokens, dtype=np.int64)
    pat = np.zeros_like(tok) if patches is None else np.asarray(patches, dtype=np.int64)
    img = np.zeros_like(tok) if images is None else np.asarray(images, dtype=np.int64)
    n, nb, T = len(tok), plan.num_bins, budgets.seq_len
    total_tok, total_pat, total_img = int(tok.sum()), int(pat.sum()), int(img.sum())
    lb = {"tokens": math.ceil(total_tok / T)}
    if budgets.max_patches:
        lb["patches"] = math.ceil(total_pat / budgets.max_patches)
    if budgets.max_segments:
        lb["segments"] = math.ceil(n / budgets.max_segments)
    if budgets.max_images:
        lb["images"] = math.ceil(total_img / budgets.max_images)
    best_lb = max(lb.values()) if n else 0
    seg = np.diff(plan.offsets)
    bin_tok = np.add.reduceat(tok[plan.items], plan.offsets[:-1]) if nb else np.zeros(0, np.int64)
    pad_unpacked = n * T - total_tok
    pad_packed = nb * T - total_tok
    return {
        "samples": n, "bins": nb, "tokens": total_tok, "patches": total_pat, "images": total_img,
        "lower_bound_bins": lb, "lower_bound_bins_max": best_lb,
        "bins_over_token_lower_bound": nb / lb["tokens"] if lb["tokens"] else None,
        "bins_over_lower_bound": nb / best_lb if best_lb else None,
        "token_fill": total_tok / (nb * T) if nb else None,
        "patch_fill": total_pat / (nb * budgets.max_patches) if nb and budgets.max_patches else None,
        "padding_tokens_if_unpacked": pad_unpacked,
        "padding_tokens_packed": pad_packed,
        "padding_compression": pad_unpacked / pad_packed if pad_packed else None,
        "padding_compression_definition": "(samples*seq_len - tokens) / (bins*seq_len - tokens): padding "
                                          "tokens when each sample is padded alone to seq_len, over padding "
                                          "tokens in the packed bins",
        "rows_compression": n / nb if nb else None,
        "segments_per_bin_mean": float(seg.mean()) if nb else None,
        "segments_per_bin_max": int(seg.max()) if nb else None,
        "bins_full_fraction": float((bin_tok == T).mean()) if nb else None,
    }


def check_plan(plan: Plan, tokens, patches, images, budgets: Budgets) -> None:
    """Raise PackError unless every item is in exactly one bin and every bin is within all budgets."""
    tok = np.asarray(tokens, dtype=np.int64)
    n = len(tok)
    pat = np.zeros(n, np.int64) if patches is None else np.asarray(patches, dtype=np.int64)
    img = np.zeros(n, np.int64) if images is None else np.asarray(images, dtype=np.int64)
    if not np.array_equal(np.sort(plan.items), np.arange(n)):
        raise PackError("plan does not hold every item exactly once")
    if plan.num_bins == 0:
        return
    starts = plan.offsets[:-1]
    if (np.diff(plan.offsets) <= 0).any():
        raise PackError("plan has an empty bin")
    for name, vals, cap in (("tokens", tok, budgets.seq_len), ("patches", pat, budgets.max_patches),
                            ("images", img, budgets.max_images)):
        if cap is not None and (np.add.reduceat(vals[plan.items], starts) > cap).any():
            raise PackError(f"a bin exceeds its {name} budget {cap}")
    if budgets.max_segments is not None and (np.diff(plan.offsets) > budgets.max_segments).any():
        raise PackError(f"a bin exceeds max_segments {budgets.max_segments}")


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
        "rejected_by_reason": _count_reasons(r["reason"] for r in rejected), "rejected": rejected,
        "plan_seconds": seconds, "stats": plan_stats(plan, lengths[keep], None, None, budgets),
    }
    with open(out_path + ".manifest.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    return summary


def _count_reasons(reasons: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        out[r] = out.get(r, 0) + 1
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------- shards


def resolve_inputs(spec: str) -> tuple[list[str], str | None]:
    """Shard paths of a raw set and its manifest.json path (None for a glob).

    A directory must hold a complete `ovjax.data.convert` manifest; its shards are taken in manifest
    order and their record counts checked. A glob is expanded and sorted.
    """
    if os.path.isdir(spec):
        manifest = os.path.join(spec, "manifest.json")
        if not os.path.exists(manifest):
            raise PackError(f"{spec} is a directory without manifest.json; pass a glob of shards instead")
        with open(manifest, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("status", "complete") != "complete":
            raise PackError(f"{manifest} has status {meta.get('status')!r} (conversion did not complete)")
        if not meta.get("shards"):
            raise PackError(f"{manifest} lists no shards")
        paths = []
        for s in meta["shards"]:
            path = os.path.join(spec, s["file"])
            if not os.path.exists(path):
                raise PackError(f"{manifest} lists {s['file']}, which is missing")
            if "records" in s and _num_records(path) != int(s["records"]):
                raise PackError(f"{path} holds {_num_records(path)} records, its manifest says {s['records']}")
            paths.append(path)
    else:
        manifest = None
        paths = sorted(globlib.glob(spec))
    if not paths:
        raise PackError(f"no ArrayRecord shards found for {spec!r}")
    return paths, manifest


def _sample_lengths(data: bytes) -> tuple[str | None, int, int, int, int, str | None]:
    """(id, tokens, patches, images, supervised tokens, invalid-record detail) of one raw record."""
    try:
        rec = schema.validate_raw(schema.loads(data))
    except schema.RecordError as e:
        return None, 0, 0, 0, 0, str(e)
    return (rec["id"], int(rec["tokens"].shape[0]), schema.num_patches(rec), len(rec["images"]),
            int(np.count_nonzero(rec["loss_mask"])), None)


def _lengths_task(task: tuple[int, str, int, int]) -> tuple[int, list]:
    """Worker: lengths of records [start, stop) of one shard."""
    from array_record.python.array_record_module import ArrayRecordReader

    shard, path, start, stop = task
    reader = ArrayRecordReader(path)
    try:
        out = [_sample_lengths(d) for d in reader.read(start, stop)]
    finally:
        reader.close()
    return shard, out


def _num_records(path: str) -> int:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path, _RANDOM_ACCESS)
    try:
        return int(reader.num_records())
    finally:
        reader.close()


def _pool(workers: int):
    # spawn: the parent may hold threads (jax, grain) that fork would copy in a broken state.
    return multiprocessing.get_context("spawn").Pool(workers)


def _map(fn, tasks: list, workers: int, what: str) -> list:
    """Ordered results of fn over tasks, in-process when workers <= 1. Logs progress."""
    out = []
    every = max(1, len(tasks) // 20)
    pool = _pool(workers) if workers > 1 and len(tasks) > 1 else None
    try:
        results = pool.imap(fn, tasks) if pool else map(fn, tasks)
        for k, r in enumerate(results, start=1):
            out.append(r)
            if k % every == 0 or k == len(tasks):
                _log(f"{what}: {k}/{len(tasks)} tasks")
    finally:
        if pool:
            pool.close()
            pool.join()
    return out


def _write_task(task: tuple[str, list[str], list[list[tuple[int, int]]]]) -> dict:
    """Worker: write one packed shard. bins: per bin, its samples as (input shard, record index)."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    out_path, inputs, bins = task
    readers: dict[int, ArrayRecordReader] = {}
    tmp = out_path + ".tmp"
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    samples = 0
    try:
        for members in bins:
            recs = []
            for shard, idx in members:
                if shard not in readers:
                    readers[shard] = ArrayRecordReader(inputs[shard], _RANDOM_ACCESS)
                recs.append(schema.loads(readers[shard].read([idx])[0]))
            writer.write(schema.dumps(schema.make_packed(recs)))
            samples += len(recs)
    finally:
        writer.close()
        for r in readers.values():
            r.close()
    os.replace(tmp, out_path)
    return {"file": os.path.basename(out_path), "records": len(bins), "samples": samples,
            "bytes": os.path.getsize(out_path), "sha256": _sha256(out_path)}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pack(inputs: str, out_dir: str, budgets: Budgets, *, seed: int = 0, workers: int = 1,
         bins_per_shard: int = 1024, num_shards: int | None = None, prefix: str = "packed") -> dict:
    """Pack raw ArrayRecord shards into packed shards + manifest.json + rejected.jsonl in out_dir.

    Returns the manifest. Deterministic in (inputs, budgets, seed, shard count); `workers` only changes speed.
    """
    t_start = time.perf_counter()
    paths, in_manifest = resolve_inputs(inputs)
    if os.path.exists(os.path.join(out_dir, "manifest.json")):
        raise PackError(f"{out_dir} already holds a packed set (manifest.json); choose a new --out")
    os.makedirs(out_dir, exist_ok=True)
    counts = [_num_records(p) for p in paths]
    _log(f"{len(paths)} input shard(s), {sum(counts)} records, {workers} worker(s)")

    tasks = [(s, p, a, min(a + _CHUNK, c)) for s, (p, c) in enumerate(zip(paths, counts))
             for a in range(0, c, _CHUNK)]
    results = _map(_lengths_task, tasks, workers, "lengths")
    shard_of, index_of, ids, tok, pat, img, sup, reasons = [], [], [], [], [], [], [], []
    invalid_detail: dict[int, str] = {}
    seen: dict[str, int] = {}
    for (shard, rows), (_, _, start, _) in zip(results, tasks):
        for k, (sid, t, p, m, s, invalid) in enumerate(rows):
            g = len(ids)
            shard_of.append(shard)
            index_of.append(start + k)
            tok.append(t)
            pat.append(p)
            img.append(m)
            sup.append(s)
            if invalid is not None:
                ids.append(f"{os.path.basename(paths[shard])}#{start + k}")
                reasons.append(REASON_INVALID)
                invalid_detail[g] = invalid
            elif sid in seen:
                ids.append(sid)
                reasons.append(REASON_DUPLICATE)
            else:
                seen[sid] = g
                ids.append(sid)
                reasons.append(None)
    tok_a, pat_a, img_a = (np.asarray(a, dtype=np.int64) for a in (tok, pat, img))
    budget_reasons = reject_reasons(tok_a, pat_a, img_a, budgets)
    reasons_a = np.asarray(reasons, dtype=object)
    reasons_a = np.where(reasons_a == None, budget_reasons, reasons_a)  # noqa: E711
    keep = np.flatnonzero(reasons_a == None)  # noqa: E711
    t_lengths = time.perf_counter() - t_start

    t0 = time.perf_counter()
    plan = plan_bins(tok_a[keep], pat_a[keep], img_a[keep], budgets=budgets, seed=seed)
    check_plan(plan, tok_a[keep], pat_a[keep], img_a[keep], budgets)
    t_plan = time.perf_counter() - t0
    stats = plan_stats(plan, tok_a[keep], pat_a[keep], img_a[keep], budgets)
    _log(f"plan: {plan.num_bins} bins for {len(keep)} samples in {t_plan:.2f}s, "
         f"token fill {stats['token_fill'] or 0:.4f}, bins/lower bound {stats['bins_over_lower_bound'] or 0:.4f}")

    nb = plan.num_bins
    n_shards = num_shards if num_shards is not None else max(1, math.ceil(nb / bins_per_shard))
    if n_shards < 1:
        raise PackError("num_shards must be >= 1")
    bounds = np.linspace(0, nb, n_shards + 1).round().astype(np.int64)
    bins = [[(shard_of[g], index_of[g]) for g in keep[b].tolist()] for b in plan.bins()]
    write_tasks = [(os.path.join(out_dir, f"{prefix}-{s:05d}-of-{n_shards:05d}.array_record"), paths,
                    bins[bounds[s]:bounds[s + 1]]) for s in range(n_shards)]
    t0 = time.perf_counter()
    shards = _map(_write_task, write_tasks, workers, "write")
    t_write = time.perf_counter() - t0

    rejected = np.flatnonzero(reasons_a != None)  # noqa: E711
    with open(os.path.join(out_dir, REJECTS_FILE), "w", encoding="utf-8") as f:
        for g in rejected.tolist():
            f.write(json.dumps({"id": ids[g], "reason": reasons_a[g], "shard": os.path.basename(paths[shard_of[g]]),
                                "index": index_of[g], "tokens": tok[g], "patches": pat[g], "images": img[g],
                                "detail": invalid_detail.get(g, "")},
                               sort_keys=True) + "\n")
    manifest = {
        "format": MANIFEST_FORMAT, "schema_version": schema.PACKED_VERSION, "status": "complete",
        "inputs": {"spec": inputs, "manifest": in_manifest,
                   "manifest_sha256": _sha256(in_manifest) if in_manifest else None,
                   "shards": [{"file": p, "records": c} for p, c in zip(paths, counts)]},
        "parameters": {**budgets.as_dict(), "num_shards": n_shards, "prefix": prefix,
                       "writer_options": WRITER_OPTIONS, "algorithm": ALGORITHM, "order": plan.strategy},
        "seed": seed,
        "counts": {"samples_in": len(ids), "samples_packed": int(len(keep)), "samples_rejected": int(len(rejected)),
                   "bins": nb, "tokens": stats["tokens"], "patches": stats["patches"], "images": stats["images"],
                   "supervised_tokens": int(np.asarray(sup, dtype=np.int64)[keep].sum())},
        "rejected_by_reason": _count_reasons(reasons_a[rejected].tolist()),
        "rejects_file": REJECTS_FILE,
        "stats": stats,
        "shards": shards,
        "seconds": {"lengths": t_lengths, "plan": t_plan, "write": t_write,
                    "total": time.perf_counter() - t_start},
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    _log(f"wrote {nb} bins in {n_shards} shard(s) to {out_dir}; rejected {len(rejected)} "
         f"{manifest['rejected_by_reason']}")
    return manifest


# ----------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovjax pack", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", help="directory of raw shards with manifest.json, or a glob of .array_record files")
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

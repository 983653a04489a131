"""Packing and loader benchmark: ovjax's packer against grain's FirstFit/BestFit packers, like with like.

    python -m ovjax.bench.pack --out bench_pack.json            # 20k records, seq_len 8192, 3 rounds
    python -m ovjax.bench.pack --smoke --out /tmp/b.json        # seconds; what the test suite runs

Like with like: every packer is an ITERATOR over the same in-memory records (dicts of 1-D int32 arrays, one
entry per packed feature) that yields packed rows in grain's output format (per feature: values,
`<feature>_segment_ids`, `<feature>_positions`, each [budget]); the timing runs from the first `next` to
exhaustion, so it holds planning and copying alike. ovjax's iterator plans all bins first
(`pack.plan_bins` over the records' lengths; offline, as `python -m ovjax.data.pack` does) and then copies;
its planning time is also shown on its own. Grain's packers are streaming (a window of `--grain-bins` open
bins, all emitted when an item fits none), so their plan cannot be timed apart from their copying.
Every packer gets the same records and the same budgets, runs `--rounds` times interleaved (ovjax, grain
FirstFit, grain BestFit, ovjax, ...; median [min, max] and the load average beside it), and is scored by
token fill = tokens / (bins * seq_len) and bins / lower bound, the lower bound being the max over the
budgets of ceil(total / per-bin budget).
Budget sets: "tokens": seq_len tokens and 64 samples per bin (records carry `tokens` only); "tokens+patches":
also 4*seq_len ViT patches per bin (records carry `tokens` and `patches`; one image per sample, so grain's
max_sequences_per_bin=64 is also ovjax's max_images=64).

Lengths: one caption sample per item = one photo + one caption in the Qwen2-VL chat template.
  photo: long side log-normal (median 800 px, sigma 0.6, clipped to 64..6000), aspect ratio drawn from
  1:1 (25%), 4:3 (35%), 3:2 (20%), 16:9 (15%), 2:1 (5%), portrait 30% of the time; smart_resize with
  min_pixels 3136, max_pixels 2,560,000; patches = h*w/196, image tokens = h*w/784 + 2 (vision start/end).
  caption: log-normal tokens (median 120, sigma 0.7) + 20 template tokens (system, user, assistant turns).
Loader: a synthetic packed set (smooth JPEG photos of the same size distribution, capped at
`--loader-max-pixels`), read by `PackedLoader.next_numpy` (decode + resize + patchify in the grain
workers, uint8 patches), timed after the first batch.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

from ovjax.bench.step import load_average
from ovjax.data import images, pack, schema

TEMPLATE_TOKENS = 20
_RATIOS = np.array([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0])
_RATIO_P = np.array([0.25, 0.35, 0.2, 0.15, 0.05])


def photo_sizes(n: int, rng: np.random.Generator) -> np.ndarray:
    """int [n, 2] (height, width) of photos."""
    long = np.exp(rng.normal(np.log(800), 0.6, n)).clip(64, 6000)
    ratio = rng.choice(_RATIOS, n, p=_RATIO_P)
    portrait = rng.random(n) < 0.3
    h = np.where(portrait, long, long / ratio)
    w = np.where(portrait, long / ratio, long)
    return np.stack([h, w], 1).round().astype(np.int64).clip(1)


def caption_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.exp(rng.normal(np.log(120), 0.7, n)).astype(np.int64) + 1


def make_lengths(n: int, seed: int = 0, max_pixels: int = images.MAX_PIXELS):
    """(tokens, patches, images) int64 [n] of caption samples (see the module docstring)."""
    rng = np.random.default_rng(seed)
    sizes = photo_sizes(n, rng)
    cache: dict[tuple[int, int], int] = {}
    pixels = np.empty(n, np.int64)
    for k, (h, w) in enumerate(sizes.tolist()):
        px = cache.get((h, w))
        if px is None:
            rh, rw = images.smart_resize(h, w, max_pixels=max_pixels)
            px = cache[(h, w)] = rh * rw
        pixels[k] = px
    patches = pixels // 196
    tokens = pixels // 784 + 2 + caption_lengths(n, rng) + TEMPLATE_TOKENS
    return tokens, patches, np.ones(n, np.int64)


PACKERS = ("ovjax", "grain FirstFitPack", "grain BestFitPack")


def make_records(lengths: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One dict per item of int32 [n] arrays (views of one buffer per feature: no per-record allocation
    to time), e.g. {"tokens": [n_tok], "patches": [n_patch]}."""
    bufs = {k: np.arange(int(v.max()), dtype=np.int32) + 1 for k, v in lengths.items()}
    keys = list(lengths)
    cols = [lengths[k].tolist() for k in keys]
    return [{k: bufs[k][:n] for k, n in zip(keys, ns)} for ns in zip(*cols)]


def ovjax_packed_rows(records: list[dict], caps: dict[str, int], budgets: pack.Budgets, timing: dict):
    """ovjax as an iterator: plan every bin over the records' lengths, then yield grain-format rows.
    caps: per-bin length of each feature. timing["plan_s"] is set to the planning time."""
    t0 = time.perf_counter()
    lengths = {k: np.fromiter((len(r[k]) for r in records), np.int64, len(records)) for k in caps}
    patches = lengths.get("patches")
    imgs = None if patches is None else np.ones(len(records), np.int64)  # one image per sample
    plan = pack.plan_bins(lengths["tokens"], patches, imgs, budgets=budgets, seed=0, shuffle_bins=False)
    timing["plan_s"] = time.perf_counter() - t0
    for b in range(plan.num_bins):
        items = plan.items[plan.offsets[b]:plan.offsets[b + 1]]
        row = {}
        for key, cap in caps.items():
            vals, seg, pos = np.zeros(cap, np.int32), np.zeros(cap, np.int32), np.zeros(cap, np.int32)
            at = 0
            for s_id, i in enumerate(items.tolist(), start=1):
                x = records[i][key]
                n = len(x)
                vals[at:at + n] = x
                seg[at:at + n] = s_id
                pos[at:at + n] = np.arange(n, dtype=np.int32)
                at += n
            row[key], row[f"{key}_segment_ids"], row[f"{key}_positions"] = vals, seg, pos
        yield row


def grain_packed_rows(records: list[dict], caps: dict[str, int], max_segments: int, num_packing_bins: int,
                      best_fit: bool):
    import grain
    from grain import experimental as gx

    cls = gx.BestFitPackIterDataset if best_fit else gx.FirstFitPackIterDataset
    ds = grain.MapDataset.source(records).to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return iter(cls(ds, length_struct=dict(caps), num_packing_bins=num_packing_bins, shuffle_bins=False,
                    max_sequences_per_bin=max_segments))


def lower_bound(totals: dict[str, int], n_items: int, caps: dict[str, int], max_segments: int) -> int:
    """Bins no packer can beat: max over the budgets of ceil(total / per-bin budget)."""
    return max([math.ceil(n_items / max_segments)] + [math.ceil(totals[k] / caps[k]) for k in caps])


def consume(rows, caps: dict[str, int]) -> tuple[int, dict[str, int], int]:
    """Drain a packed-row iterator -> (bins, packed length per feature, most segments in a bin)."""
    bins, most = 0, 0
    packed = {k: 0 for k in caps}
    for row in rows:
        bins += 1
        for k in caps:
            seg = row[f"{k}_segment_ids"]
            packed[k] += int(np.count_nonzero(seg))
        most = max(most, int(row["tokens_segment_ids"].max()))
    return bins, packed, most


def compare(records: list[dict], caps: dict[str, int], max_segments: int, rounds: int, grain_bins: int,
            label: str) -> list[dict]:
    """Time the three packers interleaved over `records` -> one result row per packer."""
    totals = {k: int(sum(len(r[k]) for r in records)) for k in caps}
    lb = lower_bound(totals, len(records), caps, max_segments)
    budgets = pack.Budgets(caps["tokens"], max_patches=caps.get("patches"), max_segments=max_segments,
                           max_images=max_segments if "patches" in caps else None)
    makers = {"ovjax": lambda recs, t: ovjax_packed_rows(recs, caps, budgets, t),
              "grain FirstFitPack": lambda recs, t: grain_packed_rows(recs, caps, max_segments, grain_bins, False),
              "grain BestFitPack": lambda recs, t: grain_packed_rows(recs, caps, max_segments, grain_bins, True)}
    for make in makers.values():  # warm-up on a few records: imports and first-call costs are not timed
        consume(make(records[:64], {}), caps)
    seconds = {k: [] for k in makers}
    plan_s, result = [], {}
    load_before = load_average()
    for _ in range(rounds):
        for name, make in makers.items():
            timing: dict = {}
            t0 = time.perf_counter()
            bins, packed, most = consume(make(records, timing), caps)
            seconds[name].append(time.perf_counter() - t0)
            if "plan_s" in timing:
                plan_s.append(timing["plan_s"])
            if packed != totals:
                raise RuntimeError(f"{name} packed {packed} of {totals} (it dropped or truncated items)")
            if most > max_segments:
                raise RuntimeError(f"{name} put {most} samples in a bin, over the budget {max_segments}")
            result[name] = bins
    load = f"{load_before} -> {load_average()}"
    out = []
    for name in makers:
        bins, sec = result[name], seconds[name]
        out.append({"packer": name, "budgets": label, "mode": "iterator over the same records",
                    "items": len(records), "rounds": rounds, "seconds": statistics.median(sec),
                    "seconds_min": min(sec), "seconds_max": max(sec),
                    "plan_seconds": statistics.median(plan_s) if name == "ovjax" else None,
                    "bins": bins, "lower_bound": lb, "bins_over_lower_bound": bins / lb,
                    "fill": totals["tokens"] / (bins * caps["tokens"]),
                    "patch_fill": totals["patches"] / (bins * caps["patches"]) if "patches" in caps else None,
                    "note": f"num_packing_bins={grain_bins}" if name != "ovjax" else "plans all bins, then copies",
                    "load_average": load})
    return out


# ----------------------------------------------------------------------------------------------- loader


def _photo_jpeg(h: int, w: int, rng: np.random.Generator) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.random(3) * 255
    img = base + 60 * np.sin(x[..., None] / rng.uniform(5, 40) + rng.random(3) * 6) \
        + 40 * np.cos(y[..., None] / rng.uniform(5, 40)) + rng.normal(0, 8, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_packed_set(out_dir: str, n_samples: int, seq_len: int, max_pixels: int, seed: int = 0) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    rng = np.random.default_rng(seed)
    raw_dir = os.path.join(out_dir, "raw")
    os.makedirs(raw_dir)
    name = "raw-00000-of-00001.array_record"
    writer = ArrayRecordWriter(os.path.join(raw_dir, name), "group_size:1")
    scale = math.sqrt(max_pixels / images.MAX_PIXELS)
    for k, (h, w) in enumerate(photo_sizes(n_samples, rng).tolist()):
        h, w = max(28, int(h * scale)), max(28, int(w * scale))
        grid = images.image_grid(h, w, max_pixels=max_pixels)
        n_tok = grid[1] * grid[2] // 4
        cap = int(caption_lengths(1, rng)[0])
        tokens = np.concatenate([rng.integers(0, 1000, TEMPLATE_TOKENS // 2), [1001], np.full(n_tok, 1002), [1003],
                                 rng.integers(0, 1000, cap + TEMPLATE_TOKENS - TEMPLATE_TOKENS // 2)])
        mask = np.zeros(len(tokens), bool)
        mask[-cap:] = True
        writer.write(schema.dumps(schema.make_raw(f"photo{k}", tokens, mask, [_photo_jpeg(h, w, rng)], [grid])))
    writer.close()
    with open(os.path.join(raw_dir, "manifest.json"), "w") as f:
        json.dump({"format": "ovjax-raw", "status": "complete", "shards": [{"file": name, "records": n_samples}]}, f)
    budgets = pack.Budgets(seq_len, max_patches=4 * seq_len, max_segments=64, max_images=64)
    return pack.pack(raw_dir, os.path.join(out_dir, "packed"), budgets, workers=1)


def run_loader(n_samples: int, seq_len: int, workers: int, batches: int, max_pixels: int) -> dict:
    from ovjax.data.loader import PackedLoader

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_packed_set(tmp, n_samples, seq_len, max_pixels)
        rows = manifest["counts"]["bins"]
        t0 = time.perf_counter()
        with PackedLoader(os.path.join(tmp, "packed"), seq_len=seq_len, max_patches=4 * seq_len, max_images=64,
                          max_segments=64, global_batch_size=1, worker_count=workers, seed=0,
                          max_pixels=max_pixels) as loader:
            loader.next_numpy()
            t_first = time.perf_counter() - t0
            samples = 0
            t1 = time.perf_counter()
            for _ in range(batches):
                samples += loader.next_numpy()[1]["samples"]
            seconds = time.perf_counter() - t1
    return {"workers": workers, "packed_rows": rows, "samples_in_set": n_samples, "batches_timed": batches,
            "first_batch_seconds": t_first, "seconds": seconds, "rows_per_s": batches / seconds,
            "samples_per_s": samples / seconds, "max_pixels": max_pixels, "seq_len": seq_len}


# ----------------------------------------------------------------------------------------------- main


def table(res: dict) -> str:
    lines = [f"Every packer: an iterator over the same {res['packing'][0]['items']:,} records, seq_len "
             f"{res['seq_len']}, drained to the end; seconds: median [min, max] of interleaved rounds.", "",
             "| budgets | packer | seconds [min, max] | of which planning | bins | lower bound | bins / LB | "
             "token fill | patch fill | note | load (1/5/15 min) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in res["packing"]:
        plan = f"{r['plan_seconds']:.2f}" if r["plan_seconds"] is not None else "n/a (streaming)"
        patch = f"{r['patch_fill']:.4f}" if r["patch_fill"] is not None else ""
        lines.append(f"| {r['budgets']} | {r['packer']} | {r['seconds']:.2f} [{r['seconds_min']:.2f}, "
                     f"{r['seconds_max']:.2f}] | {plan} | {r['bins']:,} | {r['lower_bound']:,} | "
                     f"{r['bins_over_lower_bound']:.4f} | {r['fill']:.4f} | {patch} | {r['note']} | "
                     f"{r['load_average']} |")
    ld = res.get("loader")
    if ld:
        lines += ["", "| loader | workers | rows/s | samples/s | first batch (s) |", "|---|---:|---:|---:|---:|",
                  f"| PackedLoader.next_numpy, seq {ld['seq_len']}, max_pixels {ld['max_pixels']:,} | "
                  f"{ld['workers']} | {ld['rows_per_s']:.2f} | {ld['samples_per_s']:.1f} | "
                  f"{ld['first_batch_seconds']:.1f} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovjax.bench.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=20_000, help="records, the same for every packer")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per packer (median reported)")
    p.add_argument("--grain-bins", type=int, default=64, help="grain num_packing_bins")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--loader-samples", type=int, default=96)
    p.add_argument("--loader-batches", type=int, default=8)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--loader-max-pixels", type=int, default=1_003_520)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round, in-process loader")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.items, args.rounds, args.seq_len = 1000, 1, 2048
        args.loader_samples, args.loader_batches, args.loader_workers, args.loader_max_pixels = 12, 2, 0, 50_000
    T, S = args.seq_len, 64
    caps_sets = {"tokens": {"tokens": T}, "tokens+patches": {"tokens": T, "patches": 4 * T}}
    tok, pat, img = make_lengths(args.items, max_pixels=images.MAX_PIXELS)
    keep = pack.reject_reasons(tok, pat, img, pack.Budgets(T, 4 * T, S, S)) == None  # noqa: E711
    if not keep.all():
        print(f"{int((~keep).sum())} of {len(tok)} items longer than the budgets left out (for every packer)",
              file=sys.stderr)
    tok, pat = tok[keep], pat[keep]
    rows = []
    for label, caps in caps_sets.items():
        lengths = {"tokens": tok, "patches": pat}
        records = make_records({k: lengths[k] for k in caps})
        rows += compare(records, caps, S, args.rounds, args.grain_bins, label)
        print(json.dumps(rows[-3:]), file=sys.stderr, flush=True)
    res = {"seq_len": T, "lengths": __doc__.split("Lengths: ")[1].split("Loader:")[0].strip(), "packing": rows,
           "cpu_count": os.cpu_count(), "smoke": args.smoke}
    print(table(res), file=sys.stderr, flush=True)
    res["loader"] = run_loader(args.loader_samples, T, args.loader_workers, args.loader_batches,
                               args.loader_max_pixels)
    print(table(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

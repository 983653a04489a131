"""Packing and loader benchmark: ovjax's packer against grain's FirstFit/BestFit packers, and loader speed.

    python -m ovjax.bench.pack --out bench_pack.json            # 1M lengths, seq_len 8192
    python -m ovjax.bench.pack --smoke --out /tmp/b.json        # seconds; what the test suite runs

Lengths: one caption sample per item = one photo + one caption in the Qwen2-VL chat template.
  photo: long side log-normal (median 800 px, sigma 0.6, clipped to 64..6000), aspect ratio drawn from
  1:1 (25%), 4:3 (35%), 3:2 (20%), 16:9 (15%), 2:1 (5%), portrait 30% of the time; smart_resize with
  min_pixels 3136, max_pixels 2,560,000; patches = h*w/196, image tokens = h*w/784 + 2 (vision start/end).
  caption: log-normal tokens (median 120, sigma 0.7) + 20 template tokens (system, user, assistant turns).
Grain's packers are streaming (they pack a window of `num_packing_bins` open bins and emit them all when
an item fits none), so they get a token budget and max_sequences_per_bin only; they run on the first
`--grain-items` lengths (they cost tens of microseconds per item in numpy) and ovjax is run on the
same subset with the same budgets for the side-by-side rows.
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
import sys
import tempfile
import time

import numpy as np

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


def _row(name: str, bins: int, tokens: np.ndarray, seq_len: int, seconds: float, note: str = "",
         lb: int | None = None) -> dict:
    """lb: lower bound over all budgets (default: the token bound)."""
    total, n = int(tokens.sum()), len(tokens)
    lb = lb or math.ceil(total / seq_len)
    pad_unpacked, pad_packed = n * seq_len - total, bins * seq_len - total
    return {"packer": name, "items": n, "seconds": seconds, "bins": bins, "lower_bound": lb,
            "bins_over_lower_bound": bins / lb, "fill": total / (bins * seq_len),
            "padding_compression": pad_unpacked / pad_packed if pad_packed else None, "note": note}


def run_ovjax(tokens, patches, imgs, budgets: pack.Budgets, name: str, note: str = "") -> dict:
    rejected = 0
    if patches is not None:
        keep = pack.reject_reasons(tokens, patches, imgs, budgets) == None  # noqa: E711
        rejected = int((~keep).sum())
        tokens, patches, imgs = tokens[keep], patches[keep], imgs[keep]
        if rejected:
            note = f"{note}; {rejected} items over the patch budget left out".strip("; ")
    t0 = time.perf_counter()
    plan = pack.plan_bins(tokens, patches, imgs, budgets=budgets, seed=0)
    seconds = time.perf_counter() - t0
    pack.check_plan(plan, tokens, patches, imgs, budgets)
    stats = pack.plan_stats(plan, tokens, patches, imgs, budgets)
    row = _row(name, plan.num_bins, tokens, budgets.seq_len, seconds, f"{plan.strategy} order; {note}".strip("; "),
               lb=stats["lower_bound_bins_max"])
    row["lower_bounds"] = stats["lower_bound_bins"]
    return row


def run_grain(tokens: np.ndarray, seq_len: int, max_segments: int, num_packing_bins: int, best_fit: bool) -> dict:
    import grain
    from grain import experimental as gx

    cls = gx.BestFitPackIterDataset if best_fit else gx.FirstFitPackIterDataset
    lengths = tokens.tolist()
    buf = np.zeros(seq_len, np.int32)
    ds = grain.MapDataset.source(lengths).map(lambda n: {"tokens": buf[:n]}).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    ds = cls(ds, length_struct={"tokens": seq_len}, num_packing_bins=num_packing_bins, shuffle_bins=False,
             max_sequences_per_bin=max_segments)
    t0 = time.perf_counter()
    bins = packed_tokens = 0
    for row in ds:
        seg = row["tokens_segment_ids"]
        bins += 1
        packed_tokens += int(np.count_nonzero(seg))
    seconds = time.perf_counter() - t0
    if packed_tokens != int(tokens.sum()):
        raise RuntimeError(f"grain packed {packed_tokens} tokens of {int(tokens.sum())}")
    name = "grain BestFitPack" if best_fit else "grain FirstFitPack"
    return _row(name, bins, tokens, seq_len, seconds, f"num_packing_bins={num_packing_bins}",
                lb=max(math.ceil(int(tokens.sum()) / seq_len), math.ceil(len(tokens) / max_segments)))


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
    lines = ["| packer | items | budgets | seconds | bins | lower bound (all budgets) | bins / LB | token fill | "
             "padding compression | note |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["packing"]:
        pc = f"{r['padding_compression']:.1f}x" if r["padding_compression"] else "inf"
        lines.append(f"| {r['packer']} | {r['items']:,} | {r['budgets']} | {r['seconds']:.2f} | {r['bins']:,} | "
                     f"{r['lower_bound']:,} | {r['bins_over_lower_bound']:.4f} | {r['fill']:.4f} | {pc} | {r['note']} |")
    ld = res.get("loader")
    if ld:
        lines += ["", "| loader | workers | rows/s | samples/s | first batch (s) |", "|---|---:|---:|---:|---:|",
                  f"| PackedLoader.next_numpy, seq {ld['seq_len']}, max_pixels {ld['max_pixels']:,} | "
                  f"{ld['workers']} | {ld['rows_per_s']:.2f} | {ld['samples_per_s']:.1f} | "
                  f"{ld['first_batch_seconds']:.1f} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovjax.bench.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--grain-items", type=int, default=100_000)
    p.add_argument("--grain-bins", type=int, default=64, help="grain num_packing_bins")
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--loader-samples", type=int, default=96)
    p.add_argument("--loader-batches", type=int, default=8)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--loader-max-pixels", type=int, default=1_003_520)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, in-process loader")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.items, args.grain_items, args.seq_len = 3000, 1000, 2048
        args.loader_samples, args.loader_batches, args.loader_workers, args.loader_max_pixels = 12, 2, 0, 50_000
    T, S = args.seq_len, 64
    t0 = time.perf_counter()
    tok, pat, img = make_lengths(args.items, max_pixels=images.MAX_PIXELS)
    keep = pack.reject_reasons(tok, pat, img, pack.Budgets(T, 4 * T, S, 64)) == None  # noqa: E711
    tok, pat, img = tok[keep], pat[keep], img[keep]
    print(f"{len(tok)} lengths ({int((~keep).sum())} longer than {T} dropped) in {time.perf_counter() - t0:.1f}s; "
          f"mean {tok.mean():.0f} tokens", file=sys.stderr)
    four = pack.Budgets(T, max_patches=4 * T, max_segments=S, max_images=64)
    tight = pack.Budgets(T, max_patches=2 * T, max_segments=16, max_images=8)
    rows = [run_ovjax(tok, pat, img, four, "ovjax")]
    rows[-1]["budgets"] = f"tokens {T}, patches {4 * T}, segments {S}, images 64"
    rows.append(run_ovjax(tok, pat, img, tight, "ovjax"))
    rows[-1]["budgets"] = f"tokens {T}, patches {2 * T}, segments 16, images 8"
    g = min(args.grain_items, len(tok))
    sub = tok[:g]
    only = pack.Budgets(T, max_segments=S)
    for r in (run_ovjax(sub, None, None, only, "ovjax"), run_grain(sub, T, S, args.grain_bins, False),
              run_grain(sub, T, S, args.grain_bins, True)):
        r["budgets"] = f"tokens {T}, segments {S}"
        rows.append(r)
    res = {"seq_len": T, "lengths": __doc__.split("Lengths: ")[1].split("Grain's")[0].strip(), "packing": rows,
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

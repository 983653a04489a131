"""Concept-balancing benchmark: embedding speed of the tiny CLIP encoder and exact top-K retrieval throughput.

    python -m ovjax.bench.balance --out bench_balance.json     # 500K concepts x 100K images, dim 512
    python -m ovjax.bench.balance --smoke --out /tmp/b.json    # seconds; what the test suite runs

Embedding: `ClipEncoder` with random weights of the tiny config the tests use (2 layers per tower, width 32,
32x32 input, patches of 8), on synthetic scene PNGs (`ovjax.data.synthetic`, 80..120 px); images/s for
decode + preprocess + encode, and for the encoder alone on ready pixels; the compile is timed apart.
Retrieval: `ovjax.data.retrieval.Retriever` on random unit vectors (seeded), every image against every
concept; images/s, image-concept pairs/s and GFLOP/s (2 x images x concepts x dim), the first image chunk
(compile) timed apart; the first rows are checked against a numpy brute force. Peak memory: the process's
peak RSS (ru_maxrss) before and after retrieval. The load average (`uptime`) is recorded beside the numbers,
because the CPU may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

import numpy as np

TINY = dict(hidden=32, heads=4, layers=2, mlp=48, image_size=32, patch_size=8, projection_dim=16)


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def _machine() -> dict:
    import jax

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__,
            "backend": jax.default_backend(), "devices": len(jax.devices())}


def tiny_config():
    from ovjax.data.clip_model import ClipConfig, TowerConfig

    t = TowerConfig(TINY["hidden"], TINY["heads"], TINY["layers"], TINY["mlp"], 1e-5, "quick_gelu")
    return ClipConfig(vision=t, text=t, image_size=TINY["image_size"], patch_size=TINY["patch_size"], channels=3,
                      vocab_size=512, max_positions=24, eos_token_id=3, projection_dim=TINY["projection_dim"])


def bench_embedding(n_images: int, batch_size: int, seed: int = 0) -> dict:
    from ovjax.data import clip_encoder, clip_model, synthetic

    cfg = tiny_config()
    enc = clip_encoder.ClipEncoder(None, batch_size=batch_size, weights=(cfg, clip_model.init_params(cfg, seed)))
    rng = np.random.default_rng(seed)
    data = [synthetic.png_bytes(synthetic.render(synthetic.random_scene(rng))) for _ in range(n_images)]
    t0 = time.perf_counter()
    enc.embed_images(data[:batch_size])  # compile
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb = enc.embed_images(data)
    full_s = time.perf_counter() - t0
    pixels = np.stack([clip_encoder.preprocess(d, enc.prep) for d in data])
    t0 = time.perf_counter()
    enc.embed_pixels(pixels)
    enc_s = time.perf_counter() - t0
    assert emb.shape == (n_images, cfg.projection_dim) and np.isfinite(emb).all()
    return {"images": n_images, "batch_size": batch_size, "compile_s": compile_s,
            "images_per_s": n_images / full_s, "encoder_only_images_per_s": n_images / enc_s,
            "seconds": full_s}


def _unit_rows(n: int, dim: int, rng: np.random.Generator, block: int = 65536) -> np.ndarray:
    out = np.empty((n, dim), np.float32)
    for a in range(0, n, block):
        x = rng.standard_normal((min(n, a + block) - a, dim), dtype=np.float32)
        out[a:a + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def bench_retrieval(n_concepts: int, n_images: int, dim: int, k: int, image_chunk: int, concept_chunk: int,
                    seed: int = 0, check_rows: int = 64) -> dict:
    from ovjax.data import retrieval

    rng = np.random.default_rng(seed)
    concepts, images = _unit_rows(n_concepts, dim, rng), _unit_rows(n_images, dim, rng)
    rss_inputs = _rss_gib()
    t0 = time.perf_counter()
    r = retrieval.Retriever(concepts, k, image_chunk=image_chunk, concept_chunk=concept_chunk)
    first = min(n_images, r.image_chunk)
    _, first_ids = r.top_k(images[:first])  # compiles
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = [first_ids]
    for a in range(first, n_images, r.image_chunk):  # chunk by chunk, so a long run reports as it goes
        parts.append(r.top_k(images[a:a + r.image_chunk])[1])
        done, dt = min(n_images, a + r.image_chunk) - first, time.perf_counter() - t0
        print(f"retrieval: {done}/{n_images - first} timed images, {done / dt:.1f} images/s, "
              f"peak RSS {_rss_gib():.2f} GiB, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    rest_s = time.perf_counter() - t0
    ids = np.concatenate(parts)
    s = images[:check_rows].astype(np.float64) @ concepts.T.astype(np.float64)
    ref = np.argsort(-s, axis=1, kind="stable")[:, :k]
    timed = n_images - first
    res = {"concepts": n_concepts, "images": n_images, "dim": dim, "top_k": k, "image_chunk": r.image_chunk,
           "concept_chunk": concept_chunk, "first_chunk_with_compile_s": first_s, "timed_images": timed,
           "seconds": rest_s, "checked_rows_equal_numpy": bool(np.array_equal(ids[:check_rows], ref)),
           "peak_rss_gib_inputs": rss_inputs, "peak_rss_gib": _rss_gib(),
           "concept_matrix_gib": concepts.nbytes / 2 ** 30, "image_matrix_gib": images.nbytes / 2 ** 30}
    if timed:
        res.update(images_per_s=timed / rest_s, pairs_per_s=timed * n_concepts / rest_s,
                   gflops=2 * timed * n_concepts * dim / rest_s / 1e9)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ovjax.bench.balance", description=__doc__.split("\n\n")[0])
    p.add_argument("--concepts", type=int, default=500_000)
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--image-chunk", type=int, default=4096)
    p.add_argument("--concept-chunk", type=int, default=16384)
    p.add_argument("--embed-images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    p.add_argument("--skip-embedding", action="store_true")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.smoke:
        args.concepts, args.images, args.dim, args.embed_images, args.batch_size = 3000, 700, 32, 48, 16
        args.image_chunk, args.concept_chunk = 256, 1024
    res = {"command": "python -m ovjax.bench.balance " + " ".join(argv if argv is not None else sys.argv[1:]),
           "machine": _machine(), "load_before": os.getloadavg()}
    if not args.skip_embedding:
        res["embedding"] = bench_embedding(args.embed_images, args.batch_size)
    res["retrieval"] = bench_retrieval(args.concepts, args.images, args.dim, args.top_k, args.image_chunk,
                                       args.concept_chunk)
    res["load_after"] = os.getloadavg()
    e, r = res.get("embedding"), res["retrieval"]
    lines = [f"load average before {res['load_before'][0]:.2f}, after {res['load_after'][0]:.2f} "
             f"({res['machine']['cores']} cores, {res['machine']['cpu']}, jax {res['machine']['backend']})"]
    if e:
        lines.append(f"embedding (tiny CLIP, batch {e['batch_size']}): {e['images_per_s']:.1f} images/s decode+encode, "
                     f"{e['encoder_only_images_per_s']:.1f} images/s encoder only (compile {e['compile_s']:.1f}s)")
    lines.append(f"retrieval {r['concepts']} concepts x {r['images']} images, dim {r['dim']}, top-{r['top_k']}: "
                 f"{r.get('images_per_s', float('nan')):.1f} images/s, "
                 f"{r.get('pairs_per_s', float('nan')):.3g} pairs/s, "
                 f"{r.get('gflops', float('nan')):.1f} GFLOP/s; peak RSS {r['peak_rss_gib']:.2f} GiB "
                 f"(inputs alone {r['peak_rss_gib_inputs']:.2f}); checked vs numpy: {r['checked_rows_equal_numpy']}")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if r["checked_rows_equal_numpy"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""Concept-balanced resampling of converted raw data (between `convert` and `pack`).

    python -m ovjax balance --raw RAW_DIR [--raw RAW_DIR2 ...] --concepts VOCAB.txt --encoder HF_CLIP_DIR \
        --top-k 5 --target 1000000 --out SELECTION.json [--seed 0] [--no-replace] [--alpha 1 --power 1]

Steps (LLaVA-OneVision-1.5's mid-training recipe):
  1. embed every sample's images (a sample with several images: the mean of their unit embeddings,
     renormalised) and every concept string (VOCAB.txt: UTF-8, one concept per line, no blank or duplicate
     line) with a CLIP-family encoder (`ovjax.data.clip_encoder` over `ovjax.data.clip_model`, our Flax
     port; MetaCLIP loads as CLIP), in chunks cached under --cache (default SELECTION.cache/): a rerun
     skips finished chunks;
  2. the top-K concepts of each sample by cosine similarity (`ovjax.data.retrieval`: chunked, sharded over
     the devices' batch axes, ties to the lower concept id), also cached per chunk;
  3. inverse-frequency weights with additive smoothing and a seeded resample to --target samples, with or
     without replacement (`ovjax.data.concept_stats` documents both);
  4. a selection manifest (`ovjax.data.selection`) that `pack` takes as input, plus SELECTION.report.json
     and SELECTION.report.png (concept-frequency histograms before/after, concepts covered, share of the
     most frequent 1% of concepts, entropy).
Samples without images have no concepts: they are left out of the selection and counted in the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from ovjax.data import concept_stats, schema, selection
from ovjax.data.embed_cache import ChunkCache, chunk_bounds

_MAX_CONCEPT_BYTES = 1000  # a concept line longer than this is not a concept


class BalanceInputError(ValueError):
    """Unusable input to balance (raw directory, concept file, arguments)."""


# ----------------------------------------------------------------------------------------------- inputs

class RawSamples:
    """The samples of converted raw directories, in (source, shard, record) order.

    `picks` int64 [N, 3] holds (source, shard, record) of every sample (the selection's columns)."""

    def __init__(self, raw_dirs: list[str]):
        if not raw_dirs:
            raise BalanceInputError("no --raw directory given")
        self.raw_dirs = [str(d) for d in raw_dirs]
        self.shard_paths: list[str] = []
        rows = []
        self.manifest_sha256 = []
        for s, d in enumerate(self.raw_dirs):
            path = os.path.join(d, "manifest.json")
            if not os.path.isfile(path):
                raise BalanceInputError(f"{d} has no manifest.json (not a converted raw directory)")
            data = Path(path).read_bytes()
            self.manifest_sha256.append(hashlib.sha256(data).hexdigest())
            meta = json.loads(data)
            if meta.get("status") != "complete":
                raise BalanceInputError(f"{path} has status {meta.get('status')!r} (conversion did not complete)")
            for k, shard in enumerate(meta.get("shards", [])):
                name = shard.get("file", "")
                if os.path.basename(name) != name or not name:
                    raise BalanceInputError(f"{path} lists an unsafe shard name {name!r}")
                if not os.path.isfile(os.path.join(d, name)):
                    raise BalanceInputError(f"{path} lists {name}, which is missing")
                n = int(shard["records"])
                self.shard_paths.append(os.path.join(d, name))
                rows.append(np.stack([np.full(n, s), np.full(n, k), np.arange(n)], 1))
        self.picks = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)
        if not len(self.picks):
            raise BalanceInputError(f"the raw directories {self.raw_dirs} hold no samples")
        self._flat_shard = np.concatenate([np.full(len(r), i) for i, r in enumerate(rows)])

    def __len__(self) -> int:
        return len(self.picks)

    def read(self, start: int, stop: int) -> list[dict]:
        """Raw sample maps of samples [start, stop) (validated; a bad record is an error naming it)."""
        from array_record.python.array_record_module import ArrayRecordReader

        out = []
        flat = self._flat_shard[start:stop]
        for shard in np.unique(flat):
            idx = self.picks[start:stop][flat == shard, 2]
            path = self.shard_paths[int(shard)]
            reader = ArrayRecordReader(path, "readahead_buffer_size:0,max_parallelism:0")
            try:
                for r, data in zip(idx.tolist(), reader.read(int(idx[0]), int(idx[-1]) + 1)):
                    try:
                        out.append(schema.validate_raw(schema.loads(data)))
                    except schema.RecordError as e:
                        raise BalanceInputError(f"{path} record {r}: {e}") from None
            finally:
                reader.close()
        return out


def read_concepts(path: str) -> list[str]:
    """Concept strings of a vocabulary file: UTF-8, one per line; blank, duplicate or huge lines are errors."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise BalanceInputError(f"cannot read concepts file {path}: {e}") from None
    except UnicodeDecodeError as e:
        raise BalanceInputError(f"concepts file {path} is not UTF-8: {e}") from None
    concepts, seen = [], {}
    for n, line in enumerate(text.splitlines(), start=1):
        c = line.strip()
        if not c:
            raise BalanceInputError(f"{path} line {n} is blank")
        if len(c.encode()) > _MAX_CONCEPT_BYTES:
            raise BalanceInputError(f"{path} line {n} is longer than {_MAX_CONCEPT_BYTES} bytes")
        if c in seen:
            raise BalanceInputError(f"{path} line {n} repeats line {seen[c]} ({c!r})")
        seen[c] = n
        concepts.append(c)
    if not concepts:
        raise BalanceInputError(f"{path} holds no concept")
    return concepts


# ----------------------------------------------------------------------------------------------- embedding

def sample_embeddings(samples: list[dict], encoder) -> np.ndarray:
    """float32 [len(samples), E]: mean of each sample's unit image embeddings, renormalised; zeros if none."""
    images = [im for s in samples for im in s["images"]]
    owner = np.repeat(np.arange(len(samples)), [len(s["images"]) for s in samples])
    out = np.zeros((len(samples), encoder.dim), np.float32)
    if images:
        np.add.at(out, owner, encoder.embed_images(images))
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        out = np.where(norm > 0, out / np.where(norm > 0, norm, 1), 0).astype(np.float32)
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="item", disable=not enabled, file=sys.stderr)


def default_mesh():
    """All local devices on the batch axes (rows of images split over every device)."""
    from ovjax import sharding

    return sharding.data_parallel_mesh()


# ----------------------------------------------------------------------------------------------- run

def balance(raw_dirs: list[str], concepts_path: str, encoder_dir: str, out: str, *, top_k: int, target: int,
            replace: bool = True, seed: int = 0, alpha: float = 1.0, power: float = 1.0,
            cache_dir: str | None = None, chunk_size: int = 4096, batch_size: int = 64, image_chunk: int = 4096,
            concept_chunk: int = 16384, mesh=None, encoder=None, progress: bool = True) -> dict:
    """Runs the steps of the module docstring; returns the report (also written to OUT.report.json).

    encoder: a ready `ClipEncoder` for `encoder_dir` (tests pass one in); built from encoder_dir if None.
    """
    from ovjax.data import clip_encoder, clip_model, retrieval

    out_path = Path(out)
    if out_path.suffix != ".json":
        raise BalanceInputError(f"--out must be a .json path (a selection manifest), got {out}")
    if top_k < 1 or target < 1 or chunk_size < 1:
        raise BalanceInputError(f"--top-k ({top_k}), --target ({target}) and --chunk-size ({chunk_size}) "
                                "must be positive")
    samples = RawSamples(raw_dirs)
    concepts = read_concepts(concepts_path)
    if top_k > len(concepts):
        raise BalanceInputError(f"--top-k {top_k} exceeds the {len(concepts)} concepts of {concepts_path}")
    mesh = default_mesh() if mesh is None else mesh
    if encoder is None:
        encoder = clip_encoder.ClipEncoder(encoder_dir, batch_size=batch_size, mesh=mesh)
    encoder_sha = clip_model.weights_sha256(encoder_dir)
    concepts_sha = hashlib.sha256(Path(concepts_path).read_bytes()).hexdigest()
    cache = ChunkCache(cache_dir or out_path.with_name(out_path.stem + ".cache"), {
        "encoder_sha256": encoder_sha, "raw_manifests_sha256": samples.manifest_sha256,
        "concepts_sha256": concepts_sha, "chunk_size": chunk_size, "dim": encoder.dim})

    n = len(samples)
    sample_bounds, concept_bounds = chunk_bounds(n, chunk_size), chunk_bounds(len(concepts), chunk_size)
    with _progress(len(concepts), "embed concepts", progress) as bar:
        concept_emb = np.concatenate(list(cache.chunks(
            "concepts", concept_bounds, lambda a, b: encoder.embed_texts(concepts[a:b]), bar)))
    with _progress(n, "embed images", progress) as bar:
        for _ in cache.chunks("images", sample_bounds, lambda a, b: sample_embeddings(samples.read(a, b), encoder),
                              bar):
            pass  # embed everything first: retrieval below streams the cached chunks
    retriever = retrieval.Retriever(concept_emb, top_k, mesh=mesh, image_chunk=image_chunk,
                                    concept_chunk=concept_chunk)
    ids_parts, valid_parts = [], []

    def retrieve(i: int, a: int, b: int) -> np.ndarray:
        return retriever.top_k(cache.load("images", i, b - a))[1]

    with _progress(n, "retrieve", progress) as bar:
        for i, ids in enumerate(cache.chunks(f"top{top_k}", sample_bounds,
                                             lambda a, b: retrieve(a // chunk_size, a, b), bar)):
            ids_parts.append(ids)
            a, b = sample_bounds[i]
            valid_parts.append(np.abs(cache.load("images", i, b - a)).sum(1) > 0)
    top_ids, valid = np.concatenate(ids_parts).astype(np.int64), np.concatenate(valid_parts)

    weights = concept_stats.inverse_frequency_weights(top_ids, valid, len(concepts), alpha=alpha, power=power)
    chosen = concept_stats.resample(weights, target, seed=seed, replace=replace)
    producer = {"step": "balance", "concepts_file": os.path.abspath(concepts_path), "concepts_sha256": concepts_sha,
                "num_concepts": len(concepts), "encoder": os.path.abspath(encoder_dir), "encoder_sha256": encoder_sha,
                "top_k": top_k, "target": target, "replace": replace, "seed": seed, "alpha": alpha, "power": power}
    header = selection.write_selection(out_path, samples.raw_dirs, samples.picks[chosen], producer)

    multiplicity = np.bincount(chosen, minlength=n)
    before = concept_stats.concept_counts(top_ids, len(concepts), valid.astype(np.int64))
    after = concept_stats.concept_counts(top_ids, len(concepts), multiplicity)
    png = out_path.with_name(out_path.stem + ".report.png")
    concept_stats.plot_histograms(before, after, str(png))
    report = {"selection": str(out_path), "picks_sha256": header["picks_sha256"], "samples": n,
              "samples_without_images": int((~valid).sum()), "picked": int(target),
              "distinct_samples_picked": int((multiplicity > 0).sum()),
              "before": concept_stats.distribution_stats(before), "after": concept_stats.distribution_stats(after),
              "most_frequent_before": [[concepts[c], int(before[c])] for c in np.argsort(-before, kind="stable")[:10]],
              "histogram_png": png.name, "producer": producer}
    report_path = out_path.with_name(out_path.stem + ".report.json")
    tmp = report_path.with_name(report_path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, report_path)
    return report


# ----------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ovjax balance", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--raw", action="append", required=True, metavar="DIR", help="converted raw directory (repeatable)")
    ap.add_argument("--concepts", required=True, metavar="FILE", help="concept vocabulary, one per line")
    ap.add_argument("--encoder", required=True, metavar="DIR", help="local transformers CLIP/MetaCLIP directory")
    ap.add_argument("--top-k", type=int, required=True, help="concepts retrieved per sample")
    ap.add_argument("--target", type=int, required=True, help="samples in the selection")
    ap.add_argument("--out", required=True, metavar="SELECTION.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-replace", action="store_true", help="sample without replacement (target <= samples)")
    ap.add_argument("--alpha", type=float, default=1.0, help="additive smoothing of concept frequencies")
    ap.add_argument("--power", type=float, default=1.0, help="weight = (frequency + alpha) ** -power")
    ap.add_argument("--cache", metavar="DIR", help="embedding cache (default: next to --out, NAME.cache)")
    ap.add_argument("--chunk-size", type=int, default=4096, help="samples / concepts per cached chunk")
    ap.add_argument("--batch-size", type=int, default=64, help="encoder batch")
    ap.add_argument("--image-chunk", type=int, default=4096, help="image rows per retrieval call")
    ap.add_argument("--concept-chunk", type=int, default=16384, help="concepts per retrieval scan step")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ovjax.data import clip_model, embed_cache, retrieval

    try:
        report = balance(args.raw, args.concepts, args.encoder, args.out, top_k=args.top_k, target=args.target,
                         replace=not args.no_replace, seed=args.seed, alpha=args.alpha, power=args.power,
                         cache_dir=args.cache, chunk_size=args.chunk_size, batch_size=args.batch_size,
                         image_chunk=args.image_chunk, concept_chunk=args.concept_chunk,
                         progress=not args.no_progress)
    except (BalanceInputError, concept_stats.BalanceError, clip_model.EncoderError, embed_cache.CacheError,
            retrieval.RetrievalError, selection.SelectionError) as e:
        print(f"balance: error: {e}", file=sys.stderr)
        return 1
    b, a = report["before"], report["after"]
    print(f"balance: {report['picked']} picks ({report['distinct_samples_picked']} distinct) of {report['samples']} "
          f"samples ({report['samples_without_images']} without images left out) -> {args.out}\n"
          f"  concepts covered {b['concepts_covered']} -> {a['concepts_covered']} of {b['concepts']}, top-1% share "
          f"{b['top1pct_share']:.4f} -> {a['top1pct_share']:.4f}, entropy {b['entropy_nats']:.3f} -> "
          f"{a['entropy_nats']:.3f} nats", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

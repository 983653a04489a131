"""Weighted mixtures of converted raw datasets -> a selection manifest that `pack --input SEL.json` reads.

    python -m ovjax mix --source data/raw-captions:3 --source data/raw-chat:1 --target 100000 --seed 0 \\
        --out data/selections/mix.json

Each `--source RAW_DIR:WEIGHT` is a converted raw directory and a positive weight. The number of picks is
`--target N`, or `--epochs E` = E times the records of all sources together; source i gets the share
weight_i / sum(weights) of it (largest remainders, so the counts add up exactly). A source's picks walk
seeded permutations of its records: every record once before any record twice, whole passes as often as
its share needs (a share over the source's size repeats it; under it, a seeded subset). The picks of all
sources are then interleaved by one seeded permutation. Same sources, weights, count and seed -> the same
picks file, byte for byte. The manifest's `producer` records the weights, the requested and realised shares,
and each source's records, picks and passes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from ovjax.data import io, selection


class MixError(ValueError):
    """Bad mixture arguments; the message names the argument and the problem."""


def parse_source(spec: str) -> tuple[str, float]:
    """'RAW_DIR:WEIGHT' -> (RAW_DIR, WEIGHT); the last ':' splits, so a directory may hold ':'."""
    path, sep, weight = spec.rpartition(":")
    try:
        w = float(weight) if sep and path else float("nan")
    except ValueError:
        w = float("nan")
    if not w > 0 or not np.isfinite(w):
        raise MixError(f"--source {spec!r}: expected RAW_DIR:WEIGHT with a positive finite weight")
    return path, w


def shares(total: int, weights: Sequence[float]) -> np.ndarray:
    """int64 [S]: `total` split in proportion to `weights` by largest remainders (ties: lower index first)."""
    w = np.asarray(weights, np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    return counts


def record_index(raw_dir: str) -> np.ndarray:
    """int64 [R, 2]: (shard, record) of every record of a converted raw directory, in shard order."""
    meta, _ = io.read_complete_manifest(raw_dir, MixError)
    rows = [(s, r) for s, sh in enumerate(meta.get("shards", [])) for r in range(int(sh["records"]))]
    if not rows:
        raise MixError(f"--source {raw_dir}: the directory holds no records")
    return np.asarray(rows, np.int64)


def source_picks(n_records: int, n_picks: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [n_picks]: record indices, whole seeded permutations first, then a seeded part of one more."""
    passes, rest = divmod(n_picks, n_records)
    parts = [rng.permutation(n_records) for _ in range(passes)]
    parts.append(rng.permutation(n_records)[:rest])
    return np.concatenate(parts).astype(np.int64)


def mix(sources: Sequence[tuple[str, float]], out: str, *, seed: int, target: int | None = None,
        epochs: float | None = None) -> dict:
    """Writes the selection manifest `out` (+ its .picks.npy); returns the header."""
    if not sources:
        raise MixError("give at least one --source RAW_DIR:WEIGHT")
    if (target is None) == (epochs is None):
        raise MixError("give exactly one of --target N and --epochs E")
    dirs = [d for d, _ in sources]
    if len(set(dirs)) != len(dirs):
        raise MixError(f"a source is listed twice: {sorted(d for d in set(dirs) if dirs.count(d) > 1)[0]}")
    index = [record_index(d) for d in dirs]
    sizes = [len(ix) for ix in index]
    if epochs is not None:
        if not (epochs > 0 and np.isfinite(epochs)):
            raise MixError(f"--epochs {epochs}: must be a positive number")
        target = int(round(epochs * sum(sizes)))
    if target < 1:
        raise MixError(f"--target {target}: must be at least 1")
    weights = [w for _, w in sources]
    counts = shares(target, weights)
    rng = np.random.default_rng(seed)
    per_source = []
    for s, (ix, n) in enumerate(zip(index, counts)):
        recs = source_picks(len(ix), int(n), np.random.default_rng([seed, s]))
        per_source.append(np.column_stack([np.full(len(recs), s, np.int64), ix[recs]]))
    picks = np.concatenate(per_source)[rng.permutation(target)]
    total_w = float(sum(weights))
    producer = {
        "step": "mix", "seed": seed, "target": target, "epochs": epochs,
        "sources": [{"dir": d, "weight": w, "requested_share": w / total_w, "records": n_rec, "picks": int(n),
                     "realised_share": int(n) / target, "passes": int(n) / n_rec}
                    for (d, w), n_rec, n in zip(sources, sizes, counts)],
    }
    return selection.write_selection(out, dirs, picks, producer)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovjax mix", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--source", action="append", default=[], metavar="RAW_DIR:WEIGHT",
                   help="a converted raw directory and its weight (repeatable)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--target", type=int, help="picks in all")
    how.add_argument("--epochs", type=float, help="picks = EPOCHS x the records of all sources together")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="SEL.json", help="selection manifest to write")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        header = mix([parse_source(s) for s in args.source], args.out, seed=args.seed, target=args.target,
                     epochs=args.epochs)
    except (MixError, selection.SelectionError) as e:
        print(f"mix: error: {e}", file=sys.stderr)
        return 2
    got = ", ".join(f"{s['dir']}: {s['picks']} ({s['realised_share']:.4f} of {s['requested_share']:.4f}, "
                    f"{s['passes']:.2f} passes)" for s in header["producer"]["sources"])
    print(f"mix: {header['num_picks']} picks -> {args.out}; {got}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Concept frequencies, inverse-frequency sample weights, a seeded resample, and the balance report.

Weights (smoothing documented here and in the README): with f_c the number of samples whose top-K holds
concept c, a sample whose top-K concepts are c_1..c_K gets

    w = (1/K) * sum_k (f_{c_k} + alpha) ** (-power)

`alpha` (default 1) is additive smoothing: it keeps weights finite and damps the boost of concepts seen in a
single sample (a concept seen once weighs 1/(1+alpha), not 1); `power` (default 1, plain inverse frequency)
below 1 tempers the flattening (0.5: inverse square root). Samples without images get no concepts and
weight 0 (they are never picked; the report counts them).

Resampling to N (deterministic in the seed, numpy PCG64):
  with replacement     N draws from the weights by inverse CDF: searchsorted(cumsum(w)/sum(w), u, "right")
                       with u = default_rng(seed).random(N);
  without replacement  Efraimidis-Spirakis: key_i = log(u_i) / w_i, the N largest keys (ties: lower index).
Picks come back sorted by sample index (`pack` shuffles with its own seed).
"""

from __future__ import annotations

import math

import numpy as np


class BalanceError(ValueError):
    """Arguments that cannot be balanced (target, smoothing); one line naming the problem."""


def concept_counts(top_ids: np.ndarray, num_concepts: int, sample_counts: np.ndarray | None = None) -> np.ndarray:
    """int64 [C]: occurrences of each concept over the rows of top_ids [N, K], each row counted
    sample_counts[i] times (default once; 0 leaves a row out)."""
    top_ids = np.asarray(top_ids)
    mult = np.ones(len(top_ids), np.int64) if sample_counts is None else np.asarray(sample_counts, np.int64)
    return np.bincount(top_ids.ravel(), weights=np.repeat(mult, top_ids.shape[1]).astype(np.float64),
                       minlength=num_concepts).round().astype(np.int64)


def inverse_frequency_weights(top_ids: np.ndarray, valid: np.ndarray, num_concepts: int, *, alpha: float = 1.0,
                              power: float = 1.0) -> np.ndarray:
    """float64 [N] sample weights (module docstring); rows with valid=False weigh 0."""
    if alpha < 0 or not math.isfinite(alpha):
        raise BalanceError(f"smoothing alpha must be a finite number >= 0, got {alpha}")
    if power < 0 or not math.isfinite(power):
        raise BalanceError(f"power must be a finite number >= 0, got {power}")
    freq = concept_counts(top_ids, num_concepts, valid.astype(np.int64)).astype(np.float64)
    per_concept = np.zeros_like(freq)
    seen = freq > 0
    per_concept[seen] = (freq[seen] + alpha) ** (-power)
    w = per_concept[top_ids].mean(axis=1)
    return np.where(valid, w, 0.0)


def resample(weights: np.ndarray, target: int, *, seed: int, replace: bool) -> np.ndarray:
    """int64 [target] sample indices drawn by `weights` (module docstring), sorted."""
    w = np.asarray(weights, np.float64)
    eligible = int((w > 0).sum())
    if target < 1:
        raise BalanceError(f"target {target} must be at least 1")
    if eligible == 0:
        raise BalanceError("no sample has a positive weight (no sample with images?)")
    rng = np.random.default_rng(seed)
    if replace:
        cdf = np.cumsum(w)
        cdf /= cdf[-1]
        picks = np.searchsorted(cdf, rng.random(target), side="right")
        return np.sort(np.minimum(picks, len(w) - 1)).astype(np.int64)
    if target > eligible:
        raise BalanceError(f"target {target} exceeds the {eligible} samples with images; sampling without "
                           "replacement cannot pick more (use replacement)")
    u = rng.random(len(w))
    with np.errstate(divide="ignore"):
        keys = np.where(w > 0, np.log(u) / np.where(w > 0, w, 1.0), -np.inf)
    order = np.lexsort((np.arange(len(w)), -keys))
    return np.sort(order[:target]).astype(np.int64)


def distribution_stats(counts: np.ndarray) -> dict:
    """Concepts covered, share of occurrences taken by the most frequent 1% of concepts (at least one concept),
    Shannon entropy (nats) of the concept distribution, normalised entropy (/ log C) and exp(entropy)."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    c = counts.size
    top = max(1, math.ceil(0.01 * c))
    p = counts[counts > 0] / max(total, 1)
    entropy = float(-(p * np.log(p)).sum()) if total else 0.0
    return {"concepts": c, "occurrences": total, "concepts_covered": int((counts > 0).sum()),
            "top1pct_concepts": top, "top1pct_share": float(np.sort(counts)[-top:].sum() / total) if total else 0.0,
            "entropy_nats": entropy, "normalized_entropy": entropy / math.log(c) if c > 1 else 0.0,
            "effective_concepts": math.exp(entropy)}


def plot_histograms(before: np.ndarray, after: np.ndarray, path: str) -> None:
    """PNG: rank-frequency curves and histograms of per-concept counts, before and after balancing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    top = max(int(before.max(initial=0)), int(after.max(initial=0)), 1)
    bins = np.unique(np.geomspace(1, top + 1, 30).astype(np.int64))
    for counts, label in ((before, "before"), (after, "after")):
        ranked = np.sort(counts)[::-1]
        ranked = ranked[ranked > 0]
        ax1.plot(np.arange(1, ranked.size + 1), ranked, label=f"{label} ({ranked.size} concepts)")
        ax2.hist(counts[counts > 0], bins=bins, alpha=0.5, label=label)
    ax1.set(xscale="log", yscale="log", xlabel="concept rank", ylabel="occurrences", title="rank-frequency")
    ax2.set(xscale="log", yscale="log", xlabel="occurrences of a concept", ylabel="concepts",
            title="concept-frequency histogram")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

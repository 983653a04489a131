"""The packing planner, pure: per-sample lengths in, a plan of bins out (no I/O; `ovjax.data.pack` reads and
writes the data). A bin holds at most `seq_len` tokens, `max_patches` ViT patches, `max_segments` samples and
`max_images` images. The plan depends only on the lengths and the seed.

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

import dataclasses
import math

import numpy as np

_UNLIMITED = 1 << 62

REASON_EMPTY = "empty"
REASON_TOKENS = "too_many_tokens"
REASON_PATCHES = "too_many_patches"
REASON_IMAGES = "too_many_images"


class PackError(ValueError):
    """Bad input or arguments for packing."""


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

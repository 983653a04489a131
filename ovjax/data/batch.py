"""The packed-batch contract (design.md, "The packed batch") as data, and the one writer of its rows.

Every batch that reaches the model, whatever made it (the loader, eval, the HF adapter, synthetic and test
batches), is a dict of these fields. B = rows, T = seq_len, P = max_patches, D = patch dim (3*14*14 = 588):

    tokens        int32 [B, T]      token ids, <|image_pad|> at image-feature positions
    targets       int32 [B, T]      next-token targets, shifted inside each packed sample, never across
    loss_mask     bool  [B, T]      True where targets[t] is supervised
    segment_ids   int32 [B, T]      1..S per packed sample, 0 = padding
    positions     int32 [B, T]      restart at 0 for every packed sample
    patches       float [B, P, D]   flattened patches, 2x2-block order, images back to back
    patch_segment int32 [B, P]      1..I per image of the row, 0 = padding patches
    patch_hw      int32 [B, P, 2]   (h, w) of each patch inside its image grid

`FIELDS` holds each field's dtype, symbolic shape and logical axes (names of `ovjax.sharding.RULES`, which
alone maps them to mesh axes). `RowWriter` fills one row sample by sample and image by image.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ovjax.data import images
from ovjax.data.images import patch_positions

PATCH_DIM = 3 * images.PATCH_SIZE * images.PATCH_SIZE


@dataclasses.dataclass(frozen=True)
class Field:
    """One array of the batch. dims: symbolic sizes ("B", "T", "P", "D" or a number); logical: one logical
    axis name (or None) per dim."""

    name: str
    dtype: Any
    dims: tuple[str | int, ...]
    logical: tuple[str | None, ...]
    doc: str


FIELDS: tuple[Field, ...] = (
    Field("tokens", np.int32, ("B", "T"), ("act_batch", "act_seq"),
          "token ids, <|image_pad|> at image-feature positions"),
    Field("targets", np.int32, ("B", "T"), ("act_batch", "act_seq"),
          "next-token targets, shifted inside each packed sample, never across"),
    Field("loss_mask", np.bool_, ("B", "T"), ("act_batch", "act_seq"), "True where targets[t] is supervised"),
    Field("segment_ids", np.int32, ("B", "T"), ("act_batch", "act_seq"), "1..S per packed sample, 0 = padding"),
    Field("positions", np.int32, ("B", "T"), ("act_batch", "act_seq"), "restart at 0 for every packed sample"),
    Field("patches", np.float32, ("B", "P", "D"), ("act_batch", "act_patches", None),
          "flattened 14x14 RGB patches, 2x2-block order, images back to back"),
    Field("patch_segment", np.int32, ("B", "P"), ("act_batch", "act_patches"),
          "1..I per image of the row, 0 = padding patches"),
    Field("patch_hw", np.int32, ("B", "P", 2), ("act_batch", "act_patches", None),
          "(h, w) of each patch inside its image grid, for the 2-D RoPE"),
)
FIELD = {f.name: f for f in FIELDS}
BATCH_KEYS = tuple(f.name for f in FIELDS)
TOKEN_KEYS = tuple(f.name for f in FIELDS if f.dims[:2] == ("B", "T"))
IMAGE_KEYS = tuple(f.name for f in FIELDS if f.dims[:2] == ("B", "P"))


class BatchError(ValueError):
    """A row that breaks the contract (too many tokens or patches, bad arrays)."""


def patch_dim(vision_cfg) -> int:
    """Values per patch row of a vision config: in_channels * temporal_patch_size * patch_size^2."""
    return int(vision_cfg.in_channels * vision_cfg.temporal_patch_size * vision_cfg.patch_size ** 2)


def shapes(rows: int, seq_len: int, max_patches: int | None, *, patch_dim: int = PATCH_DIM,
           patch_dtype=np.float32) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of a batch; max_patches None = text-only (no image fields)."""
    size = {"B": rows, "T": seq_len, "P": max_patches, "D": patch_dim}
    out = {}
    for f in FIELDS:
        if f.name in IMAGE_KEYS and max_patches is None:
            continue
        dtype = patch_dtype if f.name == "patches" else f.dtype
        out[f.name] = (tuple(size[d] if isinstance(d, str) else d for d in f.dims), np.dtype(dtype))
    return out


def struct(model_cfg, rows: int, seq_len: int, max_patches: int) -> dict:
    """jax.ShapeDtypeStruct of every field of a batch for `model_cfg` (text-only when it has no vision)."""
    import jax

    v = model_cfg.vision
    pd = patch_dim(v) if v is not None else PATCH_DIM
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in
            shapes(rows, seq_len, max_patches if v is not None else None, patch_dim=pd).items()}


def batch_struct(cfg, batch_size: int | None = None) -> dict:
    """`struct` of a run config: train.batch_size (or `batch_size`) rows of train.seq_len / max_patches."""
    t = cfg.train
    return struct(cfg.model, batch_size or t.batch_size, t.seq_len, t.max_patches)


def zeros(structs: dict) -> dict[str, np.ndarray]:
    """Host zeros for a dict of shapes/structs (anything with .shape and .dtype)."""
    return {k: np.zeros(s.shape, s.dtype) for k, s in structs.items()}


class RowWriter:
    """Fills one packed row: samples one after another in the token buffer [T], images back to back in the
    patch buffer [P, D]. `row()` returns the arrays of `shapes(1, ...)` without the leading B.

    first_image: images numbered before this row (the upstream adapter numbers ViT segments across its
    whole batch); image k of this row gets patch_segment first_image + k.
    """

    def __init__(self, seq_len: int, max_patches: int | None, *, patch_dim: int = PATCH_DIM,
                 patch_dtype=np.float32, merge_size: int = images.MERGE_SIZE, first_image: int = 0):
        self.seq_len, self.max_patches, self.merge_size = seq_len, max_patches, merge_size
        self._arrays = {k: np.zeros(s[1:], d) for k, (s, d) in
                        shapes(1, seq_len, max_patches, patch_dim=patch_dim, patch_dtype=patch_dtype).items()}
        self.tokens_used = self.patches_used = self.samples = self.images = self.supervised = 0
        self._next_image = first_image

    def add_sample(self, tokens: Sequence[int], supervised=None) -> None:
        """Append one sample. tokens int [L]; supervised bool [L] (None: nothing): token i is a training
        target, so targets[i-1] = tokens[i] is marked in loss_mask."""
        tokens = np.asarray(tokens)
        n, t = len(tokens), self.tokens_used
        if t + n > self.seq_len:
            raise BatchError(f"more than seq_len={self.seq_len} tokens")
        a = self._arrays
        a["tokens"][t:t + n] = tokens
        a["targets"][t:t + n - 1] = tokens[1:]
        if supervised is not None:
            mask = np.asarray(supervised, dtype=bool)
            if mask.shape != tokens.shape:
                raise BatchError(f"supervised mask {mask.shape} does not match tokens {tokens.shape}")
            a["loss_mask"][t:t + n - 1] = mask[1:]
            self.supervised += int(np.count_nonzero(mask[1:]))
        self.samples += 1
        a["segment_ids"][t:t + n] = self.samples
        a["positions"][t:t + n] = np.arange(n, dtype=np.int32)
        self.tokens_used = t + n

    def add_image(self, patches: np.ndarray, grid) -> None:
        """Append one image's patch rows [t*gh*gw, D] (grid (t, gh, gw), rows as `images.preprocess`)."""
        if self.max_patches is None:
            raise BatchError("a text-only row (max_patches None) takes no image")
        k, p = len(patches), self.patches_used
        if k != int(np.prod([int(g) for g in grid])):
            raise BatchError(f"{k} patch rows for an image of grid {tuple(int(g) for g in grid)}")
        if p + k > self.max_patches:
            raise BatchError(f"more than max_patches={self.max_patches} patches")
        self._next_image += 1
        self.images += 1
        a = self._arrays
        a["patches"][p:p + k] = patches
        a["patch_segment"][p:p + k] = self._next_image
        a["patch_hw"][p:p + k] = patch_positions(grid, merge_size=self.merge_size)
        self.patches_used = p + k

    def row(self) -> dict[str, np.ndarray]:
        return self._arrays


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """[row dicts] -> batch dict [B, ...] (keys of the first row)."""
    if not rows:
        raise BatchError("no rows to stack")
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

"""Image preprocessing of Qwen2-VL / LLaVA-OneVision-1.5 (temporal_patch_size 1), in numpy + PIL.

Pipeline, identical to transformers' `Qwen2VLImageProcessorPil` with temporal_patch_size=1:
  decode -> RGB (alpha composited onto white) -> smart_resize to multiples of patch*merge (28) ->
  PIL bicubic resize of the uint8 image -> x/255 (in float64, then float32) -> (x - CLIP mean) / CLIP std
  (float32) -> patch rows of 3*14*14 = 588 values, each row flattened as (channel, temporal=1, 14, 14).

Row order ("2x2-block-major"): the patch grid (gh, gw) is cut into merge cells of 2x2 patches; cells are
taken row-major over (gh/2, gw/2) and, inside a cell, patches top-left, top-right, bottom-left,
bottom-right. So rows 4k..4k+3 are the 4 patches the merger fuses into the k-th vision token.
`patch_positions(grid)` gives the (h, w) patch coordinate of every row in that order.
"""

from __future__ import annotations

import io
import math
import re

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_SIZE = 14
MERGE_SIZE = 2
MIN_PIXELS = 3136
MAX_PIXELS = 2560000
MAX_ASPECT_RATIO = 200

# Stable reasons of ImageRejected.
REJECT_REASONS = ("undecodable", "bad_aspect_ratio", "degenerate_size", "image_too_large")


class Rejected(ValueError):
    """A sample cannot be used; `.reason` is a stable short string, `.detail` says why in words."""

    reasons: tuple[str, ...] = ()

    def __init__(self, reason: str, detail: str = ""):
        if self.reasons and reason not in self.reasons:
            raise ValueError(f"{type(self).__name__}: unknown reason {reason!r}, known {self.reasons}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class ImageRejected(Rejected):
    """An image cannot be used (reasons in `images.REJECT_REASONS`)."""

    reasons = REJECT_REASONS


def smart_resize(height: int, width: int, *, factor: int = PATCH_SIZE * MERGE_SIZE, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """Target (h, w), multiples of `factor`, with h*w in about [min_pixels, max_pixels], aspect kept.

    Round each side to the nearest multiple (Python round: halves to even); if the area is above
    max_pixels, shrink both by sqrt(area/max) and floor to multiples (at least `factor`); if below
    min_pixels, grow by sqrt(min/area) and ceil. Raises ImageRejected("bad_aspect_ratio") when the long
    side is more than 200x the short one, ImageRejected("degenerate_size") for empty sizes.
    """
    if height < 1 or width < 1:
        raise ImageRejected("degenerate_size", f"image of {height}x{width} pixels")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageRejected("bad_aspect_ratio", f"aspect ratio {ratio:.1f} of {height}x{width} exceeds "
                                                f"{MAX_ASPECT_RATIO}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    if h < factor or w < factor:
        raise ImageRejected("degenerate_size", f"{height}x{width} resizes to {h}x{w} with min_pixels="
                                               f"{min_pixels}")
    return h, w


def image_grid(height: int, width: int, *, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
               min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> tuple[int, int, int]:
    """Patch grid (1, gh, gw) of an image of height x width pixels after smart_resize."""
    h, w = smart_resize(height, width, factor=patch_size * merge_size, min_pixels=min_pixels,
                        max_pixels=max_pixels)
    return 1, h // patch_size, w // patch_size


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of a PIL image (itself if already plain RGB); transparency (alpha band or palette/`transparency` info) over white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes (JPEG, PNG, WebP, ...) fully into an RGB PIL image.

    Raises ImageRejected("undecodable") for empty, truncated or unknown data and
    ImageRejected("image_too_large") when PIL flags a decompression bomb. EXIF orientation is not applied
    (neither does the reference processor).
    """
    if not data:
        raise ImageRejected("undecodable", "empty image data")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = to_rgb(im)
            rgb = rgb.copy() if rgb is im else rgb
    except Image.DecompressionBombError as e:
        raise ImageRejected("image_too_large", str(e)) from e
    except Exception as e:  # corrupt data makes decoders raise all kinds of errors; none is usable
        # drop object addresses ("<_io.BytesIO object at 0x...>") so reject logs are reproducible
        msg = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "data", str(e))
        raise ImageRejected("undecodable", f"{type(e).__name__}: {msg}") from e
    return rgb


def _normalize_lut() -> np.ndarray:
    """float32 [3, 256]: the normalised value of every uint8 level per channel, computed with the exact
    operation order of the reference (x * (1/255) in float64 -> float32, then (x - mean) / std in float32),
    so a table lookup reproduces it bit for bit."""
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None]
    return ((levels[None, :] - mean) / std).astype(np.float32)


_LUT = _normalize_lut()


def normalize_uint8(pixels: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Normalise uint8 patch rows [..., 588] (layout (channel, 14, 14)) to CLIP-normalised `dtype`."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.shape[-1] % 3:
        raise ValueError(f"expected uint8 rows of 3*p*p values, got {pixels.dtype} {pixels.shape}")
    per_channel = pixels.shape[-1] // 3
    chan = np.repeat(np.arange(3), per_channel)
    return _LUT[chan, pixels].astype(dtype, copy=False)


def _as_rgb(image) -> tuple[np.ndarray, Image.Image | None]:
    if isinstance(image, Image.Image):
        rgb = to_rgb(image)
        return np.asarray(rgb), rgb
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected a PIL image or a uint8 [H, W, 3] array, got {arr.dtype} {arr.shape}")
    return arr, None


def preprocess(image, *, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE, min_pixels: int = MIN_PIXELS,
               max_pixels: int = MAX_PIXELS, dtype=np.float32) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Resize, normalise and patchify one image.

    image: PIL image (any mode; converted to RGB) or uint8 [H, W, 3].
    Returns (patches [N, 3*patch*patch] of `dtype`, grid (1, gh, gw)) with N = gh*gw, rows in the
    2x2-block-major order of the module docstring. dtype=np.uint8 returns the resized pixels un-normalised
    (same layout; `normalize_uint8` finishes the job later, e.g. to ship 4x fewer bytes).
    """
    arr, pil = _as_rgb(image)
    height, width = arr.shape[:2]
    h, w = smart_resize(height, width, factor=patch_size * merge_size, min_pixels=min_pixels,
                        max_pixels=max_pixels)
    if (h, w) != (height, width):
        pil = Image.fromarray(arr, mode="RGB") if pil is None else pil
        arr = np.asarray(pil.resize((w, h), resample=Image.Resampling.BICUBIC))
    gh, gw = h // patch_size, w // patch_size
    m, p = merge_size, patch_size
    # [gh/m, m, p, gw/m, m, p, C] -> [gh/m, gw/m, m(h), m(w), C, p, p]
    blocks = arr.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    rows = blocks.reshape(gh * gw, 3 * p * p)
    if np.dtype(dtype) == np.uint8:
        return np.ascontiguousarray(rows), (1, gh, gw)
    return normalize_uint8(rows, dtype), (1, gh, gw)


def patch_positions(grid, *, merge_size: int = MERGE_SIZE) -> np.ndarray:
    """int32 [t*gh*gw, 2]: (h, w) patch coordinate of each row of `preprocess`, in the same order.

    grid: (t, gh, gw); frames (t > 1) repeat the spatial order frame after frame.
    """
    t, gh, gw = (int(x) for x in grid)
    m = merge_size
    if gh % m or gw % m or min(t, gh, gw) < 1:
        raise ValueError(f"grid {tuple(grid)} is not positive with h, w divisible by merge_size {m}")
    hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    # same reshape/transpose as the pixels: [gh/m, m, gw/m, m] -> [gh/m, gw/m, m, m]
    order = lambda a: a.reshape(gh // m, m, gw // m, m).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
    pos = np.stack([order(hh), order(ww)], axis=-1).astype(np.int32)
    return np.tile(pos, (t, 1))

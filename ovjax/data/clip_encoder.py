"""CLIP-family image/text embedding for `balance`: preprocessing, tokenising, batched jitted towers.

The towers are `ovjax.data.clip_model` (our Flax port of transformers' CLIPModel; why a port: see there).
The tokenizer loads with `AutoTokenizer` (no trust_remote_code). Image preprocessing follows
CLIPImageProcessor's steps: RGB, resize the shortest side to `size.shortest_edge` (PIL bicubic), center crop
to `crop_size`, scale to [0, 1], normalise by image_mean / image_std (`preprocessor_config.json` when
present, else the CLIP defaults at the config's image_size).

Shapes: pixels float32 [B, 3, S, S]; token ids int32 [B, T] with T the text tower's max_position_embeddings;
embeddings float32 [B, E] (E = projection_dim), L2-normalised.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ovjax.data import images as image_ops
from ovjax.data.clip_model import ClipConfig, ClipModel, EncoderError, load_clip


# ----------------------------------------------------------------------------------------------- encoder

@dataclasses.dataclass(frozen=True)
class ImagePrep:
    shortest_edge: int
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def image_prep(path: str | os.PathLike, cfg: ClipConfig) -> ImagePrep:
    """Preprocessing of `preprocessor_config.json` if present, else CLIP's defaults at the model's size."""
    prep = ImagePrep(cfg.image_size, (cfg.image_size, cfg.image_size), tuple(image_ops.CLIP_MEAN),
                     tuple(image_ops.CLIP_STD))
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(file):
        return prep
    with open(file, encoding="utf-8") as f:
        pc = json.load(f)
    size, crop = pc.get("size", {}), pc.get("crop_size", {})
    edge = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    crop_hw = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
    prep = ImagePrep(int(edge or prep.shortest_edge), tuple(int(c or cfg.image_size) for c in crop_hw),
                     tuple(pc.get("image_mean", prep.mean)), tuple(pc.get("image_std", prep.std)))
    if prep.crop != (cfg.image_size, cfg.image_size):
        raise EncoderError(f"{file}: crop_size {prep.crop} differs from the model's image_size {cfg.image_size}")
    return prep


def preprocess(data: bytes, prep: ImagePrep) -> np.ndarray:
    """Encoded image bytes -> float32 [3, H, W] (CLIPImageProcessor's steps, see the module docstring)."""
    im = image_ops.decode_image(data)
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = prep.shortest_edge, int(prep.shortest_edge * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    im = im.resize(size, resample=Image.Resampling.BICUBIC)
    ch, cw = prep.crop
    top, left = int((im.height - ch) / 2.0), int((im.width - cw) / 2.0)
    arr = np.asarray(im.crop((left, top, left + cw, top + ch)), np.float32) * np.float32(1 / 255)
    arr = (arr - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _l2_normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ClipEncoder:
    """Batched, jitted image and text embedding (L2-normalised float32 [N, E]) of a local CLIP checkpoint.

    Batches are padded to `batch_size` (a multiple of the batch-shard count when a mesh is given, rows
    split over the mesh's batch axes, params replicated), so each tower compiles once.
    """

    def __init__(self, path: str | os.PathLike | None, *, batch_size: int = 64, mesh=None,
                 weights: tuple[ClipConfig, dict] | None = None):
        """path: a local transformers CLIP directory; or None with weights=(config, params) (no tokenizer:
        images only, default CLIP preprocessing; what the benchmark uses)."""
        from transformers import AutoTokenizer

        if path is not None:
            self.cfg, params = load_clip(path)
            self.prep = image_prep(path, self.cfg)
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        elif weights is not None:
            self.cfg, params = weights
            self.prep = ImagePrep(self.cfg.image_size, (self.cfg.image_size,) * 2, tuple(image_ops.CLIP_MEAN),
                                  tuple(image_ops.CLIP_STD))
            self.tokenizer = None
        else:
            raise EncoderError("ClipEncoder needs a model directory or weights=(config, params)")
        model = ClipModel(self.cfg)
        row_sharding = None
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            from ovjax import sharding

            shards = sharding.axis_size(mesh, sharding.BATCH_AXES)
            batch_size = -(-batch_size // shards) * shards
            row_sharding = sharding.row_sharding(mesh, 2)
            params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        self.batch_size = batch_size
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        out = {} if row_sharding is None else {"out_shardings": row_sharding}
        self._images = jax.jit(lambda p, x: _l2_normalize(model.apply({"params": p}, x,
                                                                      method=ClipModel.image_features)), **out)
        self._texts = jax.jit(lambda p, i, m: _l2_normalize(model.apply({"params": p}, i, m,
                                                                        method=ClipModel.text_features)), **out)

    @property
    def dim(self) -> int:
        return self.cfg.projection_dim

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(n, start + self.batch_size)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        pad = self.batch_size - x.shape[0]
        return np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x

    def embed_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [N, 3, S, S] -> float32 [N, E]."""
        out = []
        for a, b in self._batches(len(pixels)):
            out.append(np.asarray(self._images(self.params, self._pad(pixels[a:b])))[: b - a])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def embed_images(self, encoded: list[bytes]) -> np.ndarray:
        """Encoded images -> float32 [N, E]."""
        out = []
        for a, b in self._batches(len(encoded)):
            pixels = np.stack([preprocess(d, self.prep) for d in encoded[a:b]])
            out.append(self.embed_pixels(pixels))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [N, T], mask int32 [N, T]), T = max_position_embeddings; eos appended when the
        tokenizer does not add it (CLIP's pooling reads the eos position). Too long a text is an error."""
        if self.tokenizer is None:
            raise EncoderError("this encoder was built from bare weights and has no tokenizer")
        t, eos = self.cfg.max_positions, self.cfg.eos_token_id
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        ids = np.full((len(texts), t), pad, np.int32)
        mask = np.zeros((len(texts), t), np.int32)
        for i, text in enumerate(texts):
            toks = list(self.tokenizer(text)["input_ids"])
            if eos not in toks:
                toks.append(eos)
            if len(toks) > t:
                raise EncoderError(f"text {i} ({text[:40]!r}) has {len(toks)} tokens, the text tower takes {t}")
            ids[i, : len(toks)] = toks
            mask[i, : len(toks)] = 1
        return ids, mask

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Strings -> float32 [N, E]."""
        out = []
        for a, b in self._batches(len(texts)):
            ids, mask = self.tokenize(texts[a:b])
            out.append(np.asarray(self._texts(self.params, self._pad(ids), self._pad(mask)))[: b - a])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

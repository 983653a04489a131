"""LLaVA-OneVision-1.5: RICE-ViT -> 2x2 patch merger -> Qwen3, image features scattered in order into the
`<|image_pad|>` positions of each row.

Batch layout (design.md, "The packed batch"): tokens/positions/segment_ids [B, T]; patches [B, P, 588],
patch_segment [B, P], patch_hw [B, P, 2]. The k-th `<|image_pad|>` of a row receives the k-th merged feature
of that row (4 consecutive patches of one image make one feature).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ovjax.data import batch as batch_lib
from ovjax.data.images import patch_positions  # noqa: F401 (tests and benches import it from here)
from ovjax.models import lora
from ovjax.models.layers import constrain
from ovjax.models.projector import PatchMerger
from ovjax.models.qwen3 import Qwen3
from ovjax.models.vision import VisionTower

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name) -> Any:
    if not isinstance(name, str):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def scatter_image_features(embeds, tokens, features, image_token_id: int):
    """embeds [B, T, H], tokens [B, T], features [B, F, H] -> embeds with the k-th image token of each row
    replaced by features[:, k]. Rows with more image tokens than features reuse the last one (the data
    layer guarantees equal counts; `check_image_tokens` verifies it outside jit)."""
    is_image = tokens == image_token_id
    index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
    gathered = jnp.take_along_axis(features, index[..., None], axis=1)
    return jnp.where(is_image[..., None], gathered.astype(embeds.dtype), embeds)


class VLM(nn.Module):
    """The whole model. Parameters: visual (ViT), merger, language_model (Qwen3); with `cfg.lora.rank` > 0
    also LoRA adapters beside the targeted projections' kernels (ovjax/models/lora.py)."""
    cfg: Any  # a model config (configs/models.py), frozen

    def setup(self):
        c = self.cfg
        kw = dict(dtype=dtype_of(c.dtype), param_dtype=dtype_of(c.param_dtype))
        adapters = c.get("lora") if lora.enabled(c) else None
        if c.vision is not None:
            self.visual = VisionTower(c.vision, c.attention_impl, c.remat, lora=adapters, **kw)
            self.merger = PatchMerger(c.vision, **kw)
        self.language_model = Qwen3(c.text, c.attention_impl, c.remat, lora=adapters, **kw)

    def image_features(self, patches, patch_segment, patch_hw, num_images: int):
        """-> merged features [B, P/4, H_text]."""
        feats = constrain(self.visual(patches, patch_segment, patch_hw, num_images),
                          ("act_batch", "act_patches", "act_vit_embed"))
        return constrain(self.merger(feats), ("act_batch", None, "act_embed"))

    def embed(self, tokens, patches=None, patch_segment=None, patch_hw=None, num_images: int = 0,
              zero_images: bool = False):
        """Token embeddings with image features in place: [B, T, H]. zero_images: the features scattered
        into the image positions are zeros (the no-image control of eval)."""
        x = self.language_model.embed(tokens)
        if patches is not None:
            feats = self.image_features(patches, patch_segment, patch_hw, num_images)
            if zero_images:
                feats = jnp.zeros_like(feats)
            x = scatter_image_features(x, tokens, feats, self.cfg.image_token_id)
        return x

    def __call__(self, tokens, positions, segment_ids, patches=None, patch_segment=None, patch_hw=None,
                 num_images: int = 0, cache=None, zero_images: bool = False):
        """-> (hidden [B, T, H] after the final norm, cache). Use `logits` for the vocabulary projection."""
        x = self.embed(tokens, patches, patch_segment, patch_hw, num_images, zero_images)
        return self.language_model(x, positions, segment_ids, cache)

    def logits(self, hidden):
        return self.language_model.logits(hidden)

    def head_kernel(self):
        return self.language_model.head_kernel()


def freeze(cfg) -> ml_collections.FrozenConfigDict:
    return cfg if isinstance(cfg, ml_collections.FrozenConfigDict) else ml_collections.FrozenConfigDict(cfg)


def check_image_tokens(tokens, patch_segment, image_token_id: int, merge: int = 2) -> None:
    """Raise ValueError if a row's image-token count differs from its merged-feature count (host side)."""
    tokens = np.asarray(tokens)
    n_tokens = (tokens == image_token_id).sum(axis=1)
    n_feats = (np.asarray(patch_segment) > 0).sum(axis=1) // (merge * merge)
    bad = np.nonzero(n_tokens != n_feats)[0]
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"row {r} has {int(n_tokens[r])} image tokens but {int(n_feats[r])} image features")


def upstream_to_batch(input_ids, pixel_values=None, image_grid_thw=None, *, image_token_id: int, merge: int = 2,
                      patch_multiple: int = 4) -> dict:
    """The upstream processor's layout -> our batch (numpy).

    input_ids [B, T]; pixel_values [sum t*h*w, 588] (all images of the batch, row after row);
    image_grid_thw [N, 3]. Images go to rows in order of their image tokens. Positions are 0..T-1 and every
    token is in segment 1 (as upstream: no padding handling). Each video frame / image is its own ViT segment.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {input_ids.shape}")
    b, t = input_ids.shape
    n_image_tokens = (input_ids == image_token_id).sum(axis=1)
    if pixel_values is None:
        if n_image_tokens.any():
            raise ValueError(f"input_ids hold {int(n_image_tokens.sum())} image tokens but no pixel_values were given")
        rows = []
        for r in range(b):
            writer = batch_lib.RowWriter(t, None)
            writer.add_sample(input_ids[r])
            rows.append(writer.row())
        return batch_lib.stack_rows(rows)
    pixel_values = np.asarray(pixel_values, np.float32)
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    sizes = grids.prod(axis=1)
    if pixel_values.ndim != 2 or pixel_values.shape[0] != sizes.sum():
        raise ValueError(f"pixel_values {pixel_values.shape} do not hold the {int(sizes.sum())} patches of "
                         f"image_grid_thw {grids.tolist()}")
    if ((grids[:, 1] % merge) | (grids[:, 2] % merge)).any() or (grids <= 0).any():
        raise ValueError(f"image grids {grids.tolist()} must be positive with h, w divisible by {merge}")
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    # Assign images to rows: row r takes images until its image-token count is used up.
    rows, img = [], 0
    for r in range(b):
        need, mine = int(n_image_tokens[r]), []
        while need > 0:
            if img >= len(grids):
                raise ValueError(f"row {r} has more image tokens than the images given")
            mine.append(img)
            need -= int(sizes[img]) // (merge * merge)
            img += 1
        if need < 0:
            raise ValueError(f"row {r}: image tokens do not match whole images")
        rows.append(mine)
    if img != len(grids):
        raise ValueError(f"{len(grids) - img} images were given beyond the image tokens of input_ids")
    per_row = [int(sum(sizes[i] for i in mine)) for mine in rows]
    p = max(max(per_row), 1)
    p = -(-p // patch_multiple) * patch_multiple
    # Segments are numbered across the whole batch (as the upstream's one flat ViT call sees them), so
    # `remote_code_cls_shift` treats exactly the images the upstream treats as "after the first"; each
    # frame of a video is its own segment.
    out, seg = [], 0
    for r, mine in enumerate(rows):
        writer = batch_lib.RowWriter(t, p, patch_dim=pixel_values.shape[1], merge_size=merge, first_image=seg)
        writer.add_sample(input_ids[r])
        for i in mine:
            tt, hh, ww = (int(x) for x in grids[i])
            for f in range(tt):
                start = int(offsets[i]) + f * hh * ww
                writer.add_image(pixel_values[start:start + hh * ww], (1, hh, ww))
        seg += writer.images
        out.append(writer.row())
    batch = batch_lib.stack_rows(out)
    batch["num_images"] = max(seg, 1)
    return batch


def init_params(cfg, rng, *, boxed: bool = False):
    """Random params of `cfg`. boxed=True keeps the logical-axis metadata (nn.Partitioned) for sharding."""
    module = VLM(freeze(cfg))
    b = batch_lib.zeros(batch_lib.struct(cfg, rows=1, seq_len=8, max_patches=4))
    # Under jit: one compiled init instead of op-by-op dispatch through the scanned layers.
    init = jax.jit(module.init, static_argnames="num_images")
    variables = init(rng, b["tokens"], b["positions"], b["segment_ids"], b.get("patches"),
                     b.get("patch_segment"), b.get("patch_hw"), num_images=1 if cfg.vision is not None else 0)
    return variables["params"] if boxed else nn.meta.unbox(variables["params"])


def abstract_params(cfg, *, boxed: bool = False):
    """Shapes and dtypes of the params, nothing allocated."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0), boxed=boxed))

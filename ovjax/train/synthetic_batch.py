"""Random packed batches in the design.md layout, for tests and benchmarks (numpy, host side).

Each row packs `samples_per_row` samples, then padding. A sample is
`[vision_start, image_pad x K, vision_end, text...]` with an image of grid (1, h, w) (K = h*w/4) when it
has one, else text only; the second half of its text is supervised. Targets are shifted inside each sample,
never across; positions restart at 0 per sample; images go back to back into the row's patch buffer.
"""

from __future__ import annotations

import numpy as np

from ovjax.models.vlm import patch_positions


def synthetic_batch(model_cfg, batch: int, seq_len: int, max_patches: int, max_images: int, seed: int = 0,
                    samples_per_row: int = 2, grids=((1, 2, 2), (1, 2, 4), (1, 4, 2), (1, 4, 4))) -> dict:
    rng = np.random.default_rng(seed)
    v, t = model_cfg.vision, model_cfg.text
    merge = v.spatial_merge_size
    pix = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    special = {model_cfg.image_token_id, model_cfg.video_token_id, model_cfg.vision_start_token_id,
               model_cfg.vision_end_token_id}
    text_ids = np.array([i for i in range(t.vocab_size) if i not in special])
    out = {k: np.zeros((batch, seq_len), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    out["loss_mask"] = np.zeros((batch, seq_len), bool)
    out["patches"] = np.zeros((batch, max_patches, pix), np.float32)
    out["patch_segment"] = np.zeros((batch, max_patches), np.int32)
    out["patch_hw"] = np.zeros((batch, max_patches, 2), np.int32)
    budget = seq_len // samples_per_row
    for r in range(batch):
        at, p_at, n_img = 0, 0, 0
        for s in range(samples_per_row):
            grid = grids[rng.integers(len(grids))]
            n_patch = int(np.prod(grid))
            with_image = n_img < max_images and p_at + n_patch <= max_patches and rng.random() < 0.8
            k = n_patch // merge ** 2 if with_image else 0
            n_text = int(rng.integers(4, max(5, budget - k - 2 - 2)))
            ids = list(rng.choice(text_ids, n_text))
            if with_image:
                ids = [model_cfg.vision_start_token_id] + [model_cfg.image_token_id] * k + \
                      [model_cfg.vision_end_token_id] + ids
            ids = ids[:budget - 1]  # leaves padding at the end of the row
            n = len(ids)
            if with_image and n < k + 2:
                raise ValueError("seq_len too small for the synthetic images")
            sl = slice(at, at + n)
            out["tokens"][r, sl] = ids
            out["targets"][r, at:at + n - 1] = ids[1:]
            out["segment_ids"][r, sl] = s + 1
            out["positions"][r, sl] = np.arange(n)
            first_text = (k + 2) if with_image else 0
            start = first_text + (n - first_text) // 2
            out["loss_mask"][r, at + start:at + n - 1] = True
            if with_image:
                n_img += 1
                out["patches"][r, p_at:p_at + n_patch] = rng.standard_normal((n_patch, pix)).astype(np.float32)
                out["patch_segment"][r, p_at:p_at + n_patch] = n_img
                out["patch_hw"][r, p_at:p_at + n_patch] = patch_positions(grid, merge)
                p_at += n_patch
            at += n
    return out

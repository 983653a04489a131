"""Random packed batches in the design.md layout, for tests and benchmarks (numpy, host side).

Each row packs `samples_per_row` samples, then padding. A sample is
`[vision_start, image_pad x K, vision_end, text...]` with an image of grid (1, h, w) (K = h*w/4) when it
has one, else text only; the second half of its text is supervised. Targets are shifted inside each sample,
never across; positions restart at 0 per sample; images go back to back into the row's patch buffer.
"""

from __future__ import annotations

import numpy as np

from ovjax.data import batch as batch_lib


def synthetic_batch(model_cfg, batch: int, seq_len: int, max_patches: int, max_images: int, seed: int = 0,
                    samples_per_row: int = 2, grids=((1, 2, 2), (1, 2, 4), (1, 4, 2), (1, 4, 4))) -> dict:
    """-> numpy batch of the contract: [batch, seq_len] token fields, [batch, max_patches, ...] image fields."""
    rng = np.random.default_rng(seed)
    v, t = model_cfg.vision, model_cfg.text
    merge = v.spatial_merge_size
    pix = batch_lib.patch_dim(v)
    special = {model_cfg.image_token_id, model_cfg.video_token_id, model_cfg.vision_start_token_id,
               model_cfg.vision_end_token_id}
    text_ids = np.array([i for i in range(t.vocab_size) if i not in special])
    budget = seq_len // samples_per_row
    rows = []
    for _ in range(batch):
        writer = batch_lib.RowWriter(seq_len, max_patches, patch_dim=pix, merge_size=merge)
        for _ in range(samples_per_row):
            grid = grids[rng.integers(len(grids))]
            n_patch = int(np.prod(grid))
            with_image = (writer.images < max_images and writer.patches_used + n_patch <= max_patches
                          and rng.random() < 0.8)
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
            first_text = (k + 2) if with_image else 0
            supervised = np.zeros(n, bool)
            supervised[first_text + (n - first_text) // 2 + 1:] = True  # the second half of the text
            writer.add_sample(ids, supervised)
            if with_image:
                writer.add_image(rng.standard_normal((n_patch, pix)).astype(np.float32), grid)
        rows.append(writer.row())
    return batch_lib.stack_rows(rows)

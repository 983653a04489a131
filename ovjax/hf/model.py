"""A config + a param pytree with a jit'ed `logits` over the upstream processor's layout (for parity checks,
export and generation). The forward pass is the model's own (`VLM`); nothing here re-implements it."""

from __future__ import annotations

import jax

from ovjax.configs import models as model_configs
from ovjax.models.vlm import VLM, freeze, upstream_to_batch


class Model:
    """cfg (our model config), params (param tree, any sharding), source (the directory it came from)."""

    def __init__(self, cfg, params, source: str | None = None):
        model_configs.validate(cfg)
        self.cfg = freeze(cfg)
        self.params = params
        self.source = source
        self.module = VLM(self.cfg)
        self._forward = jax.jit(self._logits_fn, static_argnames=("num_images",))

    def _logits_fn(self, params, batch, num_images):
        hidden, _ = self.module.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                      batch.get("patches"), batch.get("patch_segment"), batch.get("patch_hw"),
                                      num_images=num_images)
        return self.module.apply({"params": params}, hidden, method=VLM.logits)

    def logits(self, input_ids, pixel_values=None, image_grid_thw=None):
        """input_ids [B, T], pixel_values [N, 588], image_grid_thw [I, 3] (the upstream layout) -> [B, T, V]."""
        if pixel_values is not None and self.cfg.vision is None:
            raise ValueError("this is a text-only model; pixel_values cannot be used")
        merge = self.cfg.vision.spatial_merge_size if self.cfg.vision is not None else 2
        batch = upstream_to_batch(input_ids, pixel_values, image_grid_thw, image_token_id=self.cfg.image_token_id,
                                  merge=merge)
        num_images = batch.pop("num_images", 0)
        vocab = self.cfg.text.vocab_size
        if (batch["tokens"] < 0).any() or (batch["tokens"] >= vocab).any():
            raise ValueError(f"input_ids must lie in [0, {vocab})")
        return self._forward(self.params, batch, num_images=num_images)


def from_params(cfg, params) -> Model:
    """Wrap a param pytree (e.g. from training) as a Model for `logits` and `save`."""
    return Model(cfg, params)

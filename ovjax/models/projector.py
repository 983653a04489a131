"""The 2x2 patch merger (`visual.merger`): LayerNorm per patch, 4 consecutive patches -> one feature,
Linear(4D -> 4D) -> exact GELU -> Linear(4D -> H_text)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ovjax.models.layers import Dense, LayerNorm


class PatchMerger(nn.Module):
    cfg: Any  # the `vision` section
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features):
        """features [B, P, D] (P divisible by merge^2) -> merged [B, P / merge^2, out_hidden_size]."""
        c = self.cfg
        group = c.spatial_merge_size ** 2
        b, p, d = features.shape
        if p % group:
            raise ValueError(f"patch buffer of {p} is not a multiple of {group}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(d, c.layer_norm_eps, "vit_embed", self.param_dtype, name="ln_q")(features)
        x = x.reshape(b, p // group, group * d)
        x = Dense((group * d,), (group * d,), ("merger_in",), ("merger_mlp",), use_bias=True, name="fc1", **kw)(x)
        x = nn.gelu(x, approximate=False)
        return Dense((group * d,), (c.out_hidden_size,), ("merger_mlp",), ("embed",), use_bias=True, name="fc2",
                     **kw)(x)

"""RICE-ViT over a packed patch buffer (the MLCD network; spec/model.md section 2).

Input per row: `patches [B, P, 588]` (flattened (channel, 14, 14) patches, images back to back in the
2x2-block order), `patch_segment [B, P]` (1..I per image, 0 = padding) and `patch_hw [B, P, 2]` (the
patch's row and column in its image grid, for the 2-D rotary). One CLS token per image slot is appended
after the patches (`num_images` static slots, CLS j belongs to segment j+1): attention is bidirectional
inside a segment, so where the CLS sits in the buffer changes nothing but keeps the shapes static. The CLS
tokens use the learned `class_pos_emb` angles and are dropped at the end; output is the last block's raw
output (no post-LayerNorm) `[B, P, D]`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ovjax.models import rope
from ovjax.models.attention import attention
from ovjax.models.layers import Dense, LayerNorm, constrain, maybe_remat, param


class VisionBlock(nn.Module):
    """Pre-norm block: x += proj(attn(LN1 x)); x += fc2(gelu(fc1(LN2 x))). x [B, N, D]."""
    cfg: Any
    attention_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        c = self.cfg
        d, heads = c.hidden_size, c.num_heads
        hd = d // heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain(x, ("act_batch", "act_patches", "act_vit_embed"))
        h = LayerNorm(d, c.layer_norm_eps, "vit_embed", self.param_dtype, name="norm1")(x)
        qkv = Dense((d,), (3, heads, hd), ("vit_embed",), ("qkv", "vit_heads", "vit_head_dim"), use_bias=True,
                    name="qkv", **kw)(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = rope.apply_rotary(q, cos, sin)
        k = rope.apply_rotary(k, cos, sin)
        o = attention(q, k, v, segment_ids, causal=False, impl=self.attention_impl)
        x = x + Dense((heads, hd), (d,), ("vit_heads", "vit_head_dim"), ("vit_embed",), use_bias=True,
                      name="proj", **kw)(o)
        h = LayerNorm(d, c.layer_norm_eps, "vit_embed", self.param_dtype, name="norm2")(x)
        h = Dense((d,), (c.intermediate_size,), ("vit_embed",), ("vit_mlp",), use_bias=True, name="fc1", **kw)(h)
        h = nn.gelu(h, approximate=False)
        h = Dense((c.intermediate_size,), (d,), ("vit_mlp",), ("vit_embed",), use_bias=True, name="fc2", **kw)(h)
        return x + h, None


class VisionTower(nn.Module):
    cfg: Any  # the `vision` section of a model config
    attention_impl: str = "xla"
    remat: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, patches, patch_segment, patch_hw, num_images: int):
        """patches [B, P, 588], patch_segment int [B, P], patch_hw int [B, P, 2] -> features [B, P, D]."""
        c = self.cfg
        d = c.hidden_size
        hd = d // c.num_heads
        b, p, pix = patches.shape
        expected = c.in_channels * c.temporal_patch_size * c.patch_size ** 2
        if pix != expected:
            raise ValueError(f"patch rows have {pix} values, the config expects {expected}")
        x = Dense((pix,), (d,), ("vit_patch",), ("vit_embed",), name="patch_embed",
                  dtype=self.dtype, param_dtype=self.param_dtype)(patches)
        cls = param(self, "class_embedding", ("vit_embed",), (d,), nn.initializers.normal(d ** -0.5),
                    self.param_dtype)
        cls_angles = param(self, "class_pos_emb", (None, "vit_head_dim"), (1, hd // 2),
                           nn.initializers.normal((hd // 2) ** -0.5), self.param_dtype)
        x = jnp.concatenate([x, jnp.broadcast_to(cls.astype(x.dtype), (b, num_images, d))], axis=1)
        cls_segments = jnp.broadcast_to(jnp.arange(1, num_images + 1, dtype=jnp.int32), (b, num_images))
        segment_ids = jnp.concatenate([patch_segment.astype(jnp.int32), cls_segments], axis=1)
        angles = jnp.concatenate(
            [rope.vision_angles(patch_hw, hd, c.rope_theta),
             jnp.broadcast_to(cls_angles.astype(jnp.float32), (b, num_images, hd // 2))], axis=1)
        cos, sin = rope.cos_sin(angles)

        x = LayerNorm(d, c.layer_norm_eps, "vit_embed", self.param_dtype, name="pre_layernorm")(x)
        block = maybe_remat(VisionBlock, self.remat)
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = blocks(c, self.attention_impl, self.dtype, self.param_dtype, name="blocks")(x, cos, sin, segment_ids)
        out = x[:, :p]
        if c.get("remote_code_cls_shift", False):
            out = _remote_code_cls_shift(out, x[:, p:], patch_segment)
        return out


def _remote_code_cls_shift(patch_out, cls_out, patch_segment):
    """The released remote code strips CLS tokens at the pre-CLS offsets, so every image after the first in a
    call comes out shifted by one: [CLS_j, p_0, ..., p_{n-2}]. Reproduced (as an option) for logit parity.

    patch_out [B, P, D], cls_out [B, M, D], patch_segment [B, P] -> [B, P, D]."""
    seg = patch_segment
    first = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    shifted = jnp.concatenate([jnp.zeros_like(patch_out[:, :1]), patch_out[:, :-1]], axis=1)
    own_cls = jnp.take_along_axis(cls_out, jnp.clip(seg - 1, 0, cls_out.shape[1] - 1)[..., None], axis=1)
    return jnp.where((seg > 1)[..., None], jnp.where(first[..., None], own_cls, shifted), patch_out)

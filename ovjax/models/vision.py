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

from ovjax.models import layers, lora, rope
from ovjax.models.attention import attention
from ovjax.models.layers import Dense, LayerNorm, constrain, maybe_remat, param


class VisionBlock(nn.Module):
    """Pre-norm block: x += proj(attn(LN1 x)); x += fc2(gelu(fc1(LN2 x))). x [B, N, D]."""
    cfg: Any
    attention_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: Any = None  # the model's `lora` section (ovjax/models/lora.py) or None

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        c = self.cfg
        d, heads = c.hidden_size, c.num_heads
        hd = d // heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def Dense(*args, name, **more):  # noqa: N802 (the layer, with this projection's adapter if any)
            return layers.Dense(*args, name=name, **more, **lora.dense_kwargs(self.lora, name, vision=True))
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
    lora: Any = None

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
        x, _ = blocks(c, self.attention_impl, self.dtype, self.param_dtype, self.lora, name="blocks")(x, cos, sin, segment_ids)
        out = x[:, :p]
        if c.get("remote_code_cls_shift", False):
            out = _remote_code_cls_windows(out, x[:, p:], patch_segment)
        return out


def _remote_code_cls_windows(patch_out, cls_out, patch_segment):
    """The released remote code's CLS stripping, reproduced exactly (an option, for logit parity).

    Upstream runs all images of a call as one flat buffer [CLS_0, image 0, CLS_1, image 1, ...] and then keeps,
    for image k, the window [cu_k + 1, cu_{k+1} + 1) of that buffer, where cu_k counts only the *patches* of
    the images before k (it ignores the k CLS tokens inserted before image k). So image k's window starts k
    slots early: its first k-1 rows are the last k-1 outputs of image k-1 (further back if that image is
    shorter), row k-1 is CLS_k's output, and rows k.. are its own patches 0..n_k-k-1 (its last k are lost).
    Image 0 is exact; with two images this is "shifted by one", with more the displacement grows.

    Images are numbered across the whole batch (as upstream's one ViT call sees them): segment s in any row
    is image s-1; patches of an image are contiguous in its row.
    patch_out [B, P, D], cls_out [B, M, D] (CLS j of segment j+1), patch_segment [B, P] -> [B, P, D]."""
    b, p, d = patch_out.shape
    m = cls_out.shape[1]
    seg = patch_segment.reshape(-1).astype(jnp.int32)
    flat = jnp.arange(b * p, dtype=jnp.int32)
    valid = seg > 0
    image = jnp.where(valid, seg - 1, m)                       # m collects the padding
    sizes = jnp.zeros(m + 1, jnp.int32).at[image].add(1)[:m]
    first = jnp.full(m + 1, b * p, jnp.int32).at[image].min(flat)[:m]   # flat index of each image's patch 0
    cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(sizes)])
    k = jnp.clip(image, 0, m - 1)
    window = cu[k] + 1 + (flat - first[k])                     # upstream buffer slot this output row reads
    cls_slot = cu[:m] + jnp.arange(m, dtype=jnp.int32)          # where CLS_j sits in the upstream buffer
    src = jnp.clip(jnp.searchsorted(cls_slot, window, side="right") - 1, 0, m - 1)
    q = window - cls_slot[src]                                 # 0: CLS_src, else patch q-1 of image src
    from_patch = patch_out.reshape(b * p, d)[jnp.clip(first[src] + q - 1, 0, b * p - 1)]
    from_cls = cls_out[jnp.clip(first[src] // p, 0, b - 1), src]
    read = jnp.where((q == 0)[:, None], from_cls, from_patch)
    return jnp.where(valid[:, None], read, patch_out.reshape(b * p, d)).reshape(b, p, d)

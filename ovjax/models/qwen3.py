"""Qwen3 decoder: RMSNorm pre-norm blocks, qk-norm over head_dim before 1-D RoPE, GQA, SwiGLU MLP,
untied lm_head, layers stacked and scanned, and a KV-cache path for generation.

Activations are [B, T, H]; attention heads [B, T, heads, head_dim].
KV cache (a dict, see `init_cache`): k, v [L, B, S, Hkv, hd], segment [B, S] (-1 = empty slot),
positions [B, S], index () int32 = the next slot to write.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovjax.models import layers, lora, rope
from ovjax.models.attention import attention
from ovjax.models.layers import RMSNorm, constrain, maybe_remat

EMPTY_SLOT = -1


class DecoderLayer(nn.Module):
    cfg: Any  # the `text` section
    attention_impl: str = "xla"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: Any = None  # the model's `lora` section (ovjax/models/lora.py) or None

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, positions, layer_cache, cache_meta):
        c = self.cfg
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def Dense(*args, name, **more):  # noqa: N802 (the layer, with this projection's adapter if any)
            return layers.Dense(*args, name=name, **more, **lora.dense_kwargs(self.lora, name))
        h_, hq, hkv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        h = RMSNorm(h_, c.rms_norm_eps, "embed", self.param_dtype, name="input_layernorm")(x)
        q = Dense((h_,), (hq, hd), ("embed",), ("q_heads", "head_dim"), name="q_proj", **kw)(h)
        k = Dense((h_,), (hkv, hd), ("embed",), ("kv_heads", "head_dim"), name="k_proj", **kw)(h)
        v = Dense((h_,), (hkv, hd), ("embed",), ("kv_heads", "head_dim"), name="v_proj", **kw)(h)
        q = RMSNorm(hd, c.rms_norm_eps, "head_dim", self.param_dtype, name="q_norm")(q)
        k = RMSNorm(hd, c.rms_norm_eps, "head_dim", self.param_dtype, name="k_norm")(k)
        q = rope.apply_rotary(q, cos, sin)
        k = rope.apply_rotary(k, cos, sin)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
        if layer_cache is None:
            # Sequence parallelism: queries stay sharded over `sequence`, K/V are all-gathered (full T).
            k = constrain(k, ("act_batch", None, "act_kv_heads", None))
            v = constrain(v, ("act_batch", None, "act_kv_heads", None))
            o = attention(q, k, v, segment_ids, causal=True, impl=self.attention_impl, seq_axis="act_seq")
            new_cache = None
        else:
            kv_segment, kv_positions, index = cache_meta
            ck = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype), index, 1)
            cv = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype), index, 1)
            o = attention(q, ck.astype(q.dtype), cv.astype(q.dtype), segment_ids, causal=True, impl="xla",
                          kv_segment_ids=kv_segment, q_positions=positions, kv_positions=kv_positions)
            new_cache = {"k": ck, "v": cv}
        x = x + Dense((hq, hd), (h_,), ("q_heads", "head_dim"), ("embed",), name="o_proj", **kw)(o)
        h = RMSNorm(h_, c.rms_norm_eps, "embed", self.param_dtype, name="post_attention_layernorm")(x)
        gate = Dense((h_,), (c.intermediate_size,), ("embed",), ("mlp",), name="gate_proj", **kw)(h)
        up = Dense((h_,), (c.intermediate_size,), ("embed",), ("mlp",), name="up_proj", **kw)(h)
        act = constrain(nn.silu(gate) * up, ("act_batch", "act_seq", "act_mlp"))
        x = x + Dense((c.intermediate_size,), (h_,), ("mlp",), ("embed",), name="down_proj", **kw)(act)
        return x, new_cache


class Qwen3(nn.Module):
    """The language model: embed_tokens, scanned layers, final norm, lm_head."""
    cfg: Any  # the `text` section
    attention_impl: str = "xla"
    remat: str = "none"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora: Any = None

    def setup(self):
        c = self.cfg
        self.embed_tokens = self.param(
            "embed_tokens", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (c.vocab_size, c.hidden_size), self.param_dtype)
        layer = maybe_remat(DecoderLayer, self.remat)
        self.layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                              length=c.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(
            c, self.attention_impl, self.dtype, self.param_dtype, self.lora)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, "embed", self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = self.param(
                "lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                (c.hidden_size, c.vocab_size), self.param_dtype)

    def embed(self, tokens):
        """tokens int [B, T] -> [B, T, H]."""
        # Gather the table over the FSDP axes first: a lookup into an embed-sharded table would give an
        # output sharded on H that the partitioner can only reshard to the batch layout by replicating it.
        table = constrain(self.embed_tokens, ("vocab", None))
        return constrain(jnp.take(table, tokens, axis=0).astype(self.dtype), ("act_batch", "act_seq", "act_embed"))

    def __call__(self, x, positions, segment_ids, cache=None):
        """x [B, T, H] input embeddings, positions/segment_ids int [B, T] -> (hidden [B, T, H] after the
        final norm, updated cache or None)."""
        c = self.cfg
        cos, sin = rope.cos_sin(rope.text_angles(positions, c.head_dim, c.rope_theta))
        if cache is None:
            x, _ = self.layers(x, cos, sin, segment_ids, positions, None, None)
            new_cache = None
        else:
            index = cache["index"]
            kv_segment = jax.lax.dynamic_update_slice_in_dim(cache["segment"], segment_ids.astype(jnp.int32), index, 1)
            kv_positions = jax.lax.dynamic_update_slice_in_dim(cache["positions"], positions.astype(jnp.int32),
                                                               index, 1)
            x, kv = self.layers(x, cos, sin, segment_ids, positions, {"k": cache["k"], "v": cache["v"]},
                                (kv_segment, kv_positions, index))
            new_cache = {"k": kv["k"], "v": kv["v"], "segment": kv_segment, "positions": kv_positions,
                         "index": index + x.shape[1]}
        return self.norm(x), new_cache

    def head_kernel(self):
        """[H, V] projection to the vocabulary (the untied lm_head, or embed_tokens transposed)."""
        return self.embed_tokens.T if self.cfg.tie_word_embeddings else self.lm_head

    def logits(self, hidden):
        """hidden [B, T, H] -> float32 logits [B, T, V]."""
        w = self.head_kernel().astype(self.dtype)
        out = jnp.einsum("bth,hv->btv", hidden.astype(self.dtype), w, preferred_element_type=jnp.float32)
        return constrain(out, ("act_batch", "act_seq", "act_vocab"))


def init_cache(cfg, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """An empty KV cache for `cfg` (the `text` section)."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment": jnp.full((batch, max_len), EMPTY_SLOT, jnp.int32),
            "positions": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}

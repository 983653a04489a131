"""XLA reference attention: grouped-query, segment-masked, causal or bidirectional.

This is the numerical ground truth for the Pallas kernels and the `impl="xla"` path of the model.
Shapes: q [B, T, Hq, D]; k, v [B, S, Hkv, D] with Hq a multiple of Hkv. K/V are never repeated in
memory: queries are viewed as [B, T, Hkv, G, D] and contracted against their group's K/V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_segment_ids, kv_segment_ids, causal: bool, q_positions=None, kv_positions=None):
    """Boolean [B, T, S] mask: True where query t may attend key s.

    Tokens attend only within their own segment id (padding, id 0, attends to padding only, so no row is
    ever empty). With `causal`, key position <= query position; positions default to 0..T-1 / 0..S-1.
    """
    b, t = q_segment_ids.shape
    s = kv_segment_ids.shape[1]
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        qp = jnp.arange(t)[None, :] if q_positions is None else q_positions
        kp = jnp.arange(s)[None, :] if kv_positions is None else kv_positions
        mask = mask & (kp[:, None, :] <= qp[:, :, None])
    return mask


def mha_reference(q, k, v, segment_ids=None, causal: bool = False, *, sm_scale: float | None = None,
                  kv_segment_ids=None, q_positions=None, kv_positions=None):
    """Attention output [B, T, Hq, D] (dtype of q), softmax in float32.

    segment_ids: int [B, T] for the queries (None: one segment); kv_segment_ids: int [B, S] for the keys
    (defaults to segment_ids, which needs S == T).
    """
    b, t, hq, d = q.shape
    _, s, hkv, _ = k.shape
    if hq % hkv:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {hkv}")
    if v.shape != k.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} differ")
    groups = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    if kv_segment_ids is None:
        if s != t:
            raise ValueError("kv_segment_ids are needed when keys and queries differ in length")
        kv_segment_ids = segment_ids
    mask = attention_mask(segment_ids, kv_segment_ids, causal, q_positions, kv_positions)

    qg = q.reshape(b, t, hkv, groups, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)

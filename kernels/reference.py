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
    t = q_segment_ids.shape[1]
    s = kv_segment_ids.shape[1]
    mask = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    if causal:
        qp = jnp.arange(t)[None, :] if q_positions is None else q_positions
        kp = jnp.arange(s)[None, :] if kv_positions is None else kv_positions
        mask = mask & (kp[:, None, :] <= qp[:, :, None])
    return mask


def mha_reference(q, k, v, segment_ids=None, causal: bool = False, *, sm_scale: float | None = None,
                  kv_segment_ids=None, q_positions=None, kv_positions=None, q_chunk_size: int | None = 1024):
    """Attention output [B, T, Hq, D] (dtype of q), softmax in float32.

    segment_ids: int [B, T] for the queries (None: one segment); kv_segment_ids: int [B, S] for the keys
    (defaults to segment_ids, which needs S == T). q_chunk_size: above this many queries (when it divides T)
    the queries are processed in chunks to bound memory; None = never.
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
    if q_positions is None and causal:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    chunk = q_chunk_size or t
    if t <= chunk:
        return _attend(q, k, v, segment_ids, kv_segment_ids, causal, q_positions, kv_positions, scale, groups)

    # Long sequences: queries in chunks under a scan, each chunk rematerialised in the backward pass, so the
    # [T, S] logits and probabilities never exist at once (memory O(chunk * S) instead of O(T * S)); the same
    # math per query row. Queries are padded to a multiple of the chunk (padded rows see nothing; sliced off).
    n = -(-t // chunk)
    pad = n * chunk - t
    if pad:
        def pad_rows(x, value):
            return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
        q = pad_rows(q, 0)
        segment_ids = pad_rows(segment_ids, jnp.iinfo(jnp.int32).min)
        if q_positions is not None:
            q_positions = pad_rows(q_positions, 0)
    attend = jax.checkpoint(_attend, static_argnums=(5, 8, 9))

    def split(x):
        return None if x is None else jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

    def body(_, xs):
        qc, sc, pc = xs
        return None, attend(qc, k, v, sc, kv_segment_ids, causal, pc, kv_positions, scale, groups)

    _, out = jax.lax.scan(body, None, (split(q), split(segment_ids), split(q_positions)))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, hq, d)[:, :t]


def _attend(q, k, v, q_segment_ids, kv_segment_ids, causal, q_positions, kv_positions, scale, groups):
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    mask = attention_mask(q_segment_ids, kv_segment_ids, causal, q_positions, kv_positions)
    qg = q.reshape(b, t, hkv, groups, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)

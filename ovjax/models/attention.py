"""The one attention entry point of ovjax models.

`attention(q, k, v, segment_ids, causal, impl)`: q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D].
Every implementation honours segment ids (packed samples never see each other); one that cannot
refuses packed input instead of dropping the mask.
"""

from __future__ import annotations

from ovjax.kernels.reference import mha_reference

IMPLS = ("xla", "pallas", "cudnn", "auto")


def attention(q, k, v, segment_ids=None, causal: bool = False, impl: str = "xla", *, sm_scale=None,
              kv_segment_ids=None, q_positions=None, kv_positions=None):
    """Dispatch to an attention implementation. See kernels/reference.py for the exact semantics."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    if impl == "xla":
        return mha_reference(q, k, v, segment_ids, causal, sm_scale=sm_scale, kv_segment_ids=kv_segment_ids,
                             q_positions=q_positions, kv_positions=kv_positions)
    raise NotImplementedError(f"attention impl {impl!r} is not built yet")

"""The one attention entry point of ovjax models.

`attention(q, k, v, segment_ids, causal, impl)`: q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D].
Every implementation honours segment ids (packed samples never see each other); one that cannot
refuses packed input instead of dropping the mask.

impl:
- "xla": `kernels/reference.py`, the ground truth; the only path for KV-cache decode (S != T, positions).
- "pallas": ovjax's flash kernel (`kernels/flash_attention.py`): Triton on GPU, the Pallas interpreter
  elsewhere (slow; for tests). Self-attention only (S == T, no kv_segment_ids / positions).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only, bf16/fp16, and only without
  segment ids (it has no exact segment mask; its seq_lengths are padding lengths, not segments).
- "auto": pallas on GPU, xla elsewhere and for decode. Never drops segments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ovjax.kernels.reference import mha_reference

IMPLS = ("xla", "pallas", "cudnn", "auto")
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def _on_gpu() -> bool:
    return jax.default_backend() in _GPU_PLATFORMS


def _decode_args(q, k, kv_segment_ids, q_positions, kv_positions) -> list[str]:
    """Names of the arguments that make this call a cross-length / KV-cache call (empty: self-attention)."""
    found = [name for name, x in (("kv_segment_ids", kv_segment_ids), ("q_positions", q_positions),
                                  ("kv_positions", kv_positions)) if x is not None]
    if q.shape[1] != k.shape[1]:
        found.append(f"S={k.shape[1]} != T={q.shape[1]}")
    return found


def attention(q, k, v, segment_ids=None, causal: bool = False, impl: str = "xla", *, sm_scale=None,
              kv_segment_ids=None, q_positions=None, kv_positions=None):
    """Dispatch to an attention implementation. See kernels/reference.py for the exact semantics."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    decode = _decode_args(q, k, kv_segment_ids, q_positions, kv_positions)
    if impl == "auto":
        impl = "pallas" if _on_gpu() and not decode else "xla"
    if impl == "xla":
        return mha_reference(q, k, v, segment_ids, causal, sm_scale=sm_scale, kv_segment_ids=kv_segment_ids,
                             q_positions=q_positions, kv_positions=kv_positions)
    if decode:
        raise ValueError(f"attention impl {impl!r} supports self-attention only (S == T, no kv segment ids or "
                         f"positions); got {', '.join(decode)}. Use impl='xla' or 'auto' for KV-cache decode.")
    if impl == "pallas":
        from ovjax.kernels.flash_attention import flash_attention

        return flash_attention(q, k, v, segment_ids, causal, sm_scale=sm_scale, interpret=not _on_gpu())
    # cudnn
    if segment_ids is not None:
        raise ValueError("attention impl 'cudnn' cannot honour segment ids (packed input); use impl='pallas', "
                         "'auto' or 'xla'")
    if not _on_gpu():
        raise ValueError(f"attention impl 'cudnn' needs a GPU backend, this is {jax.default_backend()!r}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention impl 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")
    return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal, implementation="cudnn")

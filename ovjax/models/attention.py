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

The kernel on a mesh: XLA cannot partition an opaque kernel (a Triton custom call would gather the global
q/k/v onto every device), so the pallas path runs per device under `jax.shard_map`, with specs from the
logical-axis rule table (`ovjax.sharding.attention_specs`: batch over the batch axes, heads over `tensor`;
this module names no mesh axis). The mesh is the one in context, i.e. the abstract mesh set by
`jax.set_mesh(mesh)` or by `ovjax.sharding.activation_rules(mesh)` (which the train step enters), unless an
explicit `mesh=` is passed (it must then equal the context mesh, if any). No mesh (or one device): the
kernel runs on the arrays as they are.

Sequence parallelism: with `seq_axis="act_seq"` (the LLM) the queries stay split over the axis that
logical name maps to, K/V and their segment ids are all-gathered (full S), and each shard's kernel gets its
global query offset, so causal masking and segments are exact across shard boundaries.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ovjax import sharding
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
              kv_segment_ids=None, q_positions=None, kv_positions=None, mesh=None, seq_axis: str | None = None):
    """Dispatch to an attention implementation. See kernels/reference.py for the exact semantics.

    q [B, T, Hq, D], k/v [B, S, Hkv, D] -> [B, T, Hq, D]. mesh: a Mesh / AbstractMesh for the pallas path's
    shard_map (default: the context mesh, see the module docstring). seq_axis: logical name of the query token
    axis ("act_seq" for the LLM; None: tokens are not split), used by the pallas path only.
    """
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
        return _pallas(q, k, v, segment_ids, causal, sm_scale, mesh, seq_axis)
    # cudnn
    if segment_ids is not None:
        raise ValueError("attention impl 'cudnn' cannot honour segment ids (packed input); use impl='pallas', "
                         "'auto' or 'xla'")
    if not _on_gpu():
        raise ValueError(f"attention impl 'cudnn' needs a GPU backend, this is {jax.default_backend()!r}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention impl 'cudnn' needs bfloat16 or float16 inputs, got {q.dtype}")
    return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal, implementation="cudnn")


def _pallas(q, k, v, segment_ids, causal, sm_scale, mesh, seq_axis):
    """The flash kernel, per device under shard_map when a mesh of more than one device is in use."""
    from ovjax.kernels.flash_attention import flash_attention

    kernel = functools.partial(flash_attention, causal=causal, sm_scale=sm_scale, interpret=not _on_gpu())
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v, segment_ids)
    specs = sharding.attention_specs(mesh, q.shape, k.shape, seq_axis)
    packed = segment_ids is not None

    def per_device(q, k, v, *segments):
        """Local q [b, t, hq, D] (t = T / sequence shards) against local k/v [b, S, hkv, D]."""
        seg_q, seg_k = segments if packed else (None, None)
        if not specs.sequence_axes:
            return kernel(q, k, v, seg_q)
        offset = specs.query_offset(q.shape[1])
        return kernel(q, k, v, seg_q, kv_segment_ids=seg_k, q_offset=offset)

    in_specs = (specs.q, specs.kv, specs.kv) + ((specs.q_segments, specs.kv_segments) if packed else ())
    args = (q, k, v) + ((segment_ids, segment_ids) if packed else ())
    # check_vma off: the kernel's outputs are per-device values; the transpose then psums the cotangents of
    # inputs that are replicated over an axis (K/V over `sequence`), which is exactly dK/dV's reduction.
    return jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=specs.q, check_vma=False)(*args)

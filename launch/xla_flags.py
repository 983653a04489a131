"""The XLA flag set for GPU training (FSDP over a scanned layer stack), kept in this one place.

Every launcher applies it: shell launchers through
    export XLA_FLAGS="$(python launch/xla_flags.py)"        # our flags, then the caller's XLA_FLAGS
Python launchers through `apply()` before jax initialises its backend. Flags the caller already set in
XLA_FLAGS win (ours with the same name are dropped), so a run can override any of them.

Why these (MaxText's and NVIDIA JAX-Toolbox's GPU recipes set the same family): FSDP all-gathers every
layer's weights in the forward and backward and reduce-scatters the gradients; the latency-hiding scheduler
overlaps those collectives with the previous/next layer's compute, the pipelined all-gather/reduce-scatter
(and double-buffered while loops) move them across iterations of the layer scan so they can overlap at all,
and the combine thresholds merge the many small per-tensor collectives of one layer into a few large ones.
All names exist in the XLA of jaxlib 0.10.2 (checked against its flag table); XLA aborts on unknown flags,
so launch/gpu_check.sh probes them once and runs without them (saying so) if the installed XLA refuses.
"""

from __future__ import annotations

import os
import sys

# Combine thresholds in bytes: one transformer layer of the 8b model holds ~0.4 GB of bf16 weights, so an
# all-gather of up to 128 MiB per device combines a layer's projections without holding several layers at once.
GPU_FLAGS: tuple[str, ...] = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_enable_all_gather_combine_by_dim=false",
    "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
)


def flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def merged(existing: str = "") -> str:
    """GPU_FLAGS followed by `existing` (an XLA_FLAGS value); ours whose name `existing` sets are dropped."""
    theirs = existing.split()
    taken = {flag_name(f) for f in theirs}
    return " ".join([f for f in GPU_FLAGS if flag_name(f) not in taken] + theirs)


def apply(environ=None) -> str:
    """Set XLA_FLAGS in `environ` (default os.environ) to the merged value; call before jax starts a backend."""
    environ = os.environ if environ is None else environ
    environ["XLA_FLAGS"] = merged(environ.get("XLA_FLAGS", ""))
    return environ["XLA_FLAGS"]


if __name__ == "__main__":
    sys.stdout.write(merged(os.environ.get("XLA_FLAGS", "")) + "\n")

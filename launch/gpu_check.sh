#!/usr/bin/env bash
# ovjax GPU check, under 6 minutes: kernel correctness (bf16, f32) first, then LLM attention at T=8192 vs
# cuDNN, packed, the ViT buffer, a representative train step (own process, own peak memory), then optional
# probes (cuDNN packed offsets, Mosaic-GPU attention_mgpu) and the block sweep. Details and order:
# launch/gpu_attention_bench.py. Installs nothing; needs jax (CUDA), flax, numpy.
#
#   bash launch/gpu_check.sh                      # on a GPU machine, from anywhere
#   GPU_CHECK_SMOKE=1 bash launch/gpu_check.sh    # tiny shapes, interpreted kernels: runs on a CPU
#
# Writes $OUT/gpu_check.json when OUT is set (after every measurement) and prints a markdown table.
# Exit 0 iff every correctness check passed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The GPU image lacks ml_collections (configs/models.py needs it for the train-step section). Carry its wheel:
#   pip download --no-deps -d launch/wheels ml-collections==1.1.0     (then carry launch/wheels to the device)
# Carried wheels are unpacked into a temporary folder on the path; nothing is installed into the image.
# (Without it, ovjax.bench.gpu_step installs a minimal stand-in for this process.)
if compgen -G "launch/wheels/*.whl" > /dev/null; then
  extra="$(mktemp -d)"
  for whl in launch/wheels/*.whl; do "$py" -m zipfile -e "$whl" "$extra"; done
  export PYTHONPATH="$extra:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1

# The one XLA flag set of ovjax (launch/xla_flags.py). XLA aborts on a flag it does not know, so probe once.
flags="$("$py" launch/xla_flags.py)"
if XLA_FLAGS="$flags" timeout 60 "$py" -c "import jax; jax.devices()" > /dev/null 2>&1; then
  export XLA_FLAGS="$flags"
  export GPU_CHECK_FLAGS_NOTE="applied"
else
  export GPU_CHECK_FLAGS_NOTE="rejected by this XLA (running without them): $flags"
  echo "[env] $GPU_CHECK_FLAGS_NOTE" >&2
fi

if [[ "${GPU_CHECK_SMOKE:-}" == "1" ]]; then
  default_timeout=1200  # interpreted kernels on a shared CPU: slow, and not what the 6 minutes are about
else
  default_timeout=355
fi
export GPU_CHECK_BUDGET_S="${GPU_CHECK_BUDGET_S:-330}"
exec timeout --signal=TERM --kill-after=5 "${GPU_CHECK_TIMEOUT_S:-$default_timeout}" "$py" launch/gpu_attention_bench.py

#!/usr/bin/env bash
# ovjax GPU check: the flash kernel against the XLA reference on the device, then attention timings
# (T=8192 LLM causal, unpacked and packed; T=16384 ViT packed) against XLA and cuDNN, then the train-step
# hook. Installs nothing; needs jax (CUDA), flax, numpy. Ends within ~8 minutes (hard stop at 470 s).
#
#   bash launch/gpu_check.sh                      # on a GPU machine, from anywhere
#   GPU_CHECK_SMOKE=1 bash launch/gpu_check.sh    # tiny shapes, interpreted kernels: runs on a CPU
#
# Writes $OUT/gpu_check.json when OUT is set and prints a markdown table. Exit 0 iff every check passed.
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
if compgen -G "launch/wheels/*.whl" > /dev/null; then
  extra="$(mktemp -d)"
  for whl in launch/wheels/*.whl; do "$py" -m zipfile -e "$whl" "$extra"; done
  export PYTHONPATH="$extra:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1
export GPU_CHECK_BUDGET_S="${GPU_CHECK_BUDGET_S:-400}"

exec timeout --signal=TERM --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-470}" "$py" launch/gpu_attention_bench.py

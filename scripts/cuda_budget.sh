#!/usr/bin/env bash
# The static instruction-budget gate of the CUDA kernels (issue 16; no GPU needed): compiles every
# cuda/budget/*.cu for sm_90a and sm_80, disassembles it and checks each kernel marked with a
# `// SALR_BUDGET ...` comment (scripts/cuda_budget.py says how). Exits non-zero above a marker's
# max_per_tile on sm_90a, on any spill / stack frame / local memory, or a forward branch in a main loop.
#   bash scripts/cuda_budget.sh [--out build/cuda-budget.md]
# Needs nvcc (CUDA_HOME, default /usr/local/cuda) and cuobjdump + nvdisasm (PATH, CUDA_HOME/bin, or
# the nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels in .venv: installed here when missing).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
# cuobjdump -sass runs nvdisasm: both wheels when the toolkit lacks them.
for tool in cuobjdump nvdisasm; do
  if ! command -v $tool >/dev/null && [ ! -x "$CUDA_HOME/bin/$tool" ] &&
    ! ls .venv/lib/python3*/site-packages/nvidia/cu*/bin/$tool >/dev/null 2>&1; then
    "$py" -m pip install -q "nvidia-cuda-$tool"
  fi
done
wheel_bin="$(ls -d .venv/lib/python3*/site-packages/nvidia/cu*/bin 2>/dev/null | head -1 || true)"
[ -n "$wheel_bin" ] && export PATH="$PATH:$root/$wheel_bin"
exec "$py" scripts/cuda_budget.py --jobs "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" "$@"

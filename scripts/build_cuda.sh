#!/usr/bin/env bash
# Builds salr with its CUDA kernels on a machine without a GPU (design.md §6) and checks what can be
# checked there:
#   1. a separate venv (.venv-cuda) with the CUDA torch (torch==2.14.1+cu130 from the local wheel
#      cache) and the build tools;
#   2. the extension for TORCH_CUDA_ARCH_LIST (default "8.0;9.0a"), warnings as errors, ptxas -v,
#      in its own build dir (build/cuda-*), from scratch so every kernel's ptxas report is in the log;
#   3. the library loads and every salr op has a CUDA kernel registered;
#   4. ptxas: zero spill bytes in every kernel; registers / shared memory per kernel written to
#      build/cuda-ptxas.md (scripts/ptxas_report.py).
# Environment: SALR_CUDA_VENV (default .venv-cuda), SALR_CUDA_TORCH (default torch==2.14.1),
# TORCH_CUDA_ARCH_LIST, CMAKE_BUILD_PARALLEL_LEVEL (default 2).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
start=$(date +%s)
venv="${SALR_CUDA_VENV:-.venv-cuda}"
log=build/cuda-build.log
report=build/cuda-ptxas.md
mkdir -p build

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$(cd "$venv" && pwd)/bin/python"  # absolute: the load check below runs from /tmp
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "${SALR_CUDA_TORCH:-torch==2.14.1}" "scikit-build-core>=0.10" "pybind11>=2.12" \
  "cmake>=3.26" ninja numpy safetensors tqdm
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
nv="$site/nvidia/cu13"
torch_cuda="$("$py" -c 'import torch; print(torch.version.cuda or "")')"
if [ -z "$torch_cuda" ]; then
  echo "build_cuda: $venv has a torch without CUDA; set SALR_CUDA_TORCH to a CUDA build" >&2
  exit 1
fi
[ -d "$nv/include" ] || { echo "build_cuda: no CUDA headers at $nv/include (nvidia-*-cu13 wheels)" >&2; exit 1; }

# The nvcc on PATH may be a wrapper script: point CMake at the real compiler. cuBLAS & co. headers
# and nvrtc come from the nvidia-* wheels that torch pulled in, not from /usr/local/cuda.
export CUDA_HOME=/usr/local/cuda
export CUDA_PATH=/usr/local/cuda  # torch's FindCUDA looks here, not at CUDA_HOME
export CUDACXX=/usr/local/cuda/bin/nvcc
export CPATH="$nv/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$nv/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0a}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}"

# From scratch: a cached build would compile nothing and print no ptxas report.
rm -rf build/cuda-*/
echo "build_cuda: building for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST with torch $("$py" -c 'import torch; print(torch.__version__)')"
set +e
# shellcheck source=scripts/cuda_build_flags.sh
. scripts/cuda_build_flags.sh
salr_cuda_pip_flags "build/cuda-{wheel_tag}" "$nv/lib/libnvrtc.so.13"
"$py" -m pip install -v --no-build-isolation --no-deps "${SALR_CUDA_PIP_FLAGS[@]}" . >"$log" 2>&1
status=$?
set -e
if [ $status -ne 0 ]; then
  grep -E "error|Error|FAILED" "$log" | head -40 >&2 || true
  echo "build_cuda: the CUDA build failed (full log: $log)" >&2
  exit $status
fi
build_end=$(date +%s)

# Load the library (no GPU needed) and require a CUDA kernel for every op.
(cd /tmp && "$py" - <<'EOF'
import torch
import salr
assert salr.native_available(), salr.native_error()
from salr import _native
assert _native._C.cuda_compiled(), "salr._C says the CUDA kernels were not compiled in"
ops = ["bitmap_encode", "bitmap_decode", "sparse_lowrank_gemm", "sparse_gemm_transposed", "sampled_gemm"]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"salr::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for: {missing}"
print(f"build_cuda: salr loads with torch {torch.__version__}; CUDA kernels registered for {len(ops)} ops")
EOF
)

"$py" scripts/ptxas_report.py "$log" "$report"
end=$(date +%s)
echo "build_cuda: OK (build $((build_end - start)) s, total $((end - start)) s); ptxas table in $report"

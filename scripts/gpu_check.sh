#!/usr/bin/env bash
# One prepared run on a GPU machine (issue 16), <= 8 minutes on an H100/H200:
#   1. builds salr with its CUDA kernels for this GPU's architecture into the python that has a CUDA
#      torch (PYTHON, default python3), warnings as errors, ptxas -v;
#   2. runs tests/test_cuda*.py (every CUDA op and both kernels vs the float64 reference), then
#      tests/test_errors.py under faulthandler (the c10::str segfault seen on the H100 image);
#   3. runs every bench/bench_cuda*.py --out OUTDIR (CUDA-graph timing, weights rotated over > 2x L2);
#   4. prints the tables last.
# Every step logs into OUTDIR (argument, or $GPU_CHECK_OUT, default gpu-check-<date>) and has its
# own time limit; a failed step is reported and the next one still runs. Exit status: 0 when all
# steps passed. Environment: GPU_CHECK_SECONDS (default 470), PYTHON, CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST
# (default: this GPU's), GPU_CHECK_QUICK=1 (bench --quick), GPU_CHECK_DRY_RUN=1 (no GPU: checks
# this script's plumbing with a CPU build and bench --dry-run).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-${GPU_CHECK_OUT:-gpu-check-$(date +%Y%m%d-%H%M%S)}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="${PYTHON:-python3}"
dry="${GPU_CHECK_DRY_RUN:-0}"
start=$(date +%s)
status=0
summary=()

deadline=$((start + ${GPU_CHECK_SECONDS:-470}))  # the whole run fits 8 minutes

step() {  # step NAME SECONDS CMD...: runs CMD with a time limit (capped by what is left of the
  # run's budget), output to OUTDIR/NAME.log
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  local left=$((deadline - t0))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    summary+=("$name: SKIPPED (the run's time budget is spent)")
    status=1
    return 1
  fi
  echo "gpu_check: $name (limit ${limit}s) ..."
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  local line="$name: rc=$rc in $(($(date +%s) - t0)) s (log: $out/$name.log)"
  [ $rc -eq 124 ] && line="$line TIMED OUT"
  [ $rc -ne 0 ] && status=1
  summary+=("$line")
  echo "gpu_check: $line"
  tail -3 "$out/$name.log"
  return $rc
}

{
  echo "date: $(date -u)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1 || true
  "$py" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name(0))' 2>&1
  "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>&1 | tail -2
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  nproc
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

if [ "$dry" = "1" ]; then
  step build 600 "$py" -m pip install -v --no-build-isolation --no-deps .
  step tests 600 "$py" -m pytest -q tests/test_cuda_stream_layout.py tests/test_cuda_fragments.py
  bench_flags=(--dry-run)
else
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  export CUDACXX="$CUDA_HOME/bin/nvcc"
  site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  nv="$(ls -d "$site"/nvidia/cu1* 2>/dev/null | tail -1)"
  if [ -n "$nv" ]; then
    export CPATH="$nv/include${CPATH:+:$CPATH}"
    export LIBRARY_PATH="$nv/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
  fi
  nvrtc="$(ls "$nv"/lib/libnvrtc.so.* 2>/dev/null | head -1)"
  arch="$("$py" -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}.{m}" + ("a" if M == 9 else ""))' 2>/dev/null)"
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-${arch:-9.0a}}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  # shellcheck source=scripts/cuda_build_flags.sh
  . scripts/cuda_build_flags.sh
  salr_cuda_pip_flags "build/gpu-{wheel_tag}" "$nvrtc"
  step build 200 "$py" -m pip install -v --no-build-isolation --no-deps "${SALR_CUDA_PIP_FLAGS[@]}" .
  step tests 180 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda*.py
  step errors 45 "$py" -X faulthandler -m pytest -q -p no:cacheprovider tests/test_errors.py
  bench_flags=(--repeats 5)
fi
[ "${GPU_CHECK_QUICK:-0}" = "1" ] && bench_flags+=(--quick)
for bench in bench/bench_cuda*.py; do
  name="$(basename "$bench" .py)"
  step "$name" 150 "$py" "$bench" --out "$out" "${bench_flags[@]}"
done

echo
echo "==== gpu_check summary ($(($(date +%s) - start)) s; logs and tables in $out)"
printf '%s\n' "${summary[@]}"
grep -h -E "passed|failed|error" "$out/tests.log" "$out/errors.log" 2>/dev/null | tail -4
for table in "$out"/bench_cuda*.md; do
  [ -f "$table" ] || continue
  echo
  echo "==== $(basename "$table")"
  cat "$table"
done
exit $status

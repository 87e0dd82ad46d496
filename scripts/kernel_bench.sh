#!/usr/bin/env bash
# Builds and runs bench/kernel_bench.cpp (torch-free, one thread, CPU time) at -O3 (the Release build
# of CMakeLists.txt: at -O2 GCC leaves the AVX-512 accumulators on the stack, 4-5x slower) with the ISA flags of
# CMakeLists.txt. Arguments go to the binary: rows cols sparsity dtype [m].
# KERNEL_BENCH_BASE=<git ref>: also time that revision's AVX2 kernels (float and int8) in the same process
# (alternating with this tree's). KERNEL_BENCH_MB=<MB>: working set of the rotated weight copies (default 512).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${KERNEL_BENCH_DIR:-/tmp/salr-kernel-bench}"
mkdir -p "$out"
cxx="${CXX:-g++} -O3 -std=c++17 -DSALR_WITH_X86_SIMD -I$root/cpp"
k="$root/cpp/kernels"
$cxx -c "$k/spmm_scalar.cpp" -o "$out/scalar.o"
$cxx -c "$k/bitmap_codec.cpp" -o "$out/codec.o"
$cxx -c "$k/isa_dispatch.cpp" -o "$out/dispatch.o"
$cxx -c "$k/int8_scalar.cpp" -o "$out/int8_scalar.o"
$cxx -mavx2 -mfma -mf16c -mbmi -mbmi2 -mpopcnt -c "$k/spmm_avx2.cpp" -o "$out/avx2.o"
$cxx -mavx2 -mfma -mf16c -mbmi -mbmi2 -mpopcnt -c "$k/decode_avx2.cpp" -o "$out/decode2.o"
$cxx -mavx2 -mfma -mf16c -mbmi -mbmi2 -mpopcnt -c "$k/int8_avx2.cpp" -o "$out/int8_avx2.o"
avx512="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vbmi2 -mfma -mf16c -mbmi -mbmi2 -mpopcnt"
$cxx $avx512 -c "$k/spmm_avx512.cpp" -o "$out/avx512.o"
$cxx $avx512 -c "$k/decode_avx512.cpp" -o "$out/decode512.o"
$cxx $avx512 -c "$k/int8_avx512.cpp" -o "$out/int8_avx512.o"
rm -f "$out"/base_*.o
if [ -n "${KERNEL_BENCH_BASE:-}" ]; then
  base="$out/base-src"
  rm -rf "$base" && mkdir -p "$base"
  git -C "$root" archive "$KERNEL_BENCH_BASE" cpp | tar -x -C "$base"
  base_cxx="${CXX:-g++} -O3 -std=c++17 -DSALR_WITH_X86_SIMD -Dkernels=kernels_base -I$base/cpp"
  for f in spmm_avx2 decode_avx2 int8_avx2; do  # its own namespace, so both revisions link side by side
    $base_cxx -mavx2 -mfma -mf16c -mbmi -mbmi2 -mpopcnt -c "$base/cpp/kernels/$f.cpp" -o "$out/base_$f.o"
  done
  $base_cxx -c "$base/cpp/kernels/int8_scalar.cpp" -o "$out/base_int8_scalar.o"  # the int8 table's dequantize
fi
$cxx "$root/bench/kernel_bench.cpp" "$out"/*.o -o "$out/kernel_bench"
"$out/kernel_bench" "$@"

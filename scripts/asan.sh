#!/usr/bin/env bash
# Builds libsalr_ops.so and salr._C with AddressSanitizer into build/asan and runs pytest against
# them: the bad-input tests and a short fuzz run by default, or the pytest arguments given.
#   bash scripts/asan.sh                          # tests/ops/test_errors.py + tests/fuzz (ci profile)
#   bash scripts/asan.sh tests/ops/test_gemm.py -x    # any pytest arguments
# The installed salr is untouched: the sources under python/salr are copied next to the ASan
# libraries (build/asan/pkg) and put first on PYTHONPATH. libasan is preloaded because python
# itself is not instrumented, and libstdc++ with it (python does not link it: without it ASan's
# __cxa_throw interceptor finds no real one and aborts on the first C++ exception); leak detection is
# off (CPython and torch keep allocations until exit).
# AVX-512 masked / expand loads are not instrumented by ASan (the scalar kernels and all the glue
# are), and valgrind cannot run AVX-512 code at all, so SALR_CPU_ISA=scalar runs see the most.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="$root/build/asan"
python="${PYTHON:-python}"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DSALR_WITH_CUDA=OFF \
  -DPython_EXECUTABLE="$(command -v "$python")" \
  -DCMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address" -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address" >/dev/null
cmake --build "$build" --target salr_ops _C -j "${SALR_ASAN_JOBS:-2}"
rm -rf "$build/pkg" && mkdir -p "$build/pkg"
cp -r "$root/python/salr" "$build/pkg/salr"
find "$build/pkg/salr" -name '*.so' -delete
mkdir -p "$build/pkg/salr/lib"
cp "$build/libsalr_ops.so" "$build/pkg/salr/lib/"
cp "$build"/_C*.so "$build/pkg/salr/"
cd "$root"
[ $# -gt 0 ] || set -- tests/ops/test_errors.py tests/fuzz
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" PYTHONPATH="$build/pkg" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
"$python" -c "import salr; assert salr.native_available(), salr.native_error(); print('salr from', salr.__file__)"
"$python" -m pytest -q -p no:cacheprovider "$@"

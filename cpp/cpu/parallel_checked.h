// The CPU ops' one way to run a kernel over bands or column groups in parallel tasks.
#pragma once

#include <ATen/Parallel.h>

#include "checks.h"

namespace salr {

// Minimum weights (x rows counted) per parallel task of the band kernels: 128K weights are ~256 KB
// of bf16, ~15 µs of L2-resident work, against a few µs to fork and join a parallel region. A layer
// below one task (SmolLM2's 192x576 k/v projections at M = 1) runs on the calling thread with no
// parallel region; 64K (two tasks there) made the demo's decode no faster on a Zen 3.
constexpr int64_t kMinWeightsPerTask = int64_t{1} << 17;

// kernel(begin, end) over [0, count) in tasks of at least `grain` items; each returns -1, or the
// first inconsistent group it met, and the op then fails naming the first one any task found.
template <class Kernel>
void parallel_checked(const char* op, int64_t count, int64_t grain, int64_t cols, const Kernel& kernel) {
  FirstBadGroup bad;
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) { bad.note(kernel(begin, end)); });
  if (bad.index >= 0) fail_inconsistent(op, bad.index, cols);
}

}  // namespace salr

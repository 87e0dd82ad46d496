// The CPU ops' one way to run a kernel over bands or column groups in parallel tasks.
#pragma once

#include <ATen/Parallel.h>

#include "checks.h"

namespace salr {

// kernel(begin, end) over [0, count) in tasks of at least `grain` items; each returns -1, or the
// first inconsistent group it met, and the op then fails naming the first one any task found.
template <class Kernel>
void parallel_checked(const char* op, int64_t count, int64_t grain, int64_t cols, const Kernel& kernel) {
  FirstBadGroup bad;
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) { bad.note(kernel(begin, end)); });
  if (bad.index >= 0) fail_inconsistent(op, bad.index, cols);
}

}  // namespace salr

// Budget translation unit (scripts/cuda_budget.sh): the stream kernel (stream_kernel.cuh) for bf16 at
// the token tiles the budget markers name, compiled alone without torch headers.
#include "stream_kernel.cuh"
#include "stream_relayout.cuh"  // compiled here too: its stack frame shows in the table

namespace salr::cuda::stream {
template __global__ void stream_forward_kernel<__nv_bfloat16, 1>(StreamParams);
template __global__ void stream_forward_kernel<__nv_bfloat16, 8>(StreamParams);
}  // namespace salr::cuda::stream

// The budget script runs this on the host (no GPU needed): the kernels' dynamic shared memory,
// which ptxas cannot report.
#include <cstdio>
int main() {
  using namespace salr::cuda::stream;
  std::printf("SALR_BUDGET_SMEM stream_forward_kernelI13__nv_bfloat16Li1EE %d\n", shared_bytes<1>());
  std::printf("SALR_BUDGET_SMEM stream_forward_kernelI13__nv_bfloat16Li8EE %d\n", shared_bytes<8>());
  return 0;
}

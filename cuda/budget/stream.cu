// Budget translation unit (scripts/cuda_budget.sh): the stream kernel (stream_kernel.cuh) for bf16 at
// the token tiles the budget markers name, compiled alone without torch headers.
#include "stream_kernel.cuh"
#include "stream_relayout.cuh"  // compiled here too: its stack frame shows in the table

namespace salr::cuda::stream {
template __global__ void stream_forward_kernel<__nv_bfloat16, 1>(StreamParams);
template __global__ void stream_forward_kernel<__nv_bfloat16, 8>(StreamParams);
}  // namespace salr::cuda::stream

// Budget translation unit (scripts/cuda_budget.sh): the 2:4 forward kernels (sparse24_kernel.cuh),
// both shapes, bf16 (fp16 differs only in the mma.sp type suffix), compiled alone without torch
// headers. Include paths: -Icpp -Icuda.
#include "sparse24_kernel.cuh"

namespace salr::cuda::mma24 {
template __global__ void sparse24_forward_kernel<__nv_bfloat16, DecodeShape>(const Params24);
template __global__ void sparse24_forward_kernel<__nv_bfloat16, TiledShape>(const Params24);
}  // namespace salr::cuda::mma24

// The budget script runs this on the host: these kernels use static shared memory only (ptxas
// reports it), so there is no dynamic size to print.
int main() { return 0; }

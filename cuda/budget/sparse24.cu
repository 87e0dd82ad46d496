// Static-gate translation unit (scripts/cuda_budget.sh): the 2:4 forward kernels, both shapes and
// both 16-bit types, compiled alone without torch headers. Include paths: -Icpp -Icuda.
#include "sparse24_kernel.cuh"

namespace salr::cuda::mma24 {
template __global__ void sparse24_forward_kernel<__nv_bfloat16, DecodeShape>(const Params24);
template __global__ void sparse24_forward_kernel<__half, DecodeShape>(const Params24);
template __global__ void sparse24_forward_kernel<__nv_bfloat16, TiledShape>(const Params24);
template __global__ void sparse24_forward_kernel<__half, TiledShape>(const Params24);
}  // namespace salr::cuda::mma24

// Budget translation unit (scripts/cuda_budget.sh): the BM8x8 A-operand mma kernel
// (sparse_mma_kernel.cuh, the default CUDA path), compiled alone without torch headers.
#include "sparse_mma_kernel.cuh"

template __global__ void salr::cuda::mma::sparse_mma_forward_kernel<__nv_bfloat16>(salr::cuda::mma::ForwardParams);

int main() { return 0; }  // the budget script runs every TU (for dynamic shared memory; none here)

// salr.sampled_gemm on CUDA: (leftᵀ·right) at the bitmap's nonzeros (SDDMM), shaped like values.
//
// Documented fallback (design.md §2 allows it for the backward products): the dense product
// leftᵀ·right in fp32 through cuBLAS, rounded once to the values' dtype, then bitmap_encode's
// gather kernel picks the mask positions in value order. Holds one dense [out_features,
// in_features] fp32 product (plus its rounded copy) for the duration of the call; a fused SDDMM
// (mma over T for each 8x8 tile with a nonzero) would skip the empty tiles and is future work.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_common.cuh"

namespace salr::cuda {
namespace {

constexpr const char* kOp = "sampled_gemm";

at::Tensor sampled_gemm_cuda(const at::Tensor& left, const at::Tensor& right, const at::Tensor& bitmap,
                             const at::Tensor& values, const at::Tensor& offsets, int64_t out_features,
                             int64_t in_features) {
  const int64_t rows = out_features, cols = in_features;
  check_cuda(kOp, "values", values);
  check_sampled_gemm_args(kOp, left, right, bitmap, values, offsets, rows, cols);
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor out = at::empty_like(values);
  if (values.numel() == 0) return out;
  if (left.size(0) == 0) return out.zero_();
  const at::Tensor product =
      at::mm(left.to(at::kFloat).t(), right.to(at::kFloat)).to(values.scalar_type()).contiguous();
  gather_at_bitmap(product, bitmap, offsets, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(salr, CUDA, m) { m.impl("sampled_gemm", &sampled_gemm_cuda); }

}  // namespace salr::cuda

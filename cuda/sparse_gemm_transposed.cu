// salr.sparse_gemm_transposed on CUDA: dx = dy·(W_s + B·A), the x-gradient of sparse_lowrank_gemm.
//
// Documented fallback (design.md §2 allows it for the backward products): decode W_s once into a
// dense [out_features, in_features] scratch (bitmap_decode's kernel, no sync) and multiply with
// cuBLAS (at::mm, fp32 accumulation, one rounding to dy's dtype). Costs one dense weight of
// temporary memory and the decode's write + read (int8 values: dequantized into dy's dtype); a fused transposed kernel (each block owning
// 64-column groups, as the CPU kernel does) would avoid both and is future work. The adapter term
// (dy·B)·A is one more cuBLAS product added into the same output.
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include "cuda_common.cuh"

namespace salr::cuda {
namespace {

constexpr const char* kOp = "sparse_gemm_transposed";

at::Tensor sparse_gemm_transposed_cuda(const at::Tensor& grad_out, const at::Tensor& bitmap, const at::Tensor& values,
                                       const at::Tensor& offsets, int64_t out_features, int64_t in_features,
                                       const std::optional<at::Tensor>& scales,
                                       const std::optional<at::Tensor>& adapter_a,
                                       const std::optional<at::Tensor>& adapter_b) {
  const int64_t rows = out_features, cols = in_features;
  check_cuda(kOp, "values", values);
  const CheckedAdapter adapter =
      check_sparse_gemm_transposed_args(kOp, grad_out, bitmap, values, offsets, rows, cols, scales, adapter_a,
                                        adapter_b);
  const c10::cuda::CUDAGuard guard(values.device());
  std::vector<int64_t> out_shape(grad_out.sizes().begin(), grad_out.sizes().end());
  out_shape.back() = cols;
  const int64_t leading = c10::multiply_integers(grad_out.sizes().begin(), grad_out.sizes().end() - 1);
  const at::Tensor dy = grad_out.reshape({leading, rows});
  const bool empty = leading == 0 || rows == 0 || cols == 0;
  at::Tensor dx = empty ? at::zeros({leading, cols}, grad_out.options())
                        : at::mm(dy, dense_weight(bitmap, values, offsets, rows, cols, scales, grad_out.scalar_type()));
  // Also with N = 0: (dy·B)·A is then 0·A, NaN where A is (as in the reference).
  if (adapter.rank > 0 && leading > 0 && cols > 0) dx = at::addmm(dx, at::mm(dy, adapter.b), adapter.a);
  return dx.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(salr, CUDA, m) { m.impl("sparse_gemm_transposed", &sparse_gemm_transposed_cuda); }

}  // namespace salr::cuda

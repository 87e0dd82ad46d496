// salr.sparse_gemm_transposed on the CPU: dx = dy·(W_s + B·A), the x-gradient of sparse_lowrank_gemm.
// Small M: the ISA kernel, threads owning 64-column groups (offsets per group let each walk every
// band without a scan, and no two threads write the same dx column), then the adapter term by ATen.
// Large M: decoded chunks + ATen GEMM accumulated in fp32, the adapter folded into the chunks when
// that is cheaper (dense_chunks.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "parallel_checked.h"
#include "op_checks.h"
#include "dense_chunks.h"
#include "int8_glue.h"

namespace salr {
namespace {

constexpr const char* kOp = "sparse_gemm_transposed";

at::Tensor sparse_gemm_transposed_cpu(const at::Tensor& grad_out, const at::Tensor& bitmap,
                                      const at::Tensor& values, const at::Tensor& offsets,
                                      int64_t out_features, int64_t in_features,
                                      const std::optional<at::Tensor>& scales,
                                      const std::optional<at::Tensor>& adapter_a,
                                      const std::optional<at::Tensor>& adapter_b) {
  const int64_t rows = out_features, cols = in_features;
  check_cpu(kOp, "values", values);
  const CheckedAdapter adapter =
      check_sparse_gemm_transposed_args(kOp, grad_out, bitmap, values, offsets, rows, cols, scales, adapter_a,
                                        adapter_b);
  check_offsets_ends(kOp, values, offsets);
  check_scales_values_cpu(kOp, scales);

  std::vector<int64_t> out_shape(grad_out.sizes().begin(), grad_out.sizes().end());
  out_shape.back() = cols;
  const int64_t leading = c10::multiply_integers(grad_out.sizes().begin(), grad_out.sizes().end() - 1);
  at::Tensor dy = grad_out.reshape({leading, rows});
  if (rows > 0 && dy.stride(1) != 1) dy = dy.contiguous();
  const int64_t m = dy.size(0);
  if (m == 0 || cols == 0 || rows == 0) {
    at::Tensor dx = at::zeros({m, cols}, grad_out.options());
    // N = 0 still reads A: (dy·B)·A is 0·A, NaN where A is (as in the reference).
    if (m > 0 && cols > 0) add_adapter_x_gradient(dy, adapter, dx);
    return dx.view(out_shape);
  }
  if (values.scalar_type() == at::kChar) {  // issue 21: int8 values (int8_gemm.cpp)
    return int8_gemm_transposed_cpu(kOp, dy, bitmap, values, offsets, rows, cols, *scales, adapter).view(out_shape);
  }
  const kernels::SparseWeightView view = weight_view(bitmap, values, offsets, rows, cols);

  if (m >= dense_crossover_rows()) {
    // Accumulated over chunks in fp32, so the GEMM runs in fp32 on every CPU: the chunks are widened
    // into a reused scratch (a fresh fp32 copy per chunk was a 4 MB allocation each time).
    const at::Tensor acc = chunked_transposed_gemm(
        [&](auto&& fn) { for_each_decoded_chunk(kOp, view, values, at::kFloat, fn); }, dy, cols, adapter);
    return acc.to(values.scalar_type()).view(out_shape);
  }
  at::Tensor dx = at::empty({m, cols}, grad_out.options());
  const kernels::GemmTransposedArgs args{view, dy.const_data_ptr(), m, dy.stride(0), dx.data_ptr(),
                                         dx.stride(0)};
  const kernels::KernelTable& table = selected_kernels(kOp);
  parallel_checked(kOp, format::groups_per_band(cols), 1, cols,
                   [&](int64_t g0, int64_t g1) { return table.gemm_transposed(args, g0, g1); });
  add_adapter_x_gradient(dy, adapter, dx);
  return dx.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(salr, CPU, m) { m.impl("sparse_gemm_transposed", &sparse_gemm_transposed_cpu); }

}  // namespace salr

// salr.sparse_lowrank_gemm on the CPU: y = x·W_sᵀ + (x·Aᵀ)·Bᵀ + bias.
//
// Small M (decode-bound GEMV / skinny GEMM): the ISA kernel streams the compressed weight once,
// decoding every tile once for all rows of x, with the adapter epilogue fused per band.
// Large M (compute-bound): decode a few bands at a time into an L2-sized dense chunk and let
// ATen's GEMM (oneDNN) run on it; the decoded chunk never grows to the whole N×K weight.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "parallel_checked.h"
#include "op_checks.h"
#include "dense_chunks.h"
#include "int8_glue.h"

namespace salr {
namespace {

constexpr const char* kOp = "sparse_lowrank_gemm";

at::Tensor sparse_lowrank_gemm_cpu(const at::Tensor& x, const at::Tensor& bitmap,
                                   const at::Tensor& values, const at::Tensor& offsets,
                                   int64_t out_features, int64_t in_features,
                                   const std::optional<at::Tensor>& adapter_a,
                                   const std::optional<at::Tensor>& adapter_b,
                                   const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& scales,
                                   const std::optional<at::Tensor>& adapter_scales) {
  const int64_t rows = out_features, cols = in_features;
  check_cpu(kOp, "values", values);
  const CheckedAdapter adapter =
      check_sparse_lowrank_gemm_args(kOp, x, bitmap, values, offsets, rows, cols, adapter_a, adapter_b, bias,
                                     scales, adapter_scales);
  check_offsets_ends(kOp, values, offsets);
  check_scales_values_cpu(kOp, scales);
  check_scales_values_cpu(kOp, adapter_scales, "adapter_scales");

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = rows;
  const int64_t leading = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor x2d = x.reshape({leading, cols});
  if (cols > 0 && x2d.stride(1) != 1) x2d = x2d.contiguous();
  const int64_t m = x2d.size(0);
  at::Tensor y = at::empty({m, rows}, x.options());
  if (m == 0 || rows == 0) return y.view(out_shape);

  const std::optional<at::Tensor> bias_c =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  if (values.scalar_type() == at::kChar) {  // issue 21: int8 values (int8_gemm.cpp)
    int8_lowrank_gemm_cpu(kOp, x2d, bitmap, values, offsets, rows, cols, *scales, adapter, bias_c, y);
    return y.view(out_shape);
  }
  const kernels::SparseWeightView view = weight_view(bitmap, values, offsets, rows, cols);
  const kernels::KernelTable& table = selected_kernels(kOp);

  const int64_t crossover = dense_crossover_rows(
      values.scalar_type() == at::kFloat ? kDenseCrossoverRowsFp32Forward : kDenseCrossoverRows);
  if (m >= crossover) {
    const at::ScalarType gemm_dtype = dense_gemm_dtype(kOp, values.scalar_type());
    chunked_lowrank_gemm([&](auto&& fn) { for_each_decoded_chunk(kOp, view, values, gemm_dtype, fn); }, x2d,
                         dequantized_adapter(adapter, at::kFloat), bias_c, y);
    return y.view(out_shape);
  }
  // Kernel path: T by the ISA's GEMV (project_adapter), the bands in parallel tasks.
  const float* t = project_adapter(kOp, x2d, adapter);
  const kernels::GemmArgs args{view,
                               x2d.const_data_ptr(),
                               m,
                               x2d.stride(0),
                               y.data_ptr(),
                               y.stride(0),
                               t,
                               adapter.rank > 0 ? adapter.b.const_data_ptr() : nullptr,
                               adapter.rank,
                               bias_c.has_value() ? bias_c->const_data_ptr() : nullptr,
                               adapter.is_int8() ? adapter.b_scales.const_data_ptr<float>() : nullptr};
  const int64_t grain = std::max<int64_t>(1, kMinWeightsPerTask / std::max<int64_t>(1, 8 * cols * m));
  parallel_checked(kOp, format::num_bands(rows), grain, cols,
                   [&](int64_t b0, int64_t b1) { return table.gemm(args, b0, b1); });
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(salr, CPU, m) { m.impl("sparse_lowrank_gemm", &sparse_lowrank_gemm_cpu); }

}  // namespace salr

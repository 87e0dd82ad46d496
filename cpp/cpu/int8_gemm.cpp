// The two products over int8 BM8x8 weights on the CPU (issue 21): W[n, k] = scale(n, k) · q[n, k].
//
// Small M: the ISA's int8 kernel streams the compressed weight (1 byte per value) once for all rows
// of x, the adapter epilogue fused per band, as the float kernels do. Large M: dequantize an
// L2-sized chunk of bands into x's dtype and let ATen's GEMM run on it (dense_chunks.h).
#include "int8_glue.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "checks.h"
#include "parallel_checked.h"
#include "dense_chunks.h"
#include "kernels/int8_kernels.h"

namespace salr {
namespace {

kernels::Int8WeightView int8_weight_view(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets,
                                         int64_t rows, int64_t cols, const at::Tensor& scales) {
  return {weight_view(bitmap, values, offsets, rows, cols), scales.const_data_ptr<float>(),
          scales.dim() == 1 ? 1 : scales.size(1)};
}

const kernels::Int8KernelTable& selected_int8_kernels(const char* op) {
  kernels::Isa isa;
  const char* error = nullptr;
  SALR_CHECK(kernels::selected_isa(&isa, &error), op, error);
  return kernels::int8_kernel_table(isa);
}

// Calls fn(row_begin, row_end, w_chunk) for each band chunk dequantized into `dtype`.
template <typename Fn>
void for_each_dequantized_chunk(const char* op, const kernels::Int8WeightView& view, at::ScalarType dtype,
                                Fn&& fn) {
  const kernels::Int8DequantizeBandsFn dequantize = selected_int8_kernels(op).dequantize;
  const kernels::DType kd = kernel_dtype(dtype);
  for_each_chunk_decoded_by(
      op, view.index.rows, view.index.cols, dtype,
      [&](char* base, int64_t c0, int64_t c1) { return dequantize(view, kd, base, c0, c1); }, fn);
}

}  // namespace

void check_scales_values_cpu(const char* op, const std::optional<at::Tensor>& scales, const char* arg) {
  if (!scales.has_value()) return;
  const at::Tensor s_c = scales->contiguous();
  const float* s = s_c.const_data_ptr<float>();
  const int64_t count = s_c.numel();
  for (int64_t i = 0; i < count; ++i) {
    SALR_CHECK(std::isfinite(s[i]) && s[i] > 0.0f, op, arg, " must be finite and > 0, got ", s[i],
               " at flat index ", i);
  }
}

void int8_lowrank_gemm_cpu(const char* op, const at::Tensor& x2d, const at::Tensor& bitmap, const at::Tensor& values,
                           const at::Tensor& offsets, int64_t rows, int64_t cols, const at::Tensor& scales,
                           const CheckedAdapter& adapter, const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t m = x2d.size(0);
  const kernels::Int8WeightView view = int8_weight_view(bitmap, values, offsets, rows, cols, scales);
  const at::ScalarType dtype = x2d.scalar_type();
  const int64_t crossover =
      dense_crossover_rows(dtype == at::kFloat ? kDenseCrossoverRowsFp32Forward : kDenseCrossoverRows);
  if (m >= crossover) {
    const at::ScalarType gemm_dtype = dense_gemm_dtype(op, dtype);
    chunked_lowrank_gemm([&](auto&& fn) { for_each_dequantized_chunk(op, view, gemm_dtype, fn); }, x2d,
                         dequantized_adapter(adapter, at::kFloat), bias, y);
    return;
  }
  // T = x·Aᵀ by the float table's GEMV (as for float weights).
  const float* t = project_adapter(op, x2d, adapter);
  const kernels::Int8GemmArgs args{view,
                                   kernel_dtype(dtype),
                                   x2d.const_data_ptr(),
                                   m,
                                   x2d.stride(0),
                                   y.data_ptr(),
                                   y.stride(0),
                                   t,
                                   adapter.rank > 0 ? adapter.b.const_data_ptr() : nullptr,
                                   adapter.rank,
                                   bias.has_value() ? bias->const_data_ptr() : nullptr,
                                   adapter.is_int8() ? adapter.b_scales.const_data_ptr<float>() : nullptr};
  const kernels::Int8KernelTable& table = selected_int8_kernels(op);
  // Half the bytes of a bf16 weight per value: twice the weights per task for the same traffic.
  const int64_t grain = std::max<int64_t>(1, 2 * kMinWeightsPerTask / std::max<int64_t>(1, 8 * cols * m));
  parallel_checked(op, format::num_bands(rows), grain, cols,
                   [&](int64_t b0, int64_t b1) { return table.gemm(args, b0, b1); });
}

at::Tensor int8_gemm_transposed_cpu(const char* op, const at::Tensor& dy2d, const at::Tensor& bitmap,
                                    const at::Tensor& values, const at::Tensor& offsets, int64_t rows, int64_t cols,
                                    const at::Tensor& scales, const CheckedAdapter& adapter) {
  const int64_t m = dy2d.size(0);
  const kernels::Int8WeightView view = int8_weight_view(bitmap, values, offsets, rows, cols, scales);
  const at::ScalarType dtype = dy2d.scalar_type();
  if (m >= dense_crossover_rows()) {
    // Dequantized into fp32 directly: the fp32 GEMM then reads each weight with one rounding (the scale).
    const at::Tensor acc = chunked_transposed_gemm(
        [&](auto&& fn) { for_each_dequantized_chunk(op, view, at::kFloat, fn); }, dy2d, cols, adapter);
    return acc.to(dtype);
  }
  at::Tensor dx = at::empty({m, cols}, dy2d.options());
  const kernels::Int8GemmTransposedArgs args{view, kernel_dtype(dtype), dy2d.const_data_ptr(), m, dy2d.stride(0),
                                             dx.data_ptr(), dx.stride(0)};
  const kernels::Int8KernelTable& table = selected_int8_kernels(op);
  parallel_checked(op, format::groups_per_band(cols), 1, cols,
                   [&](int64_t g0, int64_t g1) { return table.gemm_transposed(args, g0, g1); });
  add_adapter_x_gradient(dy2d, adapter, dx);
  return dx;
}

}  // namespace salr

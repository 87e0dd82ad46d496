// One argument check per op, shared by the CPU glue (cpp/cpu/<op>.cpp) and the CUDA glue
// (cuda/<op>.cu): dtypes, shapes, layout, and "every tensor on the weight's device". Device-neutral
// on purpose: each backend adds only the one line that says where `values` must live
// (check_cpu / check_cuda), so a wrong-device call names the argument on every backend.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "checks.h"

namespace salr {

// Every tensor of one call on the device of `values` (the weight decides where the op runs).
inline void check_same_device(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& values) {
  SALR_CHECK(t.device() == values.device(), op, arg, " must be on the weight's device ", values.device(),
             ", got ", t.device());
}

// The adapter of sparse_lowrank_gemm as the kernels want it (b contiguous); rank 0 without one.
// An int8 adapter (issue 21): a and b hold int8 q_a, q_b with B·A = diag(b_scales)·q_b·q_a (the
// scale of A's rows folded into B before B was quantized), so one fp32 scale per output row.
struct CheckedAdapter {
  at::Tensor a;  // [rank, in_features]
  at::Tensor b;  // [out_features, rank], contiguous
  int64_t rank = 0;
  at::Tensor b_scales;  // [out_features] fp32, contiguous; undefined unless int8
  bool is_int8() const { return b_scales.defined(); }
};

// An int8 adapter dequantized into `dtype` (a float one as it is): for the paths that multiply with
// ATen (the large-M chunks, CUDA) rather than an int8-aware kernel.
inline CheckedAdapter dequantized_adapter(const CheckedAdapter& adapter, at::ScalarType dtype) {
  if (!adapter.is_int8()) return adapter;
  return {adapter.a.to(dtype), adapter.b.to(at::kFloat).mul_(adapter.b_scales.unsqueeze(1)).to(dtype), adapter.rank,
          {}};
}

// The dtype of the activations (x or grad_out, and adapters, bias, output): the weight's with float
// values; any float dtype with int8 values, which are dequantized into it (issue 21).
inline at::ScalarType check_activation_dtype(const char* op, const char* arg, const at::Tensor& t,
                                             const at::Tensor& values) {
  if (values.scalar_type() != at::kChar) {
    check_dtype(op, arg, t, values.scalar_type());
  } else {
    SALR_CHECK(is_weight_dtype(t.scalar_type()), op, arg,
               " must be float32, bfloat16 or float16 with int8 values, got ", t.scalar_type());
  }
  return t.scalar_type();
}

// The scales of an int8 weight: W[n, k] = scales[n] · q[n, k] (per row, [rows]) or
// scales[n, k / 64] · q[n, k] (per 64-column group, [rows, groups]): fp32, contiguous, on the weight's
// device. Required iff values are int8. Their values (finite, > 0) are checked where it is cheap (CPU).
inline void check_scales(const char* op, const std::optional<at::Tensor>& scales, const at::Tensor& values,
                         int64_t rows, int64_t cols) {
  if (values.scalar_type() != at::kChar) {
    SALR_CHECK(!scales.has_value(), op, "scales must be None with ", values.scalar_type(),
               " values (scales dequantize int8 values)");
    return;
  }
  const int64_t groups = format::groups_per_band(cols);
  SALR_CHECK(scales.has_value(), op, "scales is required with int8 values: float32 [", rows, "] (per row) or [",
             rows, ", ", groups, "] (per 64-column group)");
  const at::Tensor& s = *scales;
  check_same_device(op, "scales", s, values);
  check_dtype(op, "scales", s, at::kFloat);
  const bool per_row = s.dim() == 1 && s.size(0) == rows;
  const bool per_group = s.dim() == 2 && s.size(0) == rows && s.size(1) == groups;
  SALR_CHECK(per_row || per_group, op, "scales must have shape [", rows, "] (per row) or [", rows, ", ", groups,
             "] (per 64-column group), got ", s.sizes());
  SALR_CHECK(s.is_contiguous(), op, "scales must be contiguous");
}

// adapter_a [R, cols] with adapter_b [rows, R], both or neither, in the activations' dtype `act`; or
// both int8 with adapter_scales [rows] fp32 (CheckedAdapter says how they combine). The scales'
// values (finite, > 0) are checked where it is cheap (CPU: check_scales_values_cpu).
inline CheckedAdapter check_adapter(const char* op, const std::optional<at::Tensor>& adapter_a,
                                    const std::optional<at::Tensor>& adapter_b, const at::Tensor& values,
                                    at::ScalarType act, int64_t rows, int64_t cols,
                                    const std::optional<at::Tensor>& adapter_scales = std::nullopt) {
  SALR_CHECK(adapter_a.has_value() == adapter_b.has_value(), op,
             "adapter_a and adapter_b must be given together (got only ",
             adapter_a.has_value() ? "adapter_a" : "adapter_b", ")");
  const bool int8 = adapter_scales.has_value();
  SALR_CHECK(!int8 || adapter_a.has_value(), op, "adapter_scales must be None without adapter_a and adapter_b");
  CheckedAdapter adapter;
  if (adapter_a.has_value()) {
    const at::Tensor& a = *adapter_a;
    const at::Tensor& b = *adapter_b;
    check_same_device(op, "adapter_a", a, values);
    check_same_device(op, "adapter_b", b, values);
    SALR_CHECK(int8 || a.scalar_type() != at::kChar, op,
               "adapter_scales is required with an int8 adapter_a (float32 [", rows, "], B's row scales)");
    check_dtype(op, "adapter_a", a, int8 ? at::kChar : act);
    check_dtype(op, "adapter_b", b, int8 ? at::kChar : act);
    check_dim(op, "adapter_a", a, 2);
    check_dim(op, "adapter_b", b, 2);
    SALR_CHECK(a.size(1) == cols, op, "adapter_a must have shape [rank, ", cols, "], got ", a.sizes());
    SALR_CHECK(b.size(0) == rows && b.size(1) == a.size(0), op, "adapter_b must have shape [", rows, ", ",
               a.size(0), "] to match adapter_a, got ", b.sizes());
    adapter = {a, b.contiguous(), a.size(0), {}};
    if (int8) {
      const at::Tensor& s = *adapter_scales;
      check_same_device(op, "adapter_scales", s, values);
      check_dtype(op, "adapter_scales", s, at::kFloat);
      SALR_CHECK(s.dim() == 1 && s.size(0) == rows, op, "adapter_scales must have shape [", rows, "], got ",
                 s.sizes());
      adapter.b_scales = s.contiguous();
    }
  }
  return adapter;
}

// The weight (with its scales) and the GEMM input `t` [..., width] (`what`: the weight side it
// meets) on the weight's device; returns the activations' dtype.
inline at::ScalarType check_weight_and_input(const char* op, const char* arg, const at::Tensor& t,
                                             const at::Tensor& bitmap, const at::Tensor& values,
                                             const at::Tensor& offsets, int64_t rows, int64_t cols,
                                             const std::optional<at::Tensor>& scales, int64_t width,
                                             const char* what) {
  check_bitmap_weight(op, bitmap, values, offsets, rows, cols);
  check_scales(op, scales, values, rows, cols);
  check_same_device(op, arg, t, values);
  const at::ScalarType act = check_activation_dtype(op, arg, t, values);
  SALR_CHECK(t.dim() >= 1 && t.size(-1) == width, op, arg, " must have shape [..., ", width, "] (", what,
             "), got ", t.sizes());
  return act;
}

// salr.sparse_lowrank_gemm: x [..., cols], adapter_a [R, cols] with adapter_b [rows, R], bias [rows].
inline CheckedAdapter check_sparse_lowrank_gemm_args(const char* op, const at::Tensor& x, const at::Tensor& bitmap,
                                                     const at::Tensor& values, const at::Tensor& offsets,
                                                     int64_t rows, int64_t cols,
                                                     const std::optional<at::Tensor>& adapter_a,
                                                     const std::optional<at::Tensor>& adapter_b,
                                                     const std::optional<at::Tensor>& bias,
                                                     const std::optional<at::Tensor>& scales,
                                                     const std::optional<at::Tensor>& adapter_scales) {
  const at::ScalarType act = check_weight_and_input(op, "x", x, bitmap, values, offsets, rows, cols, scales, cols,
                                                    "in_features");
  const CheckedAdapter adapter = check_adapter(op, adapter_a, adapter_b, values, act, rows, cols, adapter_scales);
  if (bias.has_value()) {
    check_same_device(op, "bias", *bias, values);
    check_dtype(op, "bias", *bias, act);
    SALR_CHECK(bias->dim() == 1 && bias->size(0) == rows, op, "bias must have shape [", rows, "], got ",
               bias->sizes());
  }
  return adapter;
}

// salr.sparse_gemm_transposed: grad_out [..., rows] in the weight's dtype (any float with int8 values),
// adapters as sparse_lowrank_gemm's.
inline CheckedAdapter check_sparse_gemm_transposed_args(const char* op, const at::Tensor& grad_out,
                                                        const at::Tensor& bitmap, const at::Tensor& values,
                                                        const at::Tensor& offsets, int64_t rows, int64_t cols,
                                                        const std::optional<at::Tensor>& scales,
                                                        const std::optional<at::Tensor>& adapter_a,
                                                        const std::optional<at::Tensor>& adapter_b) {
  const at::ScalarType act = check_weight_and_input(op, "grad_out", grad_out, bitmap, values, offsets, rows, cols,
                                                    scales, rows, "out_features");
  return check_adapter(op, adapter_a, adapter_b, values, act, rows, cols);
}

// salr.sampled_gemm: left [T, rows] and right [T, cols] of one float dtype.
inline void check_sampled_gemm_args(const char* op, const at::Tensor& left, const at::Tensor& right,
                                    const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets,
                                    int64_t rows, int64_t cols) {
  check_bitmap_weight(op, bitmap, values, offsets, rows, cols);
  SALR_CHECK(values.scalar_type() != at::kChar, op,
             "values must be a float dtype, got int8: a quantized base is frozen and has no values-gradient");
  check_same_device(op, "left", left, values);
  check_same_device(op, "right", right, values);
  check_dim(op, "left", left, 2);
  check_dim(op, "right", right, 2);
  SALR_CHECK(is_weight_dtype(left.scalar_type()) && left.scalar_type() == right.scalar_type(), op,
             "left and right must share a float dtype, got ", left.scalar_type(), " and ", right.scalar_type());
  SALR_CHECK(left.size(1) == rows, op, "left must have shape [T, ", rows, "] (out_features), got ", left.sizes());
  SALR_CHECK(right.size(1) == cols && right.size(0) == left.size(0), op, "right must have shape [", left.size(0),
             ", ", cols, "] (T, in_features), got ", right.sizes());
}

// salr.bitmap_decode: the weight alone.
inline void check_bitmap_decode_args(const char* op, const at::Tensor& bitmap, const at::Tensor& values,
                                     const at::Tensor& offsets, int64_t rows, int64_t cols) {
  check_bitmap_weight(op, bitmap, values, offsets, rows, cols);
}

// salr.bitmap_encode: a 2-D float or int8 matrix.
inline void check_bitmap_encode_args(const char* op, const at::Tensor& dense) {
  check_dim(op, "dense", dense, 2);
  SALR_CHECK(is_values_dtype(dense.scalar_type()), op, "dense must be float32, bfloat16, float16 or int8, got ",
             dense.scalar_type());
}

// Minimum multiply-adds per parallel task of the adapter projection: A streams from DRAM when
// decoding (r = 80 at K = 576 is 92 KB of bf16, ~10 µs on one core of a Zen 3), so splitting its
// rows over the threads pays for the fork from about 32K weights on.
constexpr int64_t kMinProjectPerTask = int64_t{1} << 15;

// T = x·Aᵀ [m, rank] in fp32 for the kernel path (small M), by the ISA's GEMV into a per-thread
// scratch, A's rows split over parallel tasks: no fp32 copy of A and no allocation once warm (at
// M = 1 an ATen mm with two dtype conversions cost as much as a small layer). Valid until the next
// call on this thread; nullptr without an adapter. x2d: [m, in_features], inner stride 1, the
// adapter's dtype.
inline const float* project_adapter(const char* op, const at::Tensor& x2d, const CheckedAdapter& adapter) {
  if (adapter.rank == 0) return nullptr;
  thread_local std::vector<float> t_scratch;
  const int64_t m = x2d.size(0), cols = x2d.size(1);
  if (static_cast<int64_t>(t_scratch.size()) < m * adapter.rank) t_scratch.resize(m * adapter.rank);
  const at::Tensor a_c = adapter.a.contiguous();
  kernels::AdapterProjectArgs args{x2d.const_data_ptr(), m, x2d.stride(0), a_c.const_data_ptr(), adapter.rank, cols,
                                   kernel_dtype(x2d.scalar_type()), t_scratch.data(), adapter.is_int8()};
  const kernels::AdapterProjectFn project = selected_kernels(op).adapter_project;
  const int64_t grain = std::max<int64_t>(1, kMinProjectPerTask / std::max<int64_t>(1, m * cols));
  at::parallel_for(0, adapter.rank, grain, [&](int64_t begin, int64_t end) {
    kernels::AdapterProjectArgs task = args;
    task.rank_begin = begin;
    task.rank_end = end;
    project(task);
  });
  return t_scratch.data();
}

}  // namespace salr

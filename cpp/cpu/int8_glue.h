// The CPU glue of int8 BM8x8 weights (issue 21), called by sparse_lowrank_gemm.cpp and
// sparse_gemm_transposed.cpp once their checks passed (op_checks.h): the kernel path for small M,
// dequantized chunks + ATen GEMM for large M, as for float weights.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "op_checks.h"

namespace salr {

// Scales (`arg`: a weight's or an int8 adapter's) must be finite and > 0 (N or N·K/64 floats: cheap
// next to the product). No-op without scales.
void check_scales_values_cpu(const char* op, const std::optional<at::Tensor>& scales, const char* arg = "scales");

// y [m, rows] (allocated, x's dtype) = x2d · Wᵀ + adapter + bias; m >= 1 and rows >= 1.
void int8_lowrank_gemm_cpu(const char* op, const at::Tensor& x2d, const at::Tensor& bitmap, const at::Tensor& values,
                           const at::Tensor& offsets, int64_t rows, int64_t cols, const at::Tensor& scales,
                           const CheckedAdapter& adapter, const std::optional<at::Tensor>& bias, at::Tensor& y);

// dy2d [m, rows] (inner stride 1) · (W + B·A) -> dx [m, cols] in dy's dtype; m, rows, cols >= 1.
at::Tensor int8_gemm_transposed_cpu(const char* op, const at::Tensor& dy2d, const at::Tensor& bitmap,
                                    const at::Tensor& values, const at::Tensor& offsets, int64_t rows, int64_t cols,
                                    const at::Tensor& scales, const CheckedAdapter& adapter);

}  // namespace salr

// The 2:4 path of salr.sparse_lowrank_gemm on CUDA (issue 17; cuda/sparse24_gemm.cu): opt-in with
// SALR_CUDA_SPARSE24=1 until measured on a GPU. sparse_lowrank_gemm.cu asks it first for bf16 / fp16.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace salr::cuda {

// Whether SALR_CUDA_SPARSE24=1 (read per call, so tests and benchmarks can switch it).
bool sparse24_enabled();

// y = x2d·Wᵀ + T·adapter_bᵀ + bias (adapter_b undefined: no adapter; t = x2d·Aᵀ in fp32) through the
// mma.sp kernels, when W is 2:4; std::nullopt when it is not. The detection and the re-layout run once
// per weight on the GPU and are cached, keyed by the three tensors' storage, version and shape.
// Checked arguments only (the caller's checks), m >= 1, rows >= 1, cols >= 1, bf16 / fp16.
std::optional<at::Tensor> sparse24_forward(const at::Tensor& x2d, const at::Tensor& bitmap,
                                           const at::Tensor& values, const at::Tensor& offsets, int64_t rows,
                                           int64_t cols, const at::Tensor& adapter_b, const at::Tensor& t,
                                           const std::optional<at::Tensor>& bias);

}  // namespace salr::cuda

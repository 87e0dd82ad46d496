// The opt-in "stream" path of salr.sparse_lowrank_gemm on CUDA (issue 16): SALR_CUDA_KERNEL=stream
// selects it; the default stays the A-operand mma kernel until the stream kernel has passed its
// tests on a GPU. cuda/stream_gemm.cu holds the launcher, the load-time re-layout and its cache.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace salr::cuda::stream {

// Rows of x up to which the stream kernel is used when selected (kTokenTiles = 8 covers 128).
// Not yet measured against decode + cuBLAS: bench/bench_cuda.py --crossover sets it on a GPU.
constexpr int64_t kMaxStreamRows = 128;

// Whether SALR_CUDA_KERNEL selects the stream kernel ("stream"); "" / "mma" keep the default,
// anything else is an error naming the variable.
bool selected();

// y = x·W_sᵀ + t·adapter_bᵀ + bias for bf16 / fp16, m = x2d.size(0) in 1..kMaxStreamRows; arguments
// checked by the op. adapter_b undefined when rank == 0; t = x·adapter_aᵀ in fp32 [m, rank].
at::Tensor forward(const at::Tensor& x2d, const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets,
                   int64_t rows, int64_t cols, const at::Tensor& adapter_b, int64_t rank, const at::Tensor& t,
                   const std::optional<at::Tensor>& bias);

}  // namespace salr::cuda::stream

// Shared host and device helpers of the CUDA backend: argument checks (on top of cpp/op_checks.h), the
// codec launchers that several ops reuse (decode for the dense paths, gather for sampled_gemm), and
// (device_common.cuh, torch-free) the 16-bit scalar traits, cp.async and mma.sync wrappers.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "checks.h"
#include "device_common.cuh"
#include "op_checks.h"

namespace salr::cuda {

// ---- host: checks -----------------------------------------------------------------------------

inline void check_cuda(const char* op, const char* arg, const at::Tensor& t) {
  SALR_CHECK(t.is_cuda(), op, arg, " must be a CUDA tensor here (this kernel is the CUDA one), got ",
             t.device());
}

// Rows of x from which decode + cuBLAS beats the mma kernel, with the same environment override
// style as the CPU (SALR_CUDA_DENSE_CROSSOVER; the benchmark forces each path with it).
inline int64_t cuda_dense_crossover_rows(int64_t default_rows) {
  const char* forced = std::getenv("SALR_CUDA_DENSE_CROSSOVER");
  if (forced == nullptr || forced[0] == '\0') return default_rows;
  char* end = nullptr;
  const long long value = std::strtoll(forced, &end, 10);
  TORCH_CHECK(end != forced && *end == '\0' && value > 0,
              "salr: SALR_CUDA_DENSE_CROSSOVER must be a positive integer, got '", forced, "'");
  return value;
}

// ---- host: codec launchers (bitmap_decode.cu, bitmap_encode.cu) --------------------------------

// Decodes the whole weight into a new dense [rows, cols] tensor of the values' dtype. With
// `bad_group` (a 1-element int64 CUDA tensor holding INT64_MAX) the kernel also checks every group
// and leaves the smallest inconsistent (band * groups + group) there; without it it only stays in
// bounds. Checked arguments only.
at::Tensor decode_to_dense(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets,
                           int64_t rows, int64_t cols, const at::Tensor* bad_group);

// The dense [rows, cols] weight in `dtype` for the decode + cuBLAS paths: decoded, and with int8
// values (issue 21) dequantized, scales[n] (or scales[n, k / 64]) · q[n, k] rounded once to `dtype`.
// Correct, not fast: int8 on CUDA has no streaming kernel yet. Checked arguments only.
at::Tensor dense_weight(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets,
                        int64_t rows, int64_t cols, const std::optional<at::Tensor>& scales, at::ScalarType dtype);

// out[i] = dense[position of value i] for every set bit: the values of `dense` (same element size
// as out, [rows, cols] contiguous) at the bitmap's nonzeros, in value order.
void gather_at_bitmap(const at::Tensor& dense, const at::Tensor& bitmap, const at::Tensor& offsets,
                      at::Tensor& out);

// ---- device: one warp per (band, 64-column group) -------------------------------------------------
// The codec kernels (encode, decode, gather) give each warp one group of one band; lane l owns the
// group's columns 2l and 2l+1 in all 8 rows, i.e. tile l/4 at in-tile columns
// format::mma_lane_pair_col(l) + {0, 1}: coalesced 4-byte row segments, tile math shared with mma.

constexpr int kCodecWarpsPerBlock = 8;
constexpr int kCodecThreads = 32 * kCodecWarpsPerBlock;

// The tile a lane owns in its group, and where that tile's values start (group start + popcount
// prefix of the group's earlier tiles). Missing tiles (past the band's end) read as empty.
struct LaneTile {
  uint64_t word;
  int64_t value_start;
  bool exists;
};

__device__ __forceinline__ LaneTile lane_tile(const uint64_t* bitmap, int64_t band, int64_t tiles, int64_t group,
                                              int64_t group_start, int lane) {
  const int tile_in_group = lane >> 2;
  LaneTile out{0, group_start, false};
  for (int t = 0; t < format::kTilesPerGroup; ++t) {
    const int64_t tile = group * format::kTilesPerGroup + t;
    const uint64_t word = tile < tiles ? bitmap[band * tiles + tile] : 0;
    if (t < tile_in_group) out.value_start += format::popcount64(word);
    if (t == tile_in_group) {
      out.word = word;
      out.exists = tile < tiles;
    }
  }
  return out;
}

// Split-K plan shared by the three forward kernels: `wanted` splits (enough to fill the GPU) clamped
// to [lo, max(lo, hi)]; SALR_CUDA_SPLIT_K forces a count for tuning (clamped to [lo, steps];
// bench/bench_cuda.py --splits sweeps it); then rounded so that no split is empty. `steps` are the
// kernel's K-steps (64-column groups or k32 stages). With splits > 1: the fp32 partial sums
// [splits, m, rows] and one zeroed arrival counter per output block (last_split_to_arrive).
struct SplitK {
  int64_t splits, steps_per_split;
  at::Tensor workspace, counters;
};

inline SplitK plan_split_k(int64_t wanted, int64_t lo, int64_t hi, int64_t steps, int64_t m, int64_t rows,
                           int64_t output_blocks, const at::Tensor& x) {
  int64_t splits = std::clamp<int64_t>(wanted, lo, std::max<int64_t>(lo, hi));
  if (const char* forced = std::getenv("SALR_CUDA_SPLIT_K"); forced != nullptr && forced[0] != '\0') {
    splits = std::clamp<int64_t>(std::atoll(forced), lo, steps);
  }
  SplitK plan{};
  plan.steps_per_split = (steps + splits - 1) / splits;
  plan.splits = (steps + plan.steps_per_split - 1) / plan.steps_per_split;  // no empty split
  if (plan.splits > 1) {
    plan.workspace = at::empty({plan.splits, m, rows}, x.options().dtype(at::kFloat));
    plan.counters = at::zeros({output_blocks}, x.options().dtype(at::kInt));
  }
  return plan;
}

}  // namespace salr::cuda

// Shared host and device helpers of the CUDA backend: argument checks (on top of cpp/op_checks.h),
// the 16-bit scalar traits, cp.async and mma.sync wrappers, and the codec launchers that several
// ops reuse (decode for the dense paths, gather for sampled_gemm).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdlib>

#include "checks.h"
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

// ---- device: scalar traits ----------------------------------------------------------------------

// The two 16-bit types the mma path serves: conversion to and from their bit patterns.
template <typename Scalar>
struct Half16;

template <>
struct Half16<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(uint16_t bits) {
    return __bfloat162float(__ushort_as_bfloat16(bits));
  }
  static __device__ __forceinline__ uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
};

template <>
struct Half16<__half> {
  static __device__ __forceinline__ float to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
  static __device__ __forceinline__ uint16_t from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

// ---- device: asynchronous copies (sm_80+) --------------------------------------------------------

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1 (streamed weight data); src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(src_bytes));
}

// 8 bytes global -> shared (bitmap words: a row of tiles is only 8-byte aligned); 0 writes zeros.
__device__ __forceinline__ void cp_async_8(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `kPending` committed copy groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---- device: tensor cores -----------------------------------------------------------------------

// acc (16x8 fp32) += A (16x16, 4 registers) * B (16x8, 2 registers), 16-bit inputs.
template <typename Scalar>
__device__ __forceinline__ void mma_m16n8k16(float acc[4], const uint32_t a[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float acc[4], const uint32_t a[4], uint32_t b0,
                                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float acc[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

}  // namespace salr::cuda

// BM8x8: the one sparse weight format of salr (design.md §1).
//
// A weight W[N, K] is zero-padded to N8 x K8 (multiples of 8) and cut into 8x8 tiles. Rows 8i..8i+7
// form band i. Per tile one 64-bit bitmap word (bit r*8+c <=> W[8i+r, 8j+c] != 0), the nonzeros in
// tile order (band by band, tiles left to right, row-major inside a tile), and one int32 offset per
// (band, 64-column group) plus an end sentinel, so decoding can start anywhere without a scan.
//
// Index math only: shared by the CPU kernels, the ATen glue and the CUDA kernels.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SALR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SALR_HOST_DEVICE inline
#endif

namespace salr::format {

constexpr int64_t kTileEdge = 8;        // rows and columns of one tile
constexpr int64_t kTilesPerGroup = 8;   // tiles covered by one offsets entry
constexpr int64_t kGroupColumns = kTileEdge * kTilesPerGroup;  // 64 columns per group

SALR_HOST_DEVICE int64_t num_bands(int64_t rows) { return (rows + kTileEdge - 1) / kTileEdge; }

SALR_HOST_DEVICE int64_t tiles_per_band(int64_t cols) { return (cols + kTileEdge - 1) / kTileEdge; }

SALR_HOST_DEVICE int64_t groups_per_band(int64_t cols) {
  return (tiles_per_band(cols) + kTilesPerGroup - 1) / kTilesPerGroup;
}

// offsets has one entry per (band, group) and a final entry equal to the number of values.
SALR_HOST_DEVICE int64_t num_offsets(int64_t rows, int64_t cols) {
  return num_bands(rows) * groups_per_band(cols) + 1;
}

SALR_HOST_DEVICE int64_t offset_index(int64_t band, int64_t group, int64_t groups) {
  return band * groups + group;
}

SALR_HOST_DEVICE int popcount64(uint64_t word) {
#if defined(__CUDA_ARCH__)
  return __popcll(word);
#else
  return __builtin_popcountll(word);
#endif
}

SALR_HOST_DEVICE int bit_of(int row_in_tile, int col_in_tile) {
  return row_in_tile * static_cast<int>(kTileEdge) + col_in_tile;
}

// Number of values stored before `bit` inside a tile: a lane's value index (SpInfer's trick).
SALR_HOST_DEVICE int values_before_bit(uint64_t tile_bitmap, int bit) {
  return bit == 0 ? 0 : popcount64(tile_bitmap & (~uint64_t{0} >> (64 - bit)));
}

// The 8-bit mask of one tile row: the index into the AVX2 expansion table.
SALR_HOST_DEVICE uint32_t row_mask(uint64_t tile_bitmap, int row_in_tile) {
  return static_cast<uint32_t>(tile_bitmap >> (row_in_tile * kTileEdge)) & 0xffu;
}

}  // namespace salr::format

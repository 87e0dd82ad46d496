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

// ---- mma.sync.m16n8k16 geometry (16-bit A/B, fp32 accumulators; PTX ISA "Matrix Fragments for
// mma.m16n8k16"). The A operand is 16 weight rows x 16 columns = 2 bands x 2 tile columns: four
// 8x8 tiles, one per 32-bit A register. Lane l holds, in every register, the element pair at tile
// row l/4, tile columns 2*(l%4) and 2*(l%4)+1: two adjacent bits of the tile's bitmap word.

constexpr int kWarpLanes = 32;
constexpr int kFragmentRegisters = 4;  // a0..a3 of mma.m16n8k16

// The tile row (A), token column (B) and output row (C) a lane owns: its "group" in PTX terms.
SALR_HOST_DEVICE int mma_lane_row(int lane) { return lane >> 2; }

// The first of the two adjacent columns (A: tile columns, B: k rows, C: tokens) a lane owns.
SALR_HOST_DEVICE int mma_lane_pair_col(int lane) { return 2 * (lane & 3); }

// Which tile of the 2x2 tile block register `reg` covers: a0 = top-left, a1 = bottom-left
// (rows 8..15), a2 = top-right (columns 8..15), a3 = bottom-right.
SALR_HOST_DEVICE int fragment_band_of_register(int reg) { return reg & 1; }
SALR_HOST_DEVICE int fragment_tile_col_of_register(int reg) { return reg >> 1; }

// The bit of a lane's first element inside any tile (the second is the next bit).
SALR_HOST_DEVICE int lane_first_bit(int lane) { return bit_of(mma_lane_row(lane), mma_lane_pair_col(lane)); }

SALR_HOST_DEVICE int popcount32(uint32_t word) {
#if defined(__CUDA_ARCH__)
  return __popc(word);
#else
  return __builtin_popcount(word);
#endif
}

// A lane's fixed view of every tile word, computed once per kernel: its two bits lie in one 32-bit
// half (rows 0-3: low, rows 4-7: high), so the popcount below them is one masked popcount per half
// and the pair itself one shift: ~5 integer ops per tile instead of 64-bit shifts per call.
struct LaneDecode {
  uint32_t low_mask;   // low-half bits counted before the lane's first bit (all of them for rows 4-7)
  uint32_t high_mask;  // high-half bits counted before it (none for rows 0-3)
  uint32_t shift;      // position of the first bit inside its half
  bool high;           // the lane's bits are in the high half
};

SALR_HOST_DEVICE LaneDecode lane_decode(int lane) {
  const int bit = lane_first_bit(lane);
  const bool high = bit >= 32;
  const uint32_t shift = static_cast<uint32_t>(bit & 31);
  const uint32_t below = shift == 0 ? 0u : (~0u >> (32 - shift));
  return {high ? ~0u : below, high ? below : 0u, shift, high};
}

// A lane's two 16-bit elements of one tile, packed as one mma register (first column in the low
// half); absent elements are +0. `tile_values` points at the tile's first stored value. Both loads
// are unconditional (no divergence): they read at most 2 elements past the tile's last value, so
// callers keep 2 readable elements after every run of values (the kernel's slots have them).
SALR_HOST_DEVICE uint32_t lane_value_pair(uint64_t tile_bitmap, const uint16_t* tile_values, const LaneDecode& d) {
  const uint32_t low = static_cast<uint32_t>(tile_bitmap), high = static_cast<uint32_t>(tile_bitmap >> 32);
  const int index = popcount32(low & d.low_mask) + popcount32(high & d.high_mask);
  const uint32_t pair = ((d.high ? high : low) >> d.shift) & 3u;
  const uint32_t first = tile_values[index];
  const uint32_t second = tile_values[index + static_cast<int>(pair & 1u)];
  const uint32_t keep = ((pair & 1u) ? 0x0000ffffu : 0u) | ((pair & 2u) ? 0xffff0000u : 0u);
  return (first | (second << 16)) & keep;
}

// One k16 step of a band pair: the four A registers of a lane for tile columns 2*step, 2*step+1.
// top_* / bottom_* describe the upper and lower band of the pair: the tile words of one 64-column
// group and the values that start at that group's first tile. The cursors count the values of the
// tiles before column 2*step (start at 0 for step 0) and advance past this step's two tiles, so a
// caller walks steps 0..3 in order: the popcount prefix of the earlier tiles in the group. `lane` is
// lane_decode(lane index).
SALR_HOST_DEVICE void a_fragment_k16(const uint64_t* top_bitmaps, const uint64_t* bottom_bitmaps,
                                     const uint16_t* top_values, const uint16_t* bottom_values,
                                     int step, const LaneDecode& lane, int& top_cursor, int& bottom_cursor,
                                     uint32_t fragment[kFragmentRegisters]) {
  const uint64_t top_left = top_bitmaps[2 * step], top_right = top_bitmaps[2 * step + 1];
  const uint64_t bottom_left = bottom_bitmaps[2 * step], bottom_right = bottom_bitmaps[2 * step + 1];
  const int top_right_start = top_cursor + popcount64(top_left);
  const int bottom_right_start = bottom_cursor + popcount64(bottom_left);
  fragment[0] = lane_value_pair(top_left, top_values + top_cursor, lane);
  fragment[1] = lane_value_pair(bottom_left, bottom_values + bottom_cursor, lane);
  fragment[2] = lane_value_pair(top_right, top_values + top_right_start, lane);
  fragment[3] = lane_value_pair(bottom_right, bottom_values + bottom_right_start, lane);
  top_cursor = top_right_start + popcount64(top_right);
  bottom_cursor = bottom_right_start + popcount64(bottom_right);
}

}  // namespace salr::format

// 2:4 weights on the sparse tensor cores (issue 17): detection on BM8x8 and the re-layout into the
// operand order of mma.sp.m16n8k32 (bf16 / fp16), as host + device helpers. The CUDA re-layout
// kernel and the host twin (cpp/sparse24_host_twins.cpp) call the same functions, so they agree
// bit for bit; the Python tests check them against an independent reading of the PTX ISA.
//
// A weight is 2:4 when every row has <= 2 nonzeros in each aligned group of 4 columns ("chunk"):
// in a BM8x8 tile word, row r's chunks are the nibbles at bits 8r and 8r+4.
//
// Layout ("sparse24 tiles"): the weight, zero-padded to 16-row blocks x 32-column blocks, is cut into
// 16x32 tiles, stored row block by row block, K blocks left to right (a row block's tiles are one
// contiguous run, streamed by one warp). One tile = 576 bytes = 288 uint16 (1.125 bytes per weight):
//   [0, 256)   the mma A operand: lane l's four .b32 registers a0..a3 (16 bytes, lane-major), each
//              the two kept values of one chunk, lower column in the low half (PTX ISA, "Sparse
//              matrix storage" + sparse mma.m16n8k32 f16/bf16 A fragment = the dense m16n8k16
//              one over the 16 compressed columns: compressed columns 2c, 2c+1 <=> chunk c):
//                a0: row g, chunk t     a1: row g+8, chunk t     (g = l / 4, t = l % 4)
//                a2: row g, chunk t+4   a3: row g+8, chunk t+4
//   [256, 288) 16 metadata words (sparsity selector 0: lanes 4g and 4g+1 supply them); word
//              2g + h covers chunks 4h..4h+3 of row g in bits 0..15 and of row g+8 in bits 16..31,
//              4 bits per chunk (chunk 4h+j at bit 4j): the column indices (0..3) of its two kept
//              values, lower index in the low 2 bits.
// A chunk with fewer than 2 nonzeros keeps its lowest free positions with explicit zeros, so the
// two indices always differ and ascend (valid for mma.sp::ordered_metadata).
#pragma once

#include <cstdint>

#include "bitmap_format.h"

namespace salr::sparse24 {

constexpr int kTileRows = 16;
constexpr int kTileCols = 32;
constexpr int kChunkCols = 4;
constexpr int kLanes = 32;
constexpr int kRegisters = 4;                                 // a0..a3
constexpr int kOperandHalves = kLanes * kRegisters * 2;       // 256 uint16
constexpr int kMetadataWords = 16;
constexpr int kTileHalves = kOperandHalves + 2 * kMetadataWords;  // 288 uint16 = 576 bytes

SALR_HOST_DEVICE int64_t row_blocks(int64_t rows) { return (rows + kTileRows - 1) / kTileRows; }
SALR_HOST_DEVICE int64_t k_blocks(int64_t cols) { return (cols + kTileCols - 1) / kTileCols; }

// ---- detection --------------------------------------------------------------------------------

// Whether every nibble (row chunk) of a tile word has at most 2 set bits: nibble popcounts by the
// usual SWAR steps, then count + 1 reaches bit 2 of its nibble exactly when count >= 3.
SALR_HOST_DEVICE bool word_is_2to4(uint64_t word) {
  const uint64_t pairs = word - ((word >> 1) & 0x5555555555555555ull);
  const uint64_t nibbles = (pairs & 0x3333333333333333ull) + ((pairs >> 2) & 0x3333333333333333ull);
  return ((nibbles + 0x1111111111111111ull) & 0x4444444444444444ull) == 0;
}

// ---- one chunk --------------------------------------------------------------------------------

// The chunk's two kept positions: its set bits, topped up with the lowest free positions (bits of
// a 4-bit mask). A nibble with more than 2 bits (not 2:4) keeps its lowest two.
SALR_HOST_DEVICE uint32_t kept_positions(uint32_t nibble) {
  uint32_t kept = 0;
  int count = 0;
  for (int i = 0; i < kChunkCols; ++i) {  // set bits first, in column order
    if (count < 2 && ((nibble >> i) & 1u)) kept |= 1u << i, ++count;
  }
  for (int i = 0; i < kChunkCols; ++i) {  // then free positions
    if (count < 2 && !((kept >> i) & 1u)) kept |= 1u << i, ++count;
  }
  return kept;
}

// The 4-bit metadata of a chunk: lower kept index in bits 0-1, higher in bits 2-3.
SALR_HOST_DEVICE uint32_t chunk_metadata(uint32_t nibble) {
  const uint32_t kept = kept_positions(nibble);
  uint32_t meta = 0;
  int slot = 0;
  for (int i = 0; i < kChunkCols; ++i) {
    if ((kept >> i) & 1u) meta |= static_cast<uint32_t>(i) << (2 * slot++);
  }
  return meta;
}

// Where row `row`'s chunk `chunk` lives in the BM8x8 weight and which values are its nonzeros.
struct WeightView {
  const uint64_t* bitmap;  // [bands, tiles]
  const uint16_t* values;  // the values' 16-bit patterns
  const int32_t* offsets;
  int64_t nnz, rows, cols, tiles, groups;
};

// Value i of the weight, or 0 outside [0, nnz): a bad offsets table never reads out of bounds.
SALR_HOST_DEVICE uint32_t value_at(const WeightView& w, int64_t i) {
  return i >= 0 && i < w.nnz ? w.values[i] : 0u;
}

// The chunk's nibble and the index of its first stored value (0 nibble for padding).
SALR_HOST_DEVICE uint32_t locate_chunk(const WeightView& w, int64_t row, int64_t chunk, int64_t& first_value) {
  first_value = 0;
  const int64_t tile = chunk / 2;
  if (row >= w.rows || tile >= w.tiles) return 0;
  const int64_t band = row / format::kTileEdge;
  const int64_t group = tile / format::kTilesPerGroup;
  const uint64_t* band_words = w.bitmap + band * w.tiles;
  int64_t index = w.offsets[format::offset_index(band, group, w.groups)];
  for (int64_t t = group * format::kTilesPerGroup; t < tile; ++t) index += format::popcount64(band_words[t]);
  const int bit = format::bit_of(static_cast<int>(row % format::kTileEdge), static_cast<int>(chunk % 2) * kChunkCols);
  first_value = index + format::values_before_bit(band_words[tile], bit);
  return static_cast<uint32_t>(band_words[tile] >> bit) & 0xfu;
}

// One A register: the chunk's two kept values (explicit zeros at padded positions), lower kept
// column in the low half.
SALR_HOST_DEVICE uint32_t chunk_register(const WeightView& w, int64_t row, int64_t chunk) {
  int64_t next_value;
  const uint32_t nibble = locate_chunk(w, row, chunk, next_value);
  const uint32_t kept = kept_positions(nibble);
  uint32_t packed = 0;
  int slot = 0;
  for (int i = 0; i < kChunkCols; ++i) {
    if (!((kept >> i) & 1u)) continue;
    const uint32_t value = ((nibble >> i) & 1u) ? value_at(w, next_value++) : 0u;
    packed |= value << (16 * slot++);
  }
  return packed;
}

// ---- lanes <-> fragments ------------------------------------------------------------------------

// Row (inside the tile) and chunk (0..7) of register `reg` of lane `lane`.
SALR_HOST_DEVICE int register_row(int lane, int reg) { return (lane >> 2) + 8 * (reg & 1); }
SALR_HOST_DEVICE int register_chunk(int lane, int reg) { return (lane & 3) + 4 * (reg >> 1); }

// The metadata word a lane hands to mma.sp with selector 0 (lanes 4g+2, 4g+3 are not read; they
// load their neighbour's word, which keeps the load unconditional).
SALR_HOST_DEVICE int metadata_word_of_lane(int lane) { return 2 * (lane >> 2) + (lane & 1); }

// Metadata word `word` (0..15) of tile (row_block, k_block).
SALR_HOST_DEVICE uint32_t tile_metadata_word(const WeightView& w, int64_t row_block, int64_t k_block, int word) {
  const int g = word >> 1, half = word & 1;
  uint32_t out = 0;
  for (int row_half = 0; row_half < 2; ++row_half) {
    const int64_t row = row_block * kTileRows + g + 8 * row_half;
    for (int j = 0; j < 4; ++j) {
      int64_t unused;
      const uint32_t nibble = locate_chunk(w, row, k_block * (kTileCols / kChunkCols) + 4 * half + j, unused);
      out |= chunk_metadata(nibble) << (16 * row_half + 4 * j);
    }
  }
  return out;
}

// Lane `lane`'s 4 A registers of tile (row_block, k_block).
SALR_HOST_DEVICE void tile_lane_registers(const WeightView& w, int64_t row_block, int64_t k_block, int lane,
                                          uint32_t out[kRegisters]) {
  for (int reg = 0; reg < kRegisters; ++reg) {
    out[reg] = chunk_register(w, row_block * kTileRows + register_row(lane, reg),
                              k_block * (kTileCols / kChunkCols) + register_chunk(lane, reg));
  }
}

// Writes one lane's share of tile (row_block, k_block) into `tile` (kTileHalves uint16): its 16
// operand bytes and, for lanes 0..15, metadata word `lane`. 32 lanes write the whole tile.
SALR_HOST_DEVICE void relayout_tile_lane(const WeightView& w, int64_t row_block, int64_t k_block, int lane,
                                         uint16_t* tile) {
  uint32_t regs[kRegisters];
  tile_lane_registers(w, row_block, k_block, lane, regs);
  for (int reg = 0; reg < kRegisters; ++reg) {
    tile[lane * 8 + 2 * reg] = static_cast<uint16_t>(regs[reg]);
    tile[lane * 8 + 2 * reg + 1] = static_cast<uint16_t>(regs[reg] >> 16);
  }
  if (lane < kMetadataWords) {
    const uint32_t meta = tile_metadata_word(w, row_block, k_block, lane);
    tile[kOperandHalves + 2 * lane] = static_cast<uint16_t>(meta);
    tile[kOperandHalves + 2 * lane + 1] = static_cast<uint16_t>(meta >> 16);
  }
}

}  // namespace salr::sparse24

// The "stream" layout of a BM8x8 weight for the CUDA B-operand kernel (issue 16), and the per-lane
// decode it is built for. Host and device share every function here: the re-layout has a host twin
// and the kernel's decode is simulated lane by lane on the CPU (cpp/stream_host_twins.cpp).
//
// The weight is the mma.m16n8k16 B operand: one 8-row band = one n8 tile, two bands (a "pair") per
// warp. Lane l (g = l/4, t = l%4) owns, at every k16 step, output row g of the band and the PTX
// logical k rows {2t, 2t+1} (register b0) and {2t+8, 2t+9} (b1). We permute K inside each k16 step
// so those four logical k are the physical columns 4t..4t+3 (physical_column): one contiguous
// nibble of one tile row (tile 2s + t/2, columns 4(t%2)..+3), whose values are contiguous. The
// activations (A operand) are read with the same permutation, so the product is unchanged.
//
// One record per (band pair, 64-column group), 16-byte aligned, consecutive in pair-major order:
//   header  32 x uint32: lane l's bits, band 0 in the low 16, band 1 in the high 16; nibble s
//           (bits 4s..4s+3) = its nibble at k16 step s (bit c <=> physical column 4t + c present)
//   values  band 0: lane 0's run (its nibbles' values, step by step, columns ascending), lane 1's
//           run, ..., lane 31's; then band 1 likewise; zero padding to a multiple of 16 bytes.
// A lane's run starts at the exclusive prefix sum, over lanes, of the popcounts of the header: one
// warp scan per stage (record) instead of a popcount per lane per tile.
#pragma once

#include <cstdint>

#include "bitmap_format.h"

namespace salr::stream {

constexpr int kLanes = 32;
constexpr int kBandsPerPair = 2;
constexpr int kStepsPerGroup = 4;  // k16 steps in a 64-column group
constexpr int kGroupTiles = static_cast<int>(format::kTilesPerGroup);
constexpr int kHeaderBytes = kLanes * 4;
constexpr int kMaxBandValues = kGroupTiles * 64;
constexpr int kMaxRecordBytes = kHeaderBytes + kBandsPerPair * kMaxBandValues * 2;  // full density
constexpr int kRecordAlign = 16;
// decode_step reads up to 3 aligned words from a run's cursor: at most 10 bytes past a run's end.
constexpr int kRecordReadSlack = 16;

SALR_HOST_DEVICE int lane_row(int lane) { return lane >> 2; }

// Physical column (inside the k16 step) of the element a lane holds in mma register `reg` (b0/b1,
// or a0/a2 for the activations), half `half`: the K permutation.
SALR_HOST_DEVICE int physical_column(int lane, int reg, int half) { return 4 * (lane & 3) + 2 * reg + half; }

// The tile (0 or 1 inside the step's two) and the bit of its first column in that tile's word.
SALR_HOST_DEVICE int lane_tile_in_step(int lane) { return (lane & 3) >> 1; }
SALR_HOST_DEVICE int lane_nibble_bit(int lane) { return lane_row(lane) * 8 + (lane & 1) * 4; }

// A band's 16 header bits for `lane` from the group's 8 tile words (missing tiles are 0). The
// lane's tile is picked with a select, not an index, so the words stay in registers on the GPU.
SALR_HOST_DEVICE uint32_t lane_bits(const uint64_t* group_words, int lane) {
  const bool right = lane_tile_in_step(lane) != 0;
  uint32_t bits = 0;
  for (int step = 0; step < kStepsPerGroup; ++step) {
    const uint64_t word = right ? group_words[2 * step + 1] : group_words[2 * step];
    bits |= static_cast<uint32_t>((word >> lane_nibble_bit(lane)) & 0xfu) << (4 * step);
  }
  return bits;
}

// Writes a lane's run: its values of one band and group, step by step, columns ascending, taken
// from the BM8x8 values of that group (`group_values` = the group's first value). Returns its length.
SALR_HOST_DEVICE int write_lane_run(const uint64_t* group_words, const uint16_t* group_values, int lane,
                                    uint16_t* run) {
  const bool right = lane_tile_in_step(lane) != 0;
  int before = 0;  // values of the group's tiles left of this step's two
  int n = 0;
  for (int step = 0; step < kStepsPerGroup; ++step) {
    const uint64_t left_word = group_words[2 * step], right_word = group_words[2 * step + 1];
    const uint64_t word = right ? right_word : left_word;
    const int tile_start = right ? before + format::popcount64(left_word) : before;
    for (int c = 0; c < 4; ++c) {
      const int bit = lane_nibble_bit(lane) + c;
      if ((word >> bit) & 1u) run[n++] = group_values[tile_start + format::values_before_bit(word, bit)];
    }
    before += format::popcount64(left_word) + format::popcount64(right_word);
  }
  return n;
}

// Both bands' lane popcounts packed as two 16-bit counters (a band has at most 512 values).
SALR_HOST_DEVICE uint32_t packed_counts(uint32_t header_word) {
  return static_cast<uint32_t>(format::popcount32(header_word & 0xffffu)) |
         (static_cast<uint32_t>(format::popcount32(header_word >> 16)) << 16);
}

// One step of the warp's inclusive scan (Hillis-Steele): `from_below` is the value of lane - delta
// (a shfl.up on the device; the host simulation passes it explicitly).
SALR_HOST_DEVICE uint32_t scan_step(uint32_t value, uint32_t from_below, int lane, int delta) {
  return lane >= delta ? value + from_below : value;
}

// Byte offsets inside the record of a lane's band-0 and band-1 runs, from its packed exclusive and
// the warp's packed inclusive total (lane 31's inclusive value).
SALR_HOST_DEVICE uint32_t run_cursor_band0(uint32_t exclusive) { return kHeaderBytes + 2 * (exclusive & 0xffffu); }
SALR_HOST_DEVICE uint32_t run_cursor_band1(uint32_t exclusive, uint32_t total) {
  return kHeaderBytes + 2 * ((total & 0xffffu) + (exclusive >> 16));
}

// ---- expansion: a nibble's packed values -> two mma registers ------------------------------------
// The 8-byte window v0:v1 starting at the lane's cursor holds its (up to 4) values packed; the
// nibble's entry places value i at its column with prmt. b0 (columns 0, 1) only ever needs values
// 0-1 (v0), so it permutes {0:v0} and takes absent columns from the zero word: no mask. b1 needs
// the whole window and is masked. prmt reads only the low 16 bits of a selector, so select0's high
// half carries the nibble's byte count (the cursor advance) for free.
struct alignas(16) Expansion {
  uint32_t select0;  // prmt selector for b0 from {zero:v0}; bits 16-31: 2 * popcount(nibble)
  uint32_t select1;  // prmt selector for b1 from {v1:v0}
  uint32_t keep1;    // 0xffff per present column of b1
  uint32_t unused;   // pads the entry to one 16-byte load
};

SALR_HOST_DEVICE Expansion expansion_of(uint32_t nibble) {
  uint32_t select[2] = {0x4444u, 0}, keep1 = 0;
  int value = 0;
  for (int c = 0; c < 4; ++c) {
    if (!((nibble >> c) & 1u)) continue;
    const int reg = c >> 1, half = c & 1;
    select[reg] = (select[reg] & ~(0xffu << (8 * half))) | (((2u * value) | ((2u * value + 1) << 4)) << (8 * half));
    if (reg == 1) keep1 |= 0xffffu << (16 * half);
    ++value;
  }
  return {select[0] | (2u * value) << 16, select[1], keep1, 0u};
}

// prmt.b32 (default mode): byte i of the result is byte sel[i] of the 8-byte {hi:lo}.
SALR_HOST_DEVICE uint32_t byte_permute(uint32_t lo, uint32_t hi, uint32_t selector) {
#if defined(__CUDA_ARCH__)
  uint32_t out;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(out) : "r"(lo), "r"(hi), "r"(selector));
  return out;
#else
  const uint64_t both = (static_cast<uint64_t>(hi) << 32) | lo;
  uint32_t out = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t s = (selector >> (4 * i)) & 0xfu;
    uint32_t byte = static_cast<uint32_t>(both >> (8 * (s & 7u))) & 0xffu;
    if (s & 8u) byte = (byte & 0x80u) ? 0xffu : 0u;
    out |= byte << (8 * i);
  }
  return out;
#endif
}

// shf.r.wrap: the low 32 bits of {hi:lo} >> (amount % 32).
SALR_HOST_DEVICE uint32_t funnel_right(uint32_t lo, uint32_t hi, uint32_t amount) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(lo, hi, amount);
#else
  return static_cast<uint32_t>(((static_cast<uint64_t>(hi) << 32) | lo) >> (amount & 31u));
#endif
}

// One band's B registers of one k16 step for one lane. `base` + `cursor` is the lane's position in
// its run (the kernel passes its shared-memory base and an absolute cursor, saving an add per
// call), advanced past this step's values; base + cursor keeps the parity of the record offset (records
// are 16-byte aligned) and kRecordReadSlack readable bytes follow the record. `table` =
// expansion_of(0..15).
SALR_HOST_DEVICE void decode_step(const unsigned char* base, uint32_t lane_bits_of_band, int step,
                                  const Expansion* table, uint32_t& cursor, uint32_t b[2]) {
  const Expansion e = table[(lane_bits_of_band >> (4 * step)) & 0xfu];
  const uint32_t* w = reinterpret_cast<const uint32_t*>(base + (cursor & ~3u));
  const uint32_t shift = cursor << 3;  // 16 when the cursor is at an odd value
  const uint32_t w0 = w[0], w1 = w[1], w2 = w[2];
  const uint32_t v0 = funnel_right(w0, w1, shift), v1 = funnel_right(w1, w2, shift);
  b[0] = byte_permute(v0, 0u, e.select0);
  b[1] = byte_permute(v0, v1, e.select1) & e.keep1;
  cursor += e.select0 >> 16;
}

// ---- activations: the A operand under the same K permutation ---------------------------------
// x is staged per (16-token tile, 64-column group) as 2048 bytes of 16-byte quads: lane (g, t) of
// k16 step s reads its four A registers with one 16-byte load, quad (4s + t) * 8 + g = the words
// (token g, columns 4t, 4t+1), (token g+8, same), (token g, 4t+2, 4t+3), (token g+8, same) of the
// step: a0..a3 of mma.m16n8k16 for the physical columns physical_column(lane, reg / 2, half).
// Half index inside the block of element (token, col), token in 0..15, col in 0..63.
SALR_HOST_DEVICE int x_block_index(int token, int col) {
  const int step = col >> 4, t = (col >> 2) & 3, r = (col >> 1) & 1, e = col & 1;
  const int g = token & 7, hi = token >> 3;
  return ((((step * 4 + t) * 8 + g) * 2 + r) * 2 + hi) * 2 + e;
}
constexpr int kXBlockBytes = 16 * 64 * 2;

// Bytes of a record holding `values` values (header included), 16-byte aligned.
SALR_HOST_DEVICE int64_t record_bytes(int64_t values) {
  return (kHeaderBytes + 2 * values + kRecordAlign - 1) / kRecordAlign * kRecordAlign;
}

SALR_HOST_DEVICE int64_t num_pairs(int64_t bands) { return (bands + 1) / 2; }

}  // namespace salr::stream

// The load-time re-layout of a BM8x8 weight into stream records (cpp/stream_layout.h) on the GPU:
// two passes of one warp per record (sizes, then header + lane runs at the cumulated offsets), the
// device side of the host twin salr._C.stream_relayout. Torch-free (the budget TU compiles it).
#pragma once

#include "device_common.cuh"
#include "stream_layout.h"

namespace salr::cuda::stream {

namespace layout = salr::stream;

constexpr int kRelayoutWarps = 8;

// The 8 tile words of each band of a record's pair in one group (0 past the last band / tile).
__device__ __forceinline__ void record_words(const uint64_t* bitmap, int64_t bands, int64_t tiles, int64_t pair,
                                             int64_t group, uint64_t words[2][layout::kGroupTiles]) {
  for (int b = 0; b < layout::kBandsPerPair; ++b) {
    const int64_t band = 2 * pair + b;
    for (int t = 0; t < layout::kGroupTiles; ++t) {
      const int64_t tile = group * layout::kGroupTiles + t;
      words[b][t] = band < bands && tile < tiles ? bitmap[band * tiles + tile] : 0;
    }
  }
}

// Pass 1: every record's size in bytes. One warp per record.
__global__ void __launch_bounds__(32 * kRelayoutWarps)
    record_sizes_kernel(const uint64_t* bitmap, int64_t bands, int64_t tiles, int64_t groups, int64_t records,
                        int64_t* sizes) {
  const int lane = threadIdx.x & 31;
  const int64_t record = static_cast<int64_t>(blockIdx.x) * kRelayoutWarps + (threadIdx.x >> 5);
  if (record >= records) return;
  uint64_t words[2][layout::kGroupTiles];
  record_words(bitmap, bands, tiles, record / groups, record % groups, words);
  const uint32_t header = layout::lane_bits(words[0], lane) | (layout::lane_bits(words[1], lane) << 16);
  const uint32_t total = __reduce_add_sync(0xffffffffu, layout::packed_counts(header));
  if (lane == 0) sizes[record] = layout::record_bytes((total & 0xffffu) + (total >> 16));
}

// Pass 2: header and lane runs of every record at its offset (the buffer is zeroed: padding). A
// band whose offsets and bitmap run past the values is left empty: a bad weight never faults.
__global__ void __launch_bounds__(32 * kRelayoutWarps)
    record_fill_kernel(const uint64_t* bitmap, const uint16_t* values, const int32_t* offsets, int64_t nnz,
                       int64_t bands, int64_t tiles, int64_t groups, int64_t records, const int64_t* record_offsets,
                       unsigned char* out) {
  const int lane = threadIdx.x & 31;
  const int64_t record = static_cast<int64_t>(blockIdx.x) * kRelayoutWarps + (threadIdx.x >> 5);
  if (record >= records) return;
  const int64_t pair = record / groups, group = record % groups;
  uint64_t words[2][layout::kGroupTiles];
  record_words(bitmap, bands, tiles, pair, group, words);
  const uint32_t header = layout::lane_bits(words[0], lane) | (layout::lane_bits(words[1], lane) << 16);
  unsigned char* rec = out + record_offsets[record];
  reinterpret_cast<uint32_t*>(rec)[lane] = header;
  const uint32_t counts = layout::packed_counts(header);
  uint32_t inclusive = counts;
  for (int delta = 1; delta < 32; delta *= 2) {
    inclusive = layout::scan_step(inclusive, __shfl_up_sync(0xffffffffu, inclusive, delta), lane, delta);
  }
  const uint32_t total = __shfl_sync(0xffffffffu, inclusive, 31);
  const uint32_t exclusive = inclusive - counts;
  const uint32_t cursor[2] = {layout::run_cursor_band0(exclusive), layout::run_cursor_band1(exclusive, total)};
  for (int b = 0; b < layout::kBandsPerPair; ++b) {
    const int64_t band = 2 * pair + b;
    if (band >= bands) continue;
    const int64_t start = offsets[band * groups + group];
    const int64_t band_values = b == 0 ? (total & 0xffffu) : (total >> 16);
    if (start < 0 || start + band_values > nnz) continue;
    layout::write_lane_run(words[b], values + start, lane, reinterpret_cast<uint16_t*>(rec + cursor[b]));
  }
}

}  // namespace salr::cuda::stream

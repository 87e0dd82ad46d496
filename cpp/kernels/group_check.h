// The per-group consistency check every kernel runs before it reads a group's values: it is what
// makes a malformed bitmap/offsets pair an error instead of an out-of-bounds read. It costs eight
// popcounts of words the kernel loads anyway.
#pragma once

#include <cstdint>

#include "../bitmap_format.h"
#include "kernels.h"

namespace salr::kernels {

struct GroupGeometry {
  int64_t bands;
  int64_t tiles;           // tiles per band
  int64_t groups;          // 64-column groups per band
  uint64_t pad_cols_mask;  // bits of the last tile column that fall in the column padding
  uint64_t pad_rows_mask;  // bits of the last band that fall in the row padding
};

inline GroupGeometry geometry_of(const SparseWeightView& w) {
  GroupGeometry g{};
  g.bands = format::num_bands(w.rows);
  g.tiles = format::tiles_per_band(w.cols);
  g.groups = format::groups_per_band(w.cols);
  const int valid_cols = static_cast<int>(w.cols - (g.tiles - 1) * format::kTileEdge);
  const int valid_rows = static_cast<int>(w.rows - (g.bands - 1) * format::kTileEdge);
  const uint64_t row_byte = (0xffull << valid_cols) & 0xffull;  // columns >= valid_cols
  g.pad_cols_mask = 0;
  for (int r = 0; r < 8; ++r) g.pad_cols_mask |= row_byte << (8 * r);
  g.pad_rows_mask = valid_rows >= 8 ? 0 : (~0ull << (8 * valid_rows));
  return g;
}

inline int64_t group_tile_begin(int64_t group) { return group * format::kTilesPerGroup; }

inline int64_t group_tile_end(const GroupGeometry& g, int64_t group) {
  const int64_t end = (group + 1) * format::kTilesPerGroup;
  return end < g.tiles ? end : g.tiles;
}

// First value index of (band, group) when the group is consistent, else -1.
inline int64_t checked_group_start(const SparseWeightView& w, const GroupGeometry& g, int64_t band,
                                   int64_t group) {
  const int64_t index = band * g.groups + group;
  const int64_t start = w.offsets[index];
  const int64_t next = w.offsets[index + 1];
  const uint64_t* words = w.bitmap + band * g.tiles;
  const int64_t tile_end = group_tile_end(g, group);
  int64_t count = 0;
  uint64_t all_bits = 0;
  for (int64_t t = group_tile_begin(group); t < tile_end; ++t) {
    count += format::popcount64(words[t]);
    all_bits |= words[t];
  }
  const bool rows_padded = band == g.bands - 1 && (all_bits & g.pad_rows_mask) != 0;
  const bool cols_padded = tile_end == g.tiles && (words[g.tiles - 1] & g.pad_cols_mask) != 0;
  if (start < 0 || start + count != next || next > w.values_count || rows_padded || cols_padded) {
    return -1;
  }
  return start;
}

// Calls fn(bit, value_index) for every set bit of one tile word in storage order (row-major
// inside the tile), value indices counting up from `v`. Returns the index after the tile's values.
template <class BitFn>
inline int64_t for_each_set_bit(uint64_t word, int64_t v, BitFn&& fn) {
  while (word != 0) {
    fn(__builtin_ctzll(word), v++);
    word &= word - 1;
  }
  return v;
}

// The scalar walk of one (band, group): checks it (checked_group_start), then calls
// fn(tile, bit, value_index) for each nonzero in storage order. Returns false, having called
// nothing, when the group is inconsistent. The scalar kernels and the codec all walk through this.
template <class NonzeroFn>
inline bool for_each_nonzero(const SparseWeightView& w, const GroupGeometry& g, int64_t band, int64_t group,
                             NonzeroFn&& fn) {
  int64_t v = checked_group_start(w, g, band, group);
  if (v < 0) return false;
  for (int64_t t = group_tile_begin(group); t < group_tile_end(g, group); ++t) {
    v = for_each_set_bit(w.bitmap[band * g.tiles + t], v, [&](int bit, int64_t value) { fn(t, bit, value); });
  }
  return true;
}

// Why: every decoder walks the same way — bands, checked groups, tiles — and differs only in how
// it expands one tile. Calls tile(word, first_value, dense_offset, rows, width) for every tile of
// bands [band_begin, band_end); dense_offset is the tile's first element in the row-major [rows, cols]
// output. Returns -1, or the first inconsistent group (as the kernels do).
template <class TileFn>
inline int64_t for_each_checked_tile(const SparseWeightView& w, int64_t band_begin, int64_t band_end,
                                     TileFn&& tile) {
  const GroupGeometry geo = geometry_of(w);
  for (int64_t band = band_begin; band < band_end; ++band) {
    const int rows = static_cast<int>(w.rows - 8 * band < 8 ? w.rows - 8 * band : 8);
    for (int64_t group = 0; group < geo.groups; ++group) {
      int64_t v = checked_group_start(w, geo, band, group);
      if (v < 0) return band * geo.groups + group;
      for (int64_t t = group_tile_begin(group); t < group_tile_end(geo, group); ++t) {
        const uint64_t word = w.bitmap[band * geo.tiles + t];
        const int width = static_cast<int>(w.cols - 8 * t < 8 ? w.cols - 8 * t : 8);
        tile(word, v, 8 * band * w.cols + 8 * t, rows, width);
        v += format::popcount64(word);
      }
    }
  }
  return -1;
}

}  // namespace salr::kernels

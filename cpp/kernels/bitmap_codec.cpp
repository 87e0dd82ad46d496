// BM8x8 encode / decode / gather. Scalar on purpose: these run once per weight (encode), for
// checks (decode) or inside a training step next to a GEMM that dominates (gather).
#include <algorithm>
#include <cstring>

#include "group_check.h"
#include "int8_kernels.h"
#include "kernels.h"
#include "numeric.h"

namespace salr::kernels {
namespace {

// Bitmap word of tile (band, tile) of a dense row-major [rows, cols] matrix; nonzero(i) tests element i.
template <class NonzeroFn>
uint64_t tile_word(int64_t rows, int64_t cols, int64_t band, int64_t tile, NonzeroFn&& nonzero) {
  uint64_t word = 0;
  const int64_t row_end = std::min<int64_t>(8 * band + 8, rows);
  const int64_t col_end = std::min<int64_t>(8 * tile + 8, cols);
  for (int64_t n = 8 * band; n < row_end; ++n) {
    for (int64_t k = 8 * tile; k < col_end; ++k) {
      if (nonzero(n * cols + k)) word |= 1ull << format::bit_of(n - 8 * band, k - 8 * tile);
    }
  }
  return word;
}

void copy_element(const void* src, int64_t src_index, void* dst, int64_t dst_index, int size) {
  std::memcpy(static_cast<char*>(dst) + dst_index * size,
              static_cast<const char*>(src) + src_index * size, size);
}

// Why: float and int8 weights differ only in the zero test and the element size (values are moved
// as raw bytes), so encode and decode are written once for both.
template <class NonzeroFn>
void encode_count_with(int64_t rows, int64_t cols, uint64_t* bitmap, int32_t* group_counts, int64_t band_begin,
                       int64_t band_end, NonzeroFn&& nonzero) {
  const int64_t tiles = format::tiles_per_band(cols);
  const int64_t groups = format::groups_per_band(cols);
  for (int64_t band = band_begin; band < band_end; ++band) {
    for (int64_t group = 0; group < groups; ++group) {
      int32_t count = 0;
      const int64_t tile_end = std::min<int64_t>((group + 1) * format::kTilesPerGroup, tiles);
      for (int64_t t = group * format::kTilesPerGroup; t < tile_end; ++t) {
        const uint64_t word = tile_word(rows, cols, band, t, nonzero);
        bitmap[band * tiles + t] = word;
        count += format::popcount64(word);
      }
      group_counts[band * groups + group] = count;
    }
  }
}

void encode_fill_sized(const void* dense, const SparseWeightView& out, void* values, int size, int64_t band_begin,
                       int64_t band_end) {
  const GroupGeometry geo = geometry_of(out);
  for (int64_t band = band_begin; band < band_end; ++band) {
    int64_t v = out.offsets[band * geo.groups];
    for (int64_t t = 0; t < geo.tiles; ++t) {
      v = for_each_set_bit(out.bitmap[band * geo.tiles + t], v, [&](int bit, int64_t value) {
        copy_element(dense, (8 * band + (bit >> 3)) * out.cols + 8 * t + (bit & 7), values, value, size);
      });
    }
  }
}

int64_t decode_bands_sized(const SparseWeightView& w, void* dense, int size, int64_t band_begin, int64_t band_end) {
  const GroupGeometry geo = geometry_of(w);
  const int64_t row_begin = 8 * band_begin;
  const int64_t row_end = std::min<int64_t>(8 * band_end, w.rows);
  if (row_end > row_begin) {
    std::memset(static_cast<char*>(dense) + row_begin * w.cols * size, 0,
                (row_end - row_begin) * w.cols * size);
  }
  for (int64_t band = band_begin; band < band_end; ++band) {
    for (int64_t group = 0; group < geo.groups; ++group) {
      const bool consistent = for_each_nonzero(w, geo, band, group, [&](int64_t t, int bit, int64_t v) {
        copy_element(w.values, v, dense, (8 * band + (bit >> 3)) * w.cols + 8 * t + (bit & 7), size);
      });
      if (!consistent) return band * geo.groups + group;
    }
  }
  return -1;
}

}  // namespace

void encode_count(const void* dense, int64_t rows, int64_t cols, DType dtype, uint64_t* bitmap,
                  int32_t* group_counts, int64_t band_begin, int64_t band_end) {
  encode_count_with(rows, cols, bitmap, group_counts, band_begin, band_end,
                    [&](int64_t i) { return is_nonzero(dense, i, dtype); });
}

void encode_count_int8(const int8_t* dense, int64_t rows, int64_t cols, uint64_t* bitmap, int32_t* group_counts,
                       int64_t band_begin, int64_t band_end) {
  encode_count_with(rows, cols, bitmap, group_counts, band_begin, band_end,
                    [&](int64_t i) { return dense[i] != 0; });
}

void encode_fill(const void* dense, const SparseWeightView& out, void* values, int64_t band_begin,
                 int64_t band_end) {
  encode_fill_sized(dense, out, values, element_size(out.dtype), band_begin, band_end);
}

void encode_fill_int8(const int8_t* dense, const SparseWeightView& index, int8_t* values, int64_t band_begin,
                      int64_t band_end) {
  encode_fill_sized(dense, index, values, 1, band_begin, band_end);
}

int64_t decode_bands(const SparseWeightView& w, void* dense, int64_t band_begin, int64_t band_end) {
  return decode_bands_sized(w, dense, element_size(w.dtype), band_begin, band_end);
}

int64_t decode_bands_int8(const SparseWeightView& index, int8_t* dense, int64_t band_begin, int64_t band_end) {
  return decode_bands_sized(index, dense, 1, band_begin, band_end);
}

int64_t gather_bands(const SparseWeightView& w, const float* dense_rows, int64_t row_stride,
                     void* values, int64_t band_begin, int64_t band_end) {
  const GroupGeometry geo = geometry_of(w);
  for (int64_t band = band_begin; band < band_end; ++band) {
    const float* band_rows = dense_rows + (band - band_begin) * 8 * row_stride;
    for (int64_t group = 0; group < geo.groups; ++group) {
      const bool consistent = for_each_nonzero(w, geo, band, group, [&](int64_t t, int bit, int64_t v) {
        store_from_float(values, v, band_rows[(bit >> 3) * row_stride + 8 * t + (bit & 7)], w.dtype);
      });
      if (!consistent) return band * geo.groups + group;
    }
  }
  return -1;
}

}  // namespace salr::kernels

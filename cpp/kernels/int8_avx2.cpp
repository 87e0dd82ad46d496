// AVX2 + FMA kernels for int8 BM8x8 weights (issue 21). Built with the flags of spmm_avx2.cpp.
//
// A tile row's 8-bit mask picks a vpshufb control that moves the row's packed int8 values into the
// top byte of their column's 32-bit lane (zeros elsewhere); converted as they stand, the lanes are
// 2^24 · q exactly, so a row costs one broadcast load, one shuffle, one convert and one FMA, and the
// 2^-24 goes into x (M = 1: one multiply per tile) or the row scales (decoded groups). Why not an
// arithmetic shift to sign-extend: it would run on the two ports the convert and the FMA share,
// which bound this loop. Per-row scales multiply each output row once after the band's
// accumulation, per-group scales each group's partial sums.
//
// M = 1 walks the band straight from the value stream (the float kernels' tile_fma_direct). M > 1
// decodes (band, group) once into fp32 (scales applied) and every x row reads it from L1. The
// transposed product decodes likewise.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "avx2_epilogue.h"
#include "avx2_rows.h"
#include "group_check.h"
#include "int8_kernels.h"
#include "numeric.h"

namespace salr::kernels {
namespace {

constexpr int64_t kGroupValues = 512;           // most values one (band, group) can hold
constexpr int64_t kRowRead = 8;                  // a row expansion reads 8 bytes from its first value
constexpr int kPrefetchBytes = 2048;             // values prefetch distance

// vpshufb controls, one per row mask: packed byte j -> top byte of column c's lane (c = j-th set bit).
struct Int8RowTable {
  alignas(32) uint8_t ctl[256][32];
  Int8RowTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int j = 0;
      for (int c = 0; c < 8; ++c) {
        // The upper 128-bit lane shuffles its own copy of the 8 bytes (columns 4-7): same indices.
        for (int b = 0; b < 4; ++b) ctl[mask][4 * c + b] = 0x80;
        if ((mask >> c) & 1) ctl[mask][4 * c + 3] = static_cast<uint8_t>(j++);
      }
    }
  }
};
const Int8RowTable g_int8_rows;

constexpr float kTopByte = 0x1p-24f;  // a value converted from its lane's top byte is 2^24 · q

// Row expansion of int8 values for tile_fma_direct (avx2_rows.h): lanes 2^24 · q, 0 where the mask is
// clear; reads 8 bytes from p.
struct Int8Top {
  using T = int8_t;
  static constexpr int kEntryShift = 5;  // log2 of a control's size in bytes
  static __m256 row_at(const T* p, unsigned entry) {
    int64_t bytes;
    std::memcpy(&bytes, p, sizeof bytes);
    const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(&g_int8_rows.ctl[0][0] + entry));
    return _mm256_cvtepi32_ps(_mm256_shuffle_epi8(_mm256_set1_epi64x(bytes), ctl));
  }
  static __m256 row(const T* p, unsigned mask) { return row_at(p, mask << kEntryShift); }
};

// The values of a checked group, in place unless the 8-byte row reads would pass the end of values;
// then from a zero-padded copy in `buf` (kGroupValues + kRowRead bytes).
inline const int8_t* group_values(const SparseWeightView& w, int64_t start, int64_t next, int8_t* buf) {
  const auto* v = static_cast<const int8_t*>(w.values);
  if (next + kRowRead <= w.values_count) return v + start;
  if (next > start) std::memcpy(buf, v + start, static_cast<size_t>(next - start));
  std::memset(buf + (next - start), 0, kRowRead);
  return buf;
}

// The 8 row scales of (band, group); 0 for rows past the weight's end.
inline __m256 scale_vector(const Int8WeightView& w, int64_t band, int64_t group) {
  alignas(32) float s[8];
  for (int r = 0; r < 8; ++r) {
    const int64_t n = 8 * band + r;
    s[r] = n < w.index.rows ? int8_scale(w, n, group) : 0.0f;
  }
  return _mm256_load_ps(s);
}

// (band, group) decoded to fp32 with its scales applied: dense[r * 64 + 8 * t], tiles past the
// group's end left untouched. Returns false when the group is inconsistent.
inline bool decode_group_scaled(const Int8WeightView& w, const GroupGeometry& geo, int64_t band, int64_t g,
                                int8_t* pad, float* dense) {
  const SparseWeightView& idx = w.index;
  const int64_t start = checked_group_start(idx, geo, band, g);
  if (start < 0) return false;
  const int64_t index = band * geo.groups + g;
  const int8_t* p = group_values(idx, start, idx.offsets[index + 1], pad);
  alignas(32) float s[8];
  _mm256_store_ps(s, _mm256_mul_ps(scale_vector(w, band, g), _mm256_set1_ps(kTopByte)));
  const uint64_t* words = idx.bitmap + band * geo.tiles + group_tile_begin(g);
  const int64_t nt = group_tile_end(geo, g) - group_tile_begin(g);
  for (int64_t t = 0; t < nt; ++t) {
    const uint64_t word = words[t];
    for (int r = 0; r < 8; ++r) {
      const __m256 row = Int8Top::row(p + row_offset(word, r), format::row_mask(word, r));
      _mm256_storeu_ps(dense + r * 64 + 8 * t, _mm256_mul_ps(row, _mm256_set1_ps(s[r])));
    }
    p += _mm_popcnt_u64(word);
  }
  return true;
}

// M = 1: one pass over the band's value stream, 8 row accumulators (+ 8 per-group partials).
template <class D>
int64_t gemm_one_row(const Int8GemmArgs& a, const float* x, BandExtras<D>& ex, const float* ts, int64_t band_begin,
                     int64_t band_end) {
  using T = typename D::T;
  const Int8WeightView& w = a.weight;
  const GroupGeometry geo = geometry_of(w.index);
  const bool group_scales = w.scale_groups != 1;
  alignas(16) int8_t pad[kGroupValues + kRowRead];
  for (int64_t band = band_begin; band < band_end; ++band) {
    __m256 total[8], part[8];
    for (int r = 0; r < 8; ++r) total[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < geo.groups; ++g) {
      const int64_t start = checked_group_start(w.index, geo, band, g);
      if (start < 0) return band * geo.groups + g;
      const int64_t next = w.index.offsets[band * geo.groups + g + 1];
      const int8_t* p = group_values(w.index, start, next, pad);
      for (int64_t ahead = start; ahead < next; ahead += 64) {  // the stream kPrefetchBytes ahead
        _mm_prefetch(reinterpret_cast<const char*>(w.index.values) + ahead + kPrefetchBytes, _MM_HINT_T0);
      }
      __m256* acc = group_scales ? part : total;
      if (group_scales) {
        for (int r = 0; r < 8; ++r) part[r] = _mm256_setzero_ps();
      }
      const uint64_t* words = w.index.bitmap + band * geo.tiles;
      for (int64_t t = group_tile_begin(g); t < group_tile_end(geo, g); ++t) {
        const uint64_t word = words[t];
        tile_fma_direct<Int8Top>(p, word, _mm256_mul_ps(_mm256_loadu_ps(x + 8 * t), _mm256_set1_ps(kTopByte)), acc);
        p += _mm_popcnt_u64(word);
      }
      if (group_scales) {
        alignas(32) float s[8];
        _mm256_store_ps(s, scale_vector(w, band, g));
        for (int r = 0; r < 8; ++r) total[r] = _mm256_fmadd_ps(part[r], _mm256_set1_ps(s[r]), total[r]);
      }
    }
    const __m256 sums = reduce8(total);
    const int64_t nrows = std::min<int64_t>(8, w.index.rows - 8 * band);
    ex.load(band, nrows);
    ex.finish_sums(group_scales ? sums : _mm256_mul_ps(sums, scale_vector(w, band, 0)), ts,
                   static_cast<T*>(a.y) + 8 * band, nrows);
  }
  return -1;
}

// Why: M > 1 keeps 8 row accumulators per x row in memory (L1), 8 floats each.
inline void add_to(float* acc, __m256 v) { _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), v)); }

template <class D>
int64_t gemm_int8_avx2_t(const Int8GemmArgs& a, int64_t band_begin, int64_t band_end) {
  using T = typename D::T;
  const Int8WeightView& w = a.weight;
  const GroupGeometry geo = geometry_of(w.index);
  const int64_t k8 = geo.groups * format::kGroupColumns;
  BandExtras<D> ex(a.rank, a.t, a.adapter_b, a.bias, a.adapter_b_scales);
  // x as fp32, zero padded to whole groups; the decoded group buffer (8 rows x 64 columns); the
  // accumulators; t zero padded to rank8 columns (what BandExtras reads).
  float* xs = float_scratch(static_cast<size_t>(a.m * k8 + 8 * format::kGroupColumns + 64 * a.m + a.m * ex.rank8));
  float* dense = xs + a.m * k8;
  float* acc = dense + 8 * format::kGroupColumns;  // [m][8 rows][8 lanes]
  float* ts = acc + 64 * a.m;
  if (ex.adapter) rows_to_f32<F32>(a.t, a.rank, a.m, a.rank, ts, ex.rank8);
  for (int64_t i = 0; i < a.m; ++i) {
    const T* src = static_cast<const T*>(a.x) + i * a.x_row_stride;
    for (int64_t k = 0; k < k8; k += 8) {
      const int64_t n = std::clamp<int64_t>(w.index.cols - k, 0, 8);
      _mm256_storeu_ps(xs + i * k8 + k, n > 0 ? load_partial<D>(src + k, n) : _mm256_setzero_ps());
    }
  }
  if (a.m == 1) return gemm_one_row<D>(a, xs, ex, ts, band_begin, band_end);
  alignas(16) int8_t pad[kGroupValues + kRowRead];
  for (int64_t band = band_begin; band < band_end; ++band) {
    std::fill(acc, acc + 64 * a.m, 0.0f);
    for (int64_t g = 0; g < geo.groups; ++g) {
      std::fill(dense, dense + 8 * format::kGroupColumns, 0.0f);
      if (!decode_group_scaled(w, geo, band, g, pad, dense)) return band * geo.groups + g;
      const int64_t nt = group_tile_end(geo, g) - group_tile_begin(g);
      for (int64_t i = 0; i < a.m; ++i) {
        const float* xg = xs + i * k8 + g * format::kGroupColumns;
        for (int r = 0; r < 8; ++r) {
          __m256 s = _mm256_setzero_ps();
          for (int64_t t = 0; t < nt; ++t) {
            s = _mm256_fmadd_ps(_mm256_loadu_ps(dense + r * 64 + 8 * t), _mm256_loadu_ps(xg + 8 * t), s);
          }
          add_to(acc + 64 * i + 8 * r, s);
        }
      }
    }
    const int64_t nrows = std::min<int64_t>(8, w.index.rows - 8 * band);
    ex.load(band, nrows);
    for (int64_t i = 0; i < a.m; ++i) {
      __m256 rows[8];
      for (int r = 0; r < 8; ++r) rows[r] = _mm256_loadu_ps(acc + 64 * i + 8 * r);
      ex.finish(rows, ts + i * ex.rank8, static_cast<T*>(a.y) + i * a.y_row_stride + 8 * band, nrows);
    }
  }
  return -1;
}

// dx for 64-column groups: (band, group) decoded once with scales applied, then every dy row adds
// Σ_r dy[8b + r] · W[r, :] into 8 column accumulators.
template <class D>
int64_t gemm_transposed_int8_avx2_t(const Int8GemmTransposedArgs& a, int64_t group_begin, int64_t group_end) {
  using T = typename D::T;
  const Int8WeightView& w = a.weight;
  const GroupGeometry geo = geometry_of(w.index);
  alignas(32) float dense[8 * format::kGroupColumns];
  alignas(16) int8_t pad[kGroupValues + kRowRead];
  float* acc = float_scratch(static_cast<size_t>(64 * a.m));  // [m][64 columns]
  for (int64_t g = group_begin; g < group_end; ++g) {
    const int64_t nt = group_tile_end(geo, g) - group_tile_begin(g);
    std::fill(acc, acc + 64 * a.m, 0.0f);
    for (int64_t band = 0; band < geo.bands; ++band) {
      std::fill(dense, dense + 8 * format::kGroupColumns, 0.0f);
      if (!decode_group_scaled(w, geo, band, g, pad, dense)) return band * geo.groups + g;
      const int64_t nrows = std::min<int64_t>(8, w.index.rows - 8 * band);
      for (int64_t i = 0; i < a.m; ++i) {
        alignas(32) float dy[8];
        _mm256_store_ps(dy, load_partial<D>(static_cast<const T*>(a.dy) + i * a.dy_row_stride + 8 * band, nrows));
        for (int64_t t = 0; t < nt; ++t) {
          __m256 s = _mm256_loadu_ps(acc + 64 * i + 8 * t);
          for (int r = 0; r < nrows; ++r) {
            s = _mm256_fmadd_ps(_mm256_set1_ps(dy[r]), _mm256_loadu_ps(dense + r * 64 + 8 * t), s);
          }
          _mm256_storeu_ps(acc + 64 * i + 8 * t, s);
        }
      }
    }
    for (int64_t i = 0; i < a.m; ++i) {
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t k = g * format::kGroupColumns + 8 * t;
        store_partial<D>(static_cast<T*>(a.dx) + i * a.dx_row_stride + k, _mm256_loadu_ps(acc + 64 * i + 8 * t),
                         std::min<int64_t>(8, w.index.cols - k));
      }
    }
  }
  return -1;
}

int64_t gemm_int8_avx2(const Int8GemmArgs& a, int64_t band_begin, int64_t band_end) {
  if (a.dtype == DType::kBFloat16) return gemm_int8_avx2_t<Bf16>(a, band_begin, band_end);
  if (a.dtype == DType::kFloat16) return gemm_int8_avx2_t<Fp16>(a, band_begin, band_end);
  return gemm_int8_avx2_t<F32>(a, band_begin, band_end);
}

int64_t gemm_transposed_int8_avx2(const Int8GemmTransposedArgs& a, int64_t group_begin, int64_t group_end) {
  if (a.dtype == DType::kBFloat16) return gemm_transposed_int8_avx2_t<Bf16>(a, group_begin, group_end);
  if (a.dtype == DType::kFloat16) return gemm_transposed_int8_avx2_t<Fp16>(a, group_begin, group_end);
  return gemm_transposed_int8_avx2_t<F32>(a, group_begin, group_end);
}

const Int8KernelTable kAvx2Int8Table{"avx2", gemm_int8_avx2, gemm_transposed_int8_avx2, dequantize_bands_int8};

}  // namespace

const Int8KernelTable* avx2_int8_table() { return &kAvx2Int8Table; }

}  // namespace salr::kernels

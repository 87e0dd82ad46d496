// AVX2 + FMA + F16C BM8x8 kernels (design.md §1). Each tile row's 8-bit mask picks a table entry
// that expands the row's packed values into 8 fp32 lanes (zeros where the bitmap is clear); those
// FMA against 8 columns of x, converted to fp32 once per call. Only this file gets the ISA flags.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "group_check.h"
#include "kernels.h"
#include "numeric.h"

namespace salr::kernels {
namespace {

constexpr int64_t kPad = 8;           // a row expansion reads 8 elements from the row's first value
constexpr int64_t kGroupValues = 512;  // most values one 64-column group of one band can hold
constexpr int64_t kChunk = 64;         // x rows per pass of the blocked path: bounds scratch memory
constexpr int64_t kDirectMaxM = 1;    // up to this m, decode straight into registers per x row
constexpr int kPrefetchBytes = 2048;  // values prefetch distance: covers page crossings of the stream

// Expansion tables, one entry per row mask, built by code at static init.
struct Tables {
  alignas(32) uint8_t bf16[256][32];    // vpshufb of a broadcast 16-byte load: bf16 -> fp32 bits
  alignas(16) uint8_t fp16[256][16];    // pshufb: packed halves to their slots, zero elsewhere
  alignas(32) int32_t f32_idx[256][8];  // vpermps source lane of each slot
  alignas(32) int32_t f32_keep[256][8];  // all ones where the slot holds a value
  Tables() {
    for (int mask = 0; mask < 256; ++mask) {
      int j = 0;  // index of the next packed value
      for (int c = 0; c < 8; ++c) {
        const bool set = (mask >> c) & 1;
        for (int b = 0; b < 4; ++b) bf16[mask][4 * c + b] = 0x80;
        fp16[mask][2 * c] = fp16[mask][2 * c + 1] = 0x80;
        f32_idx[mask][c] = set ? j : 0;
        f32_keep[mask][c] = set ? -1 : 0;
        if (!set) continue;
        bf16[mask][4 * c + 2] = static_cast<uint8_t>(2 * j);  // bf16 is the high half of fp32
        bf16[mask][4 * c + 3] = static_cast<uint8_t>(2 * j + 1);
        fp16[mask][2 * c] = static_cast<uint8_t>(2 * j);
        fp16[mask][2 * c + 1] = static_cast<uint8_t>(2 * j + 1);
        ++j;
      }
    }
  }
};
const Tables g_tables;

// Per-dtype loads, stores and row expansion: the three template instantiations of every kernel.
struct Bf16 {
  using T = uint16_t;
  // One row of a tile: 8 packed values from p, placed by the mask's shuffle.
  static __m256 row(const T* p, unsigned mask) {
    const __m256i src = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(g_tables.bf16[mask]));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(src, ctl));
  }
  static __m256 load8(const T* p) {
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  }
  // Round to nearest even with NaN kept quiet, bit-identical to numeric.h's float_to_bf16.
  static void store8(T* p, __m256 v) {
    const __m256i b = _mm256_castps_si256(v);
    const __m256i hi = _mm256_srli_epi32(b, 16);
    const __m256i bias = _mm256_add_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7fff));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(b, bias), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i r = _mm256_blendv_epi8(rounded, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
};

struct Fp16 {
  using T = uint16_t;
  static __m256 row(const T* p, unsigned mask) {
    const __m128i src = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i ctl = _mm_load_si128(reinterpret_cast<const __m128i*>(g_tables.fp16[mask]));
    return _mm256_cvtph_ps(_mm_shuffle_epi8(src, ctl));
  }
  static __m256 load8(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // vcvtps2ph rounds to nearest even and quiets NaN exactly like numeric.h's float_to_fp16.
  static void store8(T* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

struct F32 {
  using T = float;
  static __m256 row(const T* p, unsigned mask) {
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(g_tables.f32_idx[mask]));
    const __m256 keep = _mm256_load_ps(reinterpret_cast<const float*>(g_tables.f32_keep[mask]));
    return _mm256_and_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(p), idx), keep);
  }
  static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  static void store8(T* p, __m256 v) { _mm256_storeu_ps(p, v); }
};

// Loads n <= 8 elements through a zeroed buffer: never reads past the n valid ones.
template <class D>
inline __m256 load_partial(const typename D::T* p, int64_t n) {
  if (n == 8) return D::load8(p);
  typename D::T tmp[8] = {};
  std::memcpy(tmp, p, static_cast<size_t>(n) * sizeof(tmp[0]));
  return D::load8(tmp);
}

// Stores the first n <= 8 lanes: output rows past the weight's last row are not ours to write.
template <class D>
inline void store_partial(typename D::T* p, __m256 v, int64_t n) {
  if (n == 8) return D::store8(p, v);
  typename D::T tmp[8];
  D::store8(tmp, v);
  std::memcpy(p, tmp, static_cast<size_t>(n) * sizeof(tmp[0]));
}

// `rows` rows of n elements (row stride `stride`) -> fp32 rows of `width` >= n, zero padded, so
// the inner loops load whole 8-column segments with no tail handling.
template <class D>
void rows_to_f32(const typename D::T* src, int64_t stride, int64_t rows, int64_t n, float* dst,
                 int64_t width) {
  for (int64_t i = 0; i < rows; ++i) {
    const typename D::T* s = src + i * stride;
    float* d = dst + i * width;
    int64_t k = 0;
    for (; k < n; k += 8) _mm256_storeu_ps(d + k, load_partial<D>(s + k, std::min<int64_t>(8, n - k)));
    for (; k < width; ++k) d[k] = 0.0f;
  }
}

// Lane r = sum of the lanes of acc[r]: the 8 output rows of a band from its row accumulators.
inline __m256 reduce8(const __m256* acc) {
  const __m256 h01 = _mm256_hadd_ps(acc[0], acc[1]), h23 = _mm256_hadd_ps(acc[2], acc[3]);
  const __m256 h45 = _mm256_hadd_ps(acc[4], acc[5]), h67 = _mm256_hadd_ps(acc[6], acc[7]);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// The values of a checked group, in place unless a row load's 8-element over-read would pass
// values_count; then from a zero-padded copy in `buf` (kGroupValues + kPad elements).
template <class T>
inline const T* group_values(const SparseWeightView& w, int64_t start, int64_t next, T* buf) {
  const T* v = static_cast<const T*>(w.values);
  if (next + kPad <= w.values_count) return v + start;
  if (next > start) std::memcpy(buf, v + start, static_cast<size_t>(next - start) * sizeof(T));  // values may be null
  std::memset(buf + (next - start), 0, kPad * sizeof(T));
  return buf;
}

// Prefetch `bytes` past p, in integer arithmetic: the address may lie past the array (no fault).
inline void prefetch_ahead(const void* p, int64_t bytes) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + bytes), _MM_HINT_T0);
}

// Offset of tile row r's first value inside the tile: popcount of the bits of rows < r. Independent
// per row, so the only serial chain is one popcount-add per tile.
inline int64_t row_offset(uint64_t word, int r) {
  return r == 0 ? 0 : static_cast<int64_t>(_mm_popcnt_u64(_bzhi_u64(word, 8 * r)));
}

// acc[r] += row r of one tile * the tile's 8 x columns.
template <class D>
inline void tile_fma(const typename D::T* p, uint64_t word, __m256 xv, __m256* acc) {
  for (int r = 0; r < 8; ++r) {
    acc[r] = _mm256_fmadd_ps(D::row(p + row_offset(word, r), format::row_mask(word, r)), xv, acc[r]);
  }
}

// Expands the tiles of one group into dense fp32 rows dense[r * 64 + 8 * t]: decoded once,
// reused by every x row of the blocked path and every dy row of the transposed one.
template <class D>
inline void decode_group(const typename D::T* p, const uint64_t* words, int64_t nt, float* dense) {
  for (int64_t t = 0; t < nt; ++t) {
    const uint64_t word = words[t];
    for (int r = 0; r < 8; ++r) {
      _mm256_storeu_ps(dense + r * 64 + 8 * t, D::row(p + row_offset(word, r), format::row_mask(word, r)));
    }
    p += _mm_popcnt_u64(word);
  }
}

// Per-band epilogue inputs: adapter rows and bias of the band's 8 outputs, in fp32.
template <class D>
struct BandExtras {
  std::vector<float> b;  // [8][rank8] adapter_b rows of the band, zero padded
  int64_t rank8 = 0;
  bool adapter = false;
  __m256 bias = _mm256_setzero_ps();

  BandExtras(const GemmArgs& a) : adapter(a.rank > 0 && a.t != nullptr && a.adapter_b != nullptr) {
    rank8 = adapter ? (a.rank + 7) / 8 * 8 : 0;
    b.assign(static_cast<size_t>(8 * rank8), 0.0f);
  }
  void load(const GemmArgs& a, int64_t band, int64_t nrows) {
    using T = typename D::T;
    if (adapter) {
      std::fill(b.begin(), b.end(), 0.0f);
      rows_to_f32<D>(static_cast<const T*>(a.adapter_b) + 8 * band * a.rank, a.rank, nrows, a.rank,
                     b.data(), rank8);
    }
    bias = a.bias ? load_partial<D>(static_cast<const T*>(a.bias) + 8 * band, nrows) : _mm256_setzero_ps();
  }
  // Adds t_row · adapter rows, reduces, adds the bias and stores the band's outputs of one x row.
  void finish(__m256* acc, const float* t_row, typename D::T* y, int64_t nrows) const {
    for (int64_t s = 0; s < rank8; s += 8) {
      const __m256 tv = _mm256_loadu_ps(t_row + s);
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(&b[r * rank8 + s]), tv, acc[r]);
    }
    store_partial<D>(y, _mm256_add_ps(reduce8(acc), bias), nrows);
  }
};

// Small m: one x row at a time, tiles expanded straight into FMAs, 8 row accumulators in
// registers; prefetch ahead of the values and bitmap streams so DRAM latency overlaps the decode.
template <class D>
int64_t gemm_direct(const GemmArgs& a, const GroupGeometry& geo, const float* xs, const float* ts,
                    int64_t band_begin, int64_t band_end) {
  using T = typename D::T;
  const SparseWeightView& w = a.weight;
  const int64_t width = geo.tiles * 8;
  BandExtras<D> ex(a);
  alignas(32) T buf[kGroupValues + kPad];
  for (int64_t band = band_begin; band < band_end; ++band) {
    const int64_t nrows = std::min<int64_t>(8, w.rows - 8 * band);
    ex.load(a, band, nrows);
    const uint64_t* words = w.bitmap + band * geo.tiles;
    for (int64_t i = 0; i < a.m; ++i) {
      const float* x = xs + i * width;
      __m256 acc[8];
      for (auto& v : acc) v = _mm256_setzero_ps();
      for (int64_t group = 0; group < geo.groups; ++group) {
        const int64_t start = checked_group_start(w, geo, band, group);
        if (start < 0) return band * geo.groups + group;
        const int64_t next = w.offsets[band * geo.groups + group + 1];
        const T* p = group_values(w, start, next, buf);
        prefetch_ahead(words + 8 * group, 256);  // bitmap words 4 groups ahead
        for (int64_t t = group_tile_begin(group); t < group_tile_end(geo, group); ++t) {
          const uint64_t word = words[t];
          prefetch_ahead(p, kPrefetchBytes);
          tile_fma<D>(p, word, _mm256_loadu_ps(x + 8 * t), acc);
          p += _mm_popcnt_u64(word);
        }
      }
      ex.finish(acc, ts + i * ex.rank8, static_cast<T*>(a.y) + i * a.y_row_stride + 8 * band, nrows);
    }
  }
  return -1;
}

// Larger m: each group is decoded once into an L1-resident dense 8x64 block, then every x row of
// the chunk runs 8 accumulators over it; accumulators persist across groups in `accs`.
template <class D>
int64_t gemm_blocked(const GemmArgs& a, const GroupGeometry& geo, const float* xs, const float* ts,
                     int64_t mc, int64_t i0, int64_t band_begin, int64_t band_end) {
  using T = typename D::T;
  const SparseWeightView& w = a.weight;
  const int64_t width = geo.tiles * 8;
  BandExtras<D> ex(a);
  alignas(32) T buf[kGroupValues + kPad];
  alignas(32) float dense[8 * 64];
  std::vector<float> accs(static_cast<size_t>(mc * 64));
  for (int64_t band = band_begin; band < band_end; ++band) {
    const int64_t nrows = std::min<int64_t>(8, w.rows - 8 * band);
    const uint64_t* words = w.bitmap + band * geo.tiles;
    std::fill(accs.begin(), accs.end(), 0.0f);
    for (int64_t group = 0; group < geo.groups; ++group) {
      const int64_t start = checked_group_start(w, geo, band, group);
      if (start < 0) return band * geo.groups + group;
      const int64_t next = w.offsets[band * geo.groups + group + 1];
      const int64_t t0 = group_tile_begin(group), nt = group_tile_end(geo, group) - t0;
      decode_group<D>(group_values(w, start, next, buf), words + t0, nt, dense);
      for (int64_t i = 0; i < mc; ++i) {
        const float* x = xs + i * width + 8 * t0;
        __m256 acc[8];
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_loadu_ps(&accs[i * 64 + 8 * r]);
        for (int64_t t = 0; t < nt; ++t) {
          const __m256 xv = _mm256_loadu_ps(x + 8 * t);
          for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(_mm256_load_ps(dense + r * 64 + 8 * t), xv, acc[r]);
        }
        for (int r = 0; r < 8; ++r) _mm256_storeu_ps(&accs[i * 64 + 8 * r], acc[r]);
      }
    }
    ex.load(a, band, nrows);
    for (int64_t i = 0; i < mc; ++i) {
      __m256 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_loadu_ps(&accs[i * 64 + 8 * r]);
      ex.finish(acc, ts + i * ex.rank8,
                static_cast<T*>(a.y) + (i0 + i) * a.y_row_stride + 8 * band, nrows);
    }
  }
  return -1;
}

template <class D>
int64_t gemm_bands(const GemmArgs& a, int64_t band_begin, int64_t band_end) {
  using T = typename D::T;
  if (a.m <= 0 || band_begin >= band_end) return -1;
  const GroupGeometry geo = geometry_of(a.weight);
  const int64_t width = geo.tiles * 8;
  const bool adapter = a.rank > 0 && a.t != nullptr && a.adapter_b != nullptr;
  const int64_t rank8 = adapter ? (a.rank + 7) / 8 * 8 : 0;
  const int64_t chunk = a.m <= kDirectMaxM ? a.m : std::min(a.m, kChunk);
  std::vector<float> xs(static_cast<size_t>(chunk * width)), ts(static_cast<size_t>(chunk * rank8));
  for (int64_t i0 = 0; i0 < a.m; i0 += chunk) {
    const int64_t mc = std::min(chunk, a.m - i0);
    rows_to_f32<D>(static_cast<const T*>(a.x) + i0 * a.x_row_stride, a.x_row_stride, mc, a.weight.cols,
                   xs.data(), width);
    if (adapter) rows_to_f32<F32>(a.t + i0 * a.rank, a.rank, mc, a.rank, ts.data(), rank8);
    const int64_t bad = a.m <= kDirectMaxM
                            ? gemm_direct<D>(a, geo, xs.data(), ts.data(), band_begin, band_end)
                            : gemm_blocked<D>(a, geo, xs.data(), ts.data(), mc, i0, band_begin, band_end);
    if (bad >= 0) return bad;
  }
  return -1;
}

// dx[:, group columns] += dy[:, band rows] · W[band, group]: each (band, group) block is decoded
// once per chunk of dy rows; every dy row broadcasts its 8 band values over the block's columns.
template <class D>
int64_t gemm_transposed_groups(const GemmTransposedArgs& a, int64_t group_begin, int64_t group_end) {
  using T = typename D::T;
  const SparseWeightView& w = a.weight;
  if (a.m <= 0 || group_begin >= group_end) return -1;
  const GroupGeometry geo = geometry_of(w);
  const int64_t chunk = std::min(a.m, kChunk);
  alignas(32) T buf[kGroupValues + kPad];
  alignas(32) float dense[8 * 64];
  std::vector<float> acc(static_cast<size_t>(chunk * 64)), dyb(static_cast<size_t>(chunk * 8));
  for (int64_t group = group_begin; group < group_end; ++group) {
    const int64_t t0 = group_tile_begin(group), nt = group_tile_end(geo, group) - t0;
    const int64_t ncols = std::min<int64_t>(64, w.cols - 64 * group);
    for (int64_t i0 = 0; i0 < a.m; i0 += chunk) {
      const int64_t mc = std::min(chunk, a.m - i0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t band = 0; band < geo.bands; ++band) {
        const int64_t start = checked_group_start(w, geo, band, group);
        if (start < 0) return band * geo.groups + group;
        const int64_t next = w.offsets[band * geo.groups + group + 1];
        decode_group<D>(group_values(w, start, next, buf), w.bitmap + band * geo.tiles + t0, nt, dense);
        rows_to_f32<D>(static_cast<const T*>(a.dy) + i0 * a.dy_row_stride + 8 * band, a.dy_row_stride, mc,
                       std::min<int64_t>(8, w.rows - 8 * band), dyb.data(), 8);
        for (int64_t i = 0; i < mc; ++i) {
          __m256 d[8];
          for (int r = 0; r < 8; ++r) d[r] = _mm256_broadcast_ss(&dyb[i * 8 + r]);
          for (int64_t t = 0; t < nt; ++t) {
            float* out = &acc[i * 64 + 8 * t];
            __m256 s = _mm256_loadu_ps(out);
            for (int r = 0; r < 8; ++r) s = _mm256_fmadd_ps(d[r], _mm256_load_ps(dense + r * 64 + 8 * t), s);
            _mm256_storeu_ps(out, s);
          }
        }
      }
      for (int64_t i = 0; i < mc; ++i) {
        T* dx = static_cast<T*>(a.dx) + (i0 + i) * a.dx_row_stride + 64 * group;
        for (int64_t c = 0; c < ncols; c += 8) {
          store_partial<D>(dx + c, _mm256_loadu_ps(&acc[i * 64 + c]), std::min<int64_t>(8, ncols - c));
        }
      }
    }
  }
  return -1;
}

int64_t gemm_avx2(const GemmArgs& a, int64_t band_begin, int64_t band_end) {
  switch (a.weight.dtype) {
    case DType::kFloat32: return gemm_bands<F32>(a, band_begin, band_end);
    case DType::kBFloat16: return gemm_bands<Bf16>(a, band_begin, band_end);
    case DType::kFloat16: return gemm_bands<Fp16>(a, band_begin, band_end);
  }
  return -1;
}

int64_t gemm_transposed_avx2(const GemmTransposedArgs& a, int64_t group_begin, int64_t group_end) {
  switch (a.weight.dtype) {
    case DType::kFloat32: return gemm_transposed_groups<F32>(a, group_begin, group_end);
    case DType::kBFloat16: return gemm_transposed_groups<Bf16>(a, group_begin, group_end);
    case DType::kFloat16: return gemm_transposed_groups<Fp16>(a, group_begin, group_end);
  }
  return -1;
}

// ---- decode for the large-M paths ---------------------------------------------------------
// Why: the decode-a-chunk + dense GEMM path must decode near memory speed; the scalar bit loop is
// ~7x slower. One pshufb (16-bit) or vpermps (fp32) per tile row, the same tables as the GEMM.

// Why: the last rows of the values array may hold fewer than 8 values: bounce them through a
// zeroed buffer so no load reads past values_count.
template <class D>
inline const typename D::T* row_source(const typename D::T* values, int64_t v, int64_t count,
                                       typename D::T (&bounce)[8]) {
  if (v + 8 <= count) return values + v;
  std::memset(bounce, 0, sizeof(bounce));
  if (count > v) std::memcpy(bounce, values + v, static_cast<size_t>(count - v) * sizeof(bounce[0]));
  return bounce;
}

// Why: 16-bit values keep their bits (no conversion): the fp16 table places packed halves.
inline void decode_row16(const uint16_t* src, unsigned mask, uint16_t* dst, int width) {
  const __m128i ctl = _mm_load_si128(reinterpret_cast<const __m128i*>(g_tables.fp16[mask]));
  const __m128i row = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)), ctl);
  if (width == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), row);
  } else {
    alignas(16) uint16_t tmp[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(tmp), row);
    std::memcpy(dst, tmp, static_cast<size_t>(width) * sizeof(uint16_t));
  }
}

inline void decode_row32(const float* src, unsigned mask, float* dst, int width) {
  const __m256 row = F32::row(src, mask);
  if (width == 8) {
    _mm256_storeu_ps(dst, row);
  } else {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, row);
    std::memcpy(dst, tmp, static_cast<size_t>(width) * sizeof(float));
  }
}

template <class D>
int64_t decode_bands_t(const SparseWeightView& w, void* dense, int64_t band_begin, int64_t band_end) {
  using T = typename D::T;
  const T* values = static_cast<const T*>(w.values);
  T* out = static_cast<T*>(dense);
  T bounce[8];
  return for_each_checked_tile(w, band_begin, band_end, [&](uint64_t word, int64_t v, int64_t first, int rows,
                                                           int width) {
    for (int r = 0; r < rows; ++r) {  // rows past `rows` are padding: their bits are zero
      const unsigned mask = static_cast<unsigned>(word >> (8 * r)) & 0xffu;
      const T* src = row_source<D>(values, v, w.values_count, bounce);
      if constexpr (sizeof(T) == 4) {
        decode_row32(src, mask, out + first + r * w.cols, width);
      } else {
        decode_row16(src, mask, out + first + r * w.cols, width);
      }
      v += __builtin_popcount(mask);
    }
  });
}

int64_t decode_bands_avx2(const SparseWeightView& w, void* dense, int64_t band_begin, int64_t band_end) {
  // bf16 and fp16 decode identically (raw 16-bit moves): one instantiation serves both.
  if (w.dtype == DType::kFloat32) return decode_bands_t<F32>(w, dense, band_begin, band_end);
  return decode_bands_t<Fp16>(w, dense, band_begin, band_end);
}

const KernelTable kAvx2Table{"avx2", gemm_avx2, gemm_transposed_avx2, decode_bands_avx2};

}  // namespace

const KernelTable* avx2_kernel_table() { return &kAvx2Table; }

}  // namespace salr::kernels

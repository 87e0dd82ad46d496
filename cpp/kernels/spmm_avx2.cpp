// AVX2 + FMA + F16C BM8x8 kernels (design.md §1). Each tile row's 8-bit mask picks a table entry
// that expands the row's packed values into 8 fp32 lanes (zeros where the bitmap is clear); those
// FMA against 8 columns of x, converted to fp32 once per call. Only this file gets the ISA flags.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "avx2_epilogue.h"
#include "avx2_rows.h"
#include "group_check.h"
#include "kernels.h"
#include "numeric.h"

namespace salr::kernels {
namespace {

constexpr int64_t kGroupValues = 512;  // most values one 64-column group of one band can hold
constexpr int64_t kChunk = 64;         // x rows per pass of the blocked path: bounds scratch memory
constexpr int64_t kDirectMaxM = 1;    // up to this m, decode straight into registers per x row
constexpr int kPrefetchBytes = 2048;  // values prefetch distance: covers page crossings of the stream

// The values of a checked group, in place unless a row load's 8-element reads (up to kPad before
// the group's first value: the bf16 row pairs; kPad past its last) would leave the array; then
// from a zero-padded copy in `buf` (kGroupBuffer elements).
constexpr int64_t kGroupBuffer = kPad + kGroupValues + kPad;
template <class T>
inline const T* group_values(const SparseWeightView& w, int64_t start, int64_t next, T* buf) {
  const T* v = static_cast<const T*>(w.values);
  if (start >= kPad && next + kPad <= w.values_count) return v + start;
  std::memset(buf, 0, kGroupBuffer * sizeof(T));
  if (next > start) std::memcpy(buf + kPad, v + start, static_cast<size_t>(next - start) * sizeof(T));  // values may be null
  return buf + kPad;
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

// Why (bf16): two tile rows per expansion, three loads per row pair instead of four. One
// 32-byte load at the boundary of rows r and r+1 holds row r's values at the end of its low half
// and row r+1's at the start of its high half; one in-lane vpshufb (tables tail16 | fp16) places
// both as 16-bit words, and a bf16 being the high half of an fp32, the even columns are the words
// shifted left by 16 and the odd columns the words with their low halves cleared. With x split
// into its even and odd columns, acc[2q] / acc[2q+1] collect the even / odd column products of
// rows 2q (low 128 bits) and 2q+1 (high 128 bits); pairs_to_rows turns them into row sums.
__attribute__((always_inline)) inline void tile_fma_pairs(const uint16_t* p, uint64_t word, __m256 x_even,
                                                          __m256 x_odd, __m256* acc) {
  const uint64_t offs = row_offsets(word);
  const __m256i high_halves = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    const int64_t boundary = static_cast<int64_t>(rotate_right(offs, 16 * q + 8) & 0xffu);  // row 2q+1's start
    const unsigned low_entry = static_cast<unsigned>(rotate_right(word, (16 * q - 4) & 63)) & 0xff0u;
    const unsigned high_entry = static_cast<unsigned>(rotate_right(word, 16 * q + 4)) & 0xff0u;
    const __m256i window = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + boundary - kPad));
    const __m128i ctl_low = _mm_load_si128(reinterpret_cast<const __m128i*>(&g_tables.tail16[0][0] + low_entry));
    const __m128i ctl_high = _mm_load_si128(reinterpret_cast<const __m128i*>(&g_tables.fp16[0][0] + high_entry));
    const __m256i words =
        _mm256_shuffle_epi8(window, _mm256_inserti128_si256(_mm256_castsi128_si256(ctl_low), ctl_high, 1));
    acc[2 * q] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(words, 16)), x_even, acc[2 * q]);
    acc[2 * q + 1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(words, high_halves)), x_odd, acc[2 * q + 1]);
  }
}

// The per-dtype tile step of the direct path and the x it reads: bf16 by row pairs against x's
// own bf16 bits (8 per tile, split into even and odd columns by the same shift and mask as the
// weights: half the cache footprint of fp32 x), fp16 and fp32 row by row against fp32 x.
template <class D>
using DirectX = std::conditional_t<std::is_same_v<D, Bf16>, uint16_t, float>;

template <class D>
__attribute__((always_inline)) inline void direct_tile(const typename D::T* p, uint64_t word, const DirectX<D>* xt,
                                                       __m256* acc) {
  if constexpr (std::is_same_v<D, Bf16>) {
    const __m256i xw = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xt)));
    const __m256i high_halves = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    tile_fma_pairs(p, word, _mm256_castsi256_ps(_mm256_slli_epi32(xw, 16)),
                   _mm256_castsi256_ps(_mm256_and_si256(xw, high_halves)), acc);
  } else {
    tile_fma_direct<D>(p, word, _mm256_loadu_ps(xt), acc);
  }
}

// Pair layout -> row layout (lane sums = row sums, what BandExtras::finish reduces): row 2q is the
// low half of acc[2q] + acc[2q+1], row 2q+1 the high half.
inline void pairs_to_rows(__m256* acc) {
  for (int q = 0; q < 4; ++q) {
    const __m256 s = _mm256_add_ps(acc[2 * q], acc[2 * q + 1]);
    acc[2 * q] = _mm256_blend_ps(s, _mm256_setzero_ps(), 0xf0);
    acc[2 * q + 1] = _mm256_blend_ps(s, _mm256_setzero_ps(), 0x0f);
  }
}

// Byte i = popcount of byte i of v, by two nibble-table shuffles.
inline __m256i byte_popcounts(__m256i v) {
  const __m256i nibble = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,  //
                                          0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  return _mm256_add_epi8(_mm256_shuffle_epi8(nibble, _mm256_and_si256(v, low)),
                         _mm256_shuffle_epi8(nibble, _mm256_and_si256(_mm256_srli_epi16(v, 4), low)));
}

// Set bits of a full group's eight words, in SIMD: scalar popcounts here would be shared by the
// compiler with the tile loop's pointer steps and spilled (the loop is short of registers).
inline int64_t group_popcount(const uint64_t* gw) {
  const __m256i bytes = _mm256_add_epi8(byte_popcounts(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gw))),
                                        byte_popcounts(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(gw + 4))));
  const __m256i sums = _mm256_sad_epu8(bytes, _mm256_setzero_si256());  // bytes <= 16: no overflow
  __m128i s = _mm_add_epi64(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
  s = _mm_add_epi64(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si64(s);
}

// Why: the hot loop over a band's interior full groups (8 tiles, no padding possible, values far
// enough from both array ends for the 8-element row loads), free of calls so that the accumulators
// stay in registers. Stops at group_end or at the first group it must not read (bad index, or too
// close to an array end); the careful loop of gemm_direct takes over from there.
template <class D>
__attribute__((noinline)) int64_t direct_full_groups(const SparseWeightView& w, const GroupGeometry& geo,
                                                     int64_t band, int64_t group_end, const DirectX<D>* x,
                                                     const char*& pf_io, __m256* acc_io) {
  using T = typename D::T;
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = acc_io[r];
  const T* values = static_cast<const T*>(w.values);
  const uint64_t* words = w.bitmap + band * geo.tiles;
  const int32_t* offsets = w.offsets + band * geo.groups;
  const char* pf = pf_io;
  int64_t group = 0;
  for (; group < group_end; ++group) {
    const uint64_t* gw = words + 8 * group;
    const int64_t start = offsets[group], next = offsets[group + 1];
    if (start < kPad || start + group_popcount(gw) != next || next + kPad > w.values_count) break;
    const char* pf_end = reinterpret_cast<const char*>(values + next) + kPrefetchBytes;
    for (; pf < pf_end; pf += 64) prefetch_ahead(pf, 0);
    prefetch_ahead(gw, 256);  // bitmap words 4 groups ahead
    const T* p = values + start;
    const DirectX<D>* xg = x + 64 * group;
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      direct_tile<D>(p, gw[t], xg + 8 * t, acc);
      p += _mm_popcnt_u64(gw[t]);
    }
  }
  pf_io = pf;
  for (int r = 0; r < 8; ++r) acc_io[r] = acc[r];
  return group;
}

// Small m: one x row at a time, tiles expanded straight into FMAs, 8 row accumulators in
// registers. Values prefetch runs one cache line at a time kPrefetchBytes ahead of the walk (one
// sequential stream per thread: bands are contiguous), the bitmap a few groups ahead.
// xs: x staged by gemm_bands as DirectX<D> rows of `width` (bf16: stage_bf16_bits).
template <class D>
int64_t gemm_direct(const GemmArgs& a, const GroupGeometry& geo, const void* xs, const float* ts,
                    int64_t band_begin, int64_t band_end) {
  using T = typename D::T;
  const SparseWeightView& w = a.weight;
  const int64_t width = geo.tiles * 8;
  BandExtras<D> ex(a.rank, a.t, a.adapter_b, a.bias, a.adapter_b_scales);
  alignas(32) T buf[kGroupBuffer];
  const char* values = static_cast<const char*>(w.values);
  for (int64_t band = band_begin; band < band_end; ++band) {
    const int64_t nrows = std::min<int64_t>(8, w.rows - 8 * band);
    ex.load(band, nrows);
    const uint64_t* words = w.bitmap + band * geo.tiles;
    const int64_t full_end = band + 1 < geo.bands ? geo.groups - 1 : 0;  // groups with 8 unpadded tiles
    for (int64_t i = 0; i < a.m; ++i) {
      const DirectX<D>* x = static_cast<const DirectX<D>*>(xs) + i * width;
      __m256 acc[8];
      for (auto& v : acc) v = _mm256_setzero_ps();
      const char* pf = values + int64_t{w.offsets[band * geo.groups]} * static_cast<int64_t>(sizeof(T));
      for (int64_t group = direct_full_groups<D>(w, geo, band, full_end, x, pf, acc); group < geo.groups; ++group) {
        const int64_t start = checked_group_start(w, geo, band, group);
        if (start < 0) return band * geo.groups + group;
        const T* p = group_values(w, start, w.offsets[band * geo.groups + group + 1], buf);
        for (int64_t t = group_tile_begin(group); t < group_tile_end(geo, group); ++t) {
          direct_tile<D>(p, words[t], x + 8 * t, acc);
          p += _mm_popcnt_u64(words[t]);
        }
      }
      if constexpr (std::is_same_v<D, Bf16>) pairs_to_rows(acc);
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
  BandExtras<D> ex(a.rank, a.t, a.adapter_b, a.bias, a.adapter_b_scales);
  alignas(32) T buf[kGroupBuffer];
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
    ex.load(band, nrows);
    for (int64_t i = 0; i < mc; ++i) {
      __m256 acc[8];
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_loadu_ps(&accs[i * 64 + 8 * r]);
      ex.finish(acc, ts + i * ex.rank8,
                static_cast<T*>(a.y) + (i0 + i) * a.y_row_stride + 8 * band, nrows);
    }
  }
  return -1;
}

// bf16 x rows [i0, i0 + mc) as the direct path reads them: their own bits (the row-pair FMAs split
// them), rows of `width` zero padded past the weight's columns.
inline void stage_bf16_bits(const GemmArgs& a, int64_t i0, int64_t mc, int64_t width, float* xs) {
  const uint16_t* x = static_cast<const uint16_t*>(a.x) + i0 * a.x_row_stride;
  auto* bits = reinterpret_cast<uint16_t*>(xs);
  for (int64_t i = 0; i < mc; ++i) {
    std::memcpy(bits + i * width, x + i * a.x_row_stride, static_cast<size_t>(a.weight.cols) * sizeof(uint16_t));
    std::memset(bits + i * width + a.weight.cols, 0, static_cast<size_t>(width - a.weight.cols) * sizeof(uint16_t));
  }
}

template <class D>
int64_t gemm_bands(const GemmArgs& a, int64_t band_begin, int64_t band_end) {
  using T = typename D::T;
  if (a.m <= 0 || band_begin >= band_end) return -1;
  const GroupGeometry geo = geometry_of(a.weight);
  const int64_t width = geo.tiles * 8;
  const bool adapter = a.rank > 0 && a.t != nullptr && a.adapter_b != nullptr;
  const int64_t rank8 = adapter ? (a.rank + 7) / 8 * 8 : 0;
  const bool direct = a.m <= kDirectMaxM;
  const int64_t chunk = direct ? a.m : std::min(a.m, kChunk);
  float* xs = float_scratch(static_cast<size_t>(chunk * (width + rank8)));  // x rows, then t rows
  float* ts = xs + chunk * width;
  for (int64_t i0 = 0; i0 < a.m; i0 += chunk) {
    const int64_t mc = std::min(chunk, a.m - i0);
    if (direct && std::is_same_v<D, Bf16>) {
      stage_bf16_bits(a, i0, mc, width, xs);
    } else {
      rows_to_f32<D>(static_cast<const T*>(a.x) + i0 * a.x_row_stride, a.x_row_stride, mc, a.weight.cols, xs, width);
    }
    if (adapter) rows_to_f32<F32>(a.t + i0 * a.rank, a.rank, mc, a.rank, ts, rank8);
    const int64_t bad = direct ? gemm_direct<D>(a, geo, xs, ts, band_begin, band_end)
                               : gemm_blocked<D>(a, geo, xs, ts, mc, i0, band_begin, band_end);
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
  alignas(32) T buf[kGroupBuffer];
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

}  // namespace

// t[i, r] = x[i, :] · A[r, :] in fp32 (8-wide FMAs, 4 chains) for A's rows [rank_begin, row_end()):
// the adapter's rank-R intermediate for the kernel path; the x row is converted once. A streams
// from DRAM in decoding (one layer's adapter is not reused before the next token), so it is
// prefetched kPrefetchBytes ahead: rows are contiguous, the stream runs on into the next row.
// A's rows are of A::T: the activations' type, or int8 (I8) for an int8 adapter.
template <class D, class A = D>
void adapter_project_t(const AdapterProjectArgs& a) {
  using T = typename D::T;
  using AT = typename A::T;
  constexpr int64_t kStepBytes = 32 * sizeof(AT);  // A bytes per step of the k loop
  const int64_t k8 = (a.cols + 7) / 8 * 8;
  thread_local std::vector<float> xs;
  if (static_cast<int64_t>(xs.size()) < k8) xs.resize(static_cast<size_t>(k8));
  for (int64_t i = 0; i < a.m; ++i) {
    rows_to_f32<D>(static_cast<const T*>(a.x) + i * a.x_row_stride, a.x_row_stride, 1, a.cols, xs.data(), k8);
    for (int64_t r = a.rank_begin; r < a.row_end(); ++r) {
      const AT* row = static_cast<const AT*>(a.a) + r * a.cols;
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t k = 0;
      for (; k + 32 <= a.cols; k += 32) {
        for (int64_t b = 0; b < kStepBytes; b += 64) prefetch_ahead(row + k, kPrefetchBytes + b);
        for (int c = 0; c < 4; ++c) {
          acc[c] = _mm256_fmadd_ps(A::load8(row + k + 8 * c), _mm256_loadu_ps(xs.data() + k + 8 * c), acc[c]);
        }
      }
      for (; k < a.cols; k += 8) {
        const __m256 w = load_partial<A>(row + k, std::min<int64_t>(8, a.cols - k));
        acc[0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xs.data() + k), acc[0]);
      }
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
      const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
      a.t[i * a.rank + r] = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
    }
  }
}

void adapter_project_avx2(const AdapterProjectArgs& a) {
  switch (a.dtype) {
    case DType::kFloat32: return a.a_int8 ? adapter_project_t<F32, I8>(a) : adapter_project_t<F32>(a);
    case DType::kBFloat16: return a.a_int8 ? adapter_project_t<Bf16, I8>(a) : adapter_project_t<Bf16>(a);
    case DType::kFloat16: return a.a_int8 ? adapter_project_t<Fp16, I8>(a) : adapter_project_t<Fp16>(a);
  }
}

namespace {
const KernelTable kAvx2Table{"avx2", gemm_avx2, gemm_transposed_avx2, decode_bands_avx2, adapter_project_avx2};
}  // namespace

const KernelTable* avx2_kernel_table() { return &kAvx2Table; }

}  // namespace salr::kernels

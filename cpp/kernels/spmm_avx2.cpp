// AVX2 + FMA + F16C BM8x8 kernels (design.md §1). Each tile row's 8-bit mask picks a table entry
// that expands the row's packed values into 8 fp32 lanes (zeros where the bitmap is clear); those
// FMA against 8 columns of x, converted to fp32 once per call. Only this file gets the ISA flags.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

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

// Offset of tile row r's first value inside the tile: popcount of the bits of rows < r.
inline int64_t row_offset(uint64_t word, int r) {
  return r == 0 ? 0 : static_cast<int64_t>(_mm_popcnt_u64(_bzhi_u64(word, 8 * r)));
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

// Offsets of the eight tile rows' first values inside the tile, byte r = popcount of rows < r:
// byte popcounts (SWAR) and an exclusive prefix by one multiplication, no serial popcount chain.
inline uint64_t row_offsets(uint64_t word) {
  uint64_t c = word - ((word >> 1) & 0x5555555555555555ull);
  c = (c & 0x3333333333333333ull) + ((c >> 2) & 0x3333333333333333ull);
  c = (c + (c >> 4)) & 0x0f0f0f0f0f0f0f0full;  // byte r: popcount of row r (<= 8)
  return c * 0x0101010101010100ull;            // byte r: sum of bytes < r (<= 56: no carry)
}

// acc[r] += row r of one tile * the tile's 8 x columns. Each row costs two loads (its values and
// its table entry), the expansion and one FMA; its offset and table entry are cut out of `offs` and
// `word` in registers. Why registers: the row loop is bound by loads (about two per cycle on the
// Zen 5 measured, bench/RESULTS.md), so index bytes read from memory cost more than shifts.
// Rotation by a constant, which BMI2 does in one non-destructive rorx (a shift needs a copy first).
inline uint64_t rotate_right(uint64_t v, int n) { return n == 0 ? v : (v >> n) | (v << (64 - n)); }

template <class D>
__attribute__((always_inline)) inline void tile_fma_direct(const typename D::T* p, uint64_t word, __m256 xv,
                                                           __m256* acc) {
  const uint64_t offs = row_offsets(word);
  constexpr int kShift = D::kEntryShift;
  constexpr unsigned kEntryMask = 0xffu << kShift;
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r) {
    const unsigned off = static_cast<unsigned>(rotate_right(offs, 8 * r)) & 0xffu;
    // Bits of rows > r rotated to the bottom fall outside kEntryMask (kShift <= 5 < 8).
    const unsigned entry = static_cast<unsigned>(rotate_right(word, (8 * r - kShift) & 63)) & kEntryMask;
    acc[r] = _mm256_fmadd_ps(D::row_at(p + off, entry), xv, acc[r]);
  }
}

// Why: the hot loop over a band's interior full groups (8 tiles, no padding possible, values far
// enough from the array end for the 8-element row loads), free of calls so that the accumulators
// stay in registers. Stops at group_end or at the first group it must not read (bad index, or too
// close to the array end); the careful loop of gemm_direct takes over from there.
template <class D>
__attribute__((noinline)) int64_t direct_full_groups(const SparseWeightView& w, const GroupGeometry& geo, int64_t band, int64_t group_end,
                           const float* x, const char*& pf, __m256* acc_io) {
  using T = typename D::T;
  __m256 acc[8];
  for (int r = 0; r < 8; ++r) acc[r] = acc_io[r];
  const T* values = static_cast<const T*>(w.values);
  const uint64_t* words = w.bitmap + band * geo.tiles;
  const int32_t* offsets = w.offsets + band * geo.groups;
  int64_t group = 0;
  for (; group < group_end; ++group) {
    const uint64_t* gw = words + 8 * group;
    const int64_t start = offsets[group], next = offsets[group + 1];
    int64_t count = 0;
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) count += _mm_popcnt_u64(gw[t]);
    if (start < 0 || start + count != next || next + kPad > w.values_count) break;
    const char* pf_end = reinterpret_cast<const char*>(values + next) + kPrefetchBytes;
    for (; pf < pf_end; pf += 64) prefetch_ahead(pf, 0);
    prefetch_ahead(gw, 256);  // bitmap words 4 groups ahead
    const T* p = values + start;
    const float* xg = x + 64 * group;
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      tile_fma_direct<D>(p, gw[t], _mm256_loadu_ps(xg + 8 * t), acc);
      p += _mm_popcnt_u64(gw[t]);
    }
  }
  for (int r = 0; r < 8; ++r) acc_io[r] = acc[r];
  return group;
}

// Small m: one x row at a time, tiles expanded straight into FMAs, 8 row accumulators in
// registers. Values prefetch runs one cache line at a time kPrefetchBytes ahead of the walk (one
// sequential stream per thread: bands are contiguous), the bitmap a few groups ahead.
template <class D>
int64_t gemm_direct(const GemmArgs& a, const GroupGeometry& geo, const float* xs, const float* ts,
                    int64_t band_begin, int64_t band_end) {
  using T = typename D::T;
  const SparseWeightView& w = a.weight;
  const int64_t width = geo.tiles * 8;
  BandExtras<D> ex(a);
  alignas(32) T buf[kGroupValues + kPad];
  const char* values = static_cast<const char*>(w.values);
  for (int64_t band = band_begin; band < band_end; ++band) {
    const int64_t nrows = std::min<int64_t>(8, w.rows - 8 * band);
    ex.load(a, band, nrows);
    const uint64_t* words = w.bitmap + band * geo.tiles;
    const int64_t full_end = band + 1 < geo.bands ? geo.groups - 1 : 0;  // groups with 8 unpadded tiles
    for (int64_t i = 0; i < a.m; ++i) {
      const float* x = xs + i * width;
      __m256 acc[8];
      for (auto& v : acc) v = _mm256_setzero_ps();
      const char* pf = values + int64_t{w.offsets[band * geo.groups]} * static_cast<int64_t>(sizeof(T));
      for (int64_t group = direct_full_groups<D>(w, geo, band, full_end, x, pf, acc); group < geo.groups; ++group) {
        const int64_t start = checked_group_start(w, geo, band, group);
        if (start < 0) return band * geo.groups + group;
        const T* p = group_values(w, start, w.offsets[band * geo.groups + group + 1], buf);
        for (int64_t t = group_tile_begin(group); t < group_tile_end(geo, group); ++t) {
          tile_fma_direct<D>(p, words[t], _mm256_loadu_ps(x + 8 * t), acc);
          p += _mm_popcnt_u64(words[t]);
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

}  // namespace

// t[i, :] = x[i, :] · Aᵀ in fp32 (8-wide FMAs, 4 chains): the adapter's rank-R intermediate for the
// kernel path, once per call on the calling thread; the x row is converted once.
template <class D>
void adapter_project_t(const AdapterProjectArgs& a) {
  using T = typename D::T;
  const int64_t k8 = (a.cols + 7) / 8 * 8;
  thread_local std::vector<float> xs;
  if (static_cast<int64_t>(xs.size()) < k8) xs.resize(static_cast<size_t>(k8));
  for (int64_t i = 0; i < a.m; ++i) {
    rows_to_f32<D>(static_cast<const T*>(a.x) + i * a.x_row_stride, a.x_row_stride, 1, a.cols, xs.data(), k8);
    for (int64_t r = 0; r < a.rank; ++r) {
      const T* row = static_cast<const T*>(a.a) + r * a.cols;
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t k = 0;
      for (; k + 32 <= a.cols; k += 32) {
        for (int c = 0; c < 4; ++c) {
          acc[c] = _mm256_fmadd_ps(D::load8(row + k + 8 * c), _mm256_loadu_ps(xs.data() + k + 8 * c), acc[c]);
        }
      }
      for (; k < a.cols; k += 8) {
        const __m256 w = load_partial<D>(row + k, std::min<int64_t>(8, a.cols - k));
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
    case DType::kFloat32: return adapter_project_t<F32>(a);
    case DType::kBFloat16: return adapter_project_t<Bf16>(a);
    case DType::kFloat16: return adapter_project_t<Fp16>(a);
  }
}

namespace {
const KernelTable kAvx2Table{"avx2", gemm_avx2, gemm_transposed_avx2, decode_bands_avx2, adapter_project_avx2};
}  // namespace

const KernelTable* avx2_kernel_table() { return &kAvx2Table; }

}  // namespace salr::kernels

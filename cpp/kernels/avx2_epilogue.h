// The band epilogue shared by the AVX2 float and int8 kernels (spmm_avx2.cpp, int8_avx2.cpp; both
// built with -mavx2 -mfma -mf16c): fp32 staging of rows, the 8-row reduction, and the fused
// adapter (t · Bᵀ over the band's 8 adapter rows) + bias + one rounding into y.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "avx2_rows.h"

namespace salr::kernels {
namespace {

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

// Per-band epilogue: the band's adapter rows (read in their own dtype, widened on the fly: staging
// them as fp32 per band cost more than the FMAs) and its bias. t rows are read rank8 wide: callers
// stage t zero padded (rows_to_f32<F32>(t, rank, m, rank, ts, rank8)). An int8 adapter (b_scales
// set) has int8 rows whose sums are scaled per row after the reduction.
template <class D>
struct BandExtras {
  using T = typename D::T;
  const void* adapter_b;   // [rows, rank] of T (int8 with b_scales) or nullptr
  const float* b_scales;   // [rows] or nullptr
  const T* bias_row;       // [rows] or nullptr
  int64_t rank = 0;
  int64_t rank8 = 0;
  bool adapter = false;
  const void* band_b = nullptr;  // the current band's first adapter row
  int64_t band_rows = 0;
  __m256 bias = _mm256_setzero_ps();
  __m256 band_scales = _mm256_setzero_ps();

  BandExtras(int64_t rank_, const void* t, const void* adapter_b_, const void* bias_, const float* b_scales_)
      : adapter_b(adapter_b_), b_scales(b_scales_), bias_row(static_cast<const T*>(bias_)), rank(rank_),
        adapter(rank_ > 0 && t != nullptr && adapter_b_ != nullptr) {
    rank8 = adapter ? (rank + 7) / 8 * 8 : 0;
  }
  // The band's adapter rows, bias and scales; the adapter rows kAdapterAhead bands on are
  // prefetched: read once per band after its values, each band's would otherwise be a DRAM miss
  // when decoding (no hardware prefetcher follows a stream touched once per band).
  static constexpr int64_t kAdapterAhead = 2;
  void load(int64_t band, int64_t nrows) {
    if (adapter) {
      const int64_t row_bytes = rank * (b_scales != nullptr ? 1 : static_cast<int64_t>(sizeof(T)));
      const int64_t ahead = 8 * (band + kAdapterAhead) * row_bytes;
      for (int64_t b = 0; b < 8 * row_bytes; b += 64) prefetch_ahead(adapter_b, ahead + b);
    }
    if (adapter && b_scales != nullptr) {
      band_b = static_cast<const int8_t*>(adapter_b) + 8 * band * rank;
      band_scales = load_partial<F32>(b_scales + 8 * band, nrows);
    } else if (adapter) {
      band_b = static_cast<const T*>(adapter_b) + 8 * band * rank;
    }
    band_rows = nrows;
    bias = bias_row ? load_partial<D>(bias_row + 8 * band, nrows) : _mm256_setzero_ps();
  }
  // acc[r] += t_row · adapter row r, the rows of L::T.
  template <class L>
  void add_rows(__m256* acc, const float* t_row) const {
    const auto* rows = static_cast<const typename L::T*>(band_b);
    const int64_t full = rank / 8 * 8;
    if (band_rows == 8) {
      for (int64_t s = 0; s < full; s += 8) {
        const __m256 tv = _mm256_loadu_ps(t_row + s);
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(L::load8(rows + r * rank + s), tv, acc[r]);
      }
    } else {
      for (int64_t s = 0; s < full; s += 8) {
        const __m256 tv = _mm256_loadu_ps(t_row + s);
        for (int64_t r = 0; r < band_rows; ++r) acc[r] = _mm256_fmadd_ps(L::load8(rows + r * rank + s), tv, acc[r]);
      }
    }
    if (full < rank) {  // the last rank % 8 columns: partial loads, never past a row's end
      const __m256 tv = _mm256_loadu_ps(t_row + full);
      for (int64_t r = 0; r < band_rows; ++r) {
        acc[r] = _mm256_fmadd_ps(load_partial<L>(rows + r * rank + full, rank - full), tv, acc[r]);
      }
    }
  }
  // Adds t_row · adapter rows, reduces, adds the bias and stores the band's outputs of one x row.
  void finish(__m256* acc, const float* t_row, T* y, int64_t nrows) const {
    if (adapter && b_scales != nullptr) return finish_sums(reduce8(acc), t_row, y, nrows);
    if (adapter) add_rows<D>(acc, t_row);  // before the reduction: one reduce8 for both sums
    store_partial<D>(y, _mm256_add_ps(reduce8(acc), bias), nrows);
  }
  // The same from the band's 8 row sums already reduced (and scaled, for int8 weights).
  void finish_sums(__m256 sums, const float* t_row, T* y, int64_t nrows) const {
    if (adapter) {
      __m256 acc[8];
      for (auto& v : acc) v = _mm256_setzero_ps();
      if (b_scales != nullptr) {
        add_rows<I8>(acc, t_row);
        sums = _mm256_fmadd_ps(reduce8(acc), band_scales, sums);
      } else {
        add_rows<D>(acc, t_row);
        sums = _mm256_add_ps(sums, reduce8(acc));
      }
    }
    store_partial<D>(y, _mm256_add_ps(sums, bias), nrows);
  }
};

}  // namespace
}  // namespace salr::kernels

// AVX-512 lane helpers of spmm_avx512.cpp and int8_avx512.cpp (built with its -mavx512{f,bw,vl,dq,vbmi2} -mfma -mf16c;
// include it from such a translation unit only): 8 / 16 elements of any dtype loaded and stored as
// fp32, the adapter epilogue of a band, the tile decode by expand-loads, and the transposed product's
// group step.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "group_check.h"
#include "kernels.h"
#include "numeric.h"

namespace salr::kernels {
namespace {

// ---- loads and stores of 8 / 16 elements of any dtype as fp32 ------------------------------

// Why: bias, dy and adapter rows end at arbitrary lengths; masked loads never touch past the end
// (a full 8 takes a plain load, the common case).
inline __m256 load8(const void* p, DType dt, int n) {
  const __mmask8 m = static_cast<__mmask8>((1u << n) - 1u);
  if (dt == DType::kFloat32) return n == 8 ? _mm256_loadu_ps(static_cast<const float*>(p)) : _mm256_maskz_loadu_ps(m, p);
  const __m128i h = n == 8 ? _mm_loadu_si128(static_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi16(m, p);
  if (dt == DType::kFloat16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Why: same as load8 for 16 lanes (x rows, adapter rows).
inline __m512 load16(const void* p, DType dt, int n) {
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
  if (dt == DType::kFloat32) return _mm512_maskz_loadu_ps(m, p);
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  if (dt == DType::kFloat16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Why: vcvtneps2bf16 flushes denormals; this integer form is numeric.h's float_to_bf16 exactly.
inline __m128i to_bf16_rne(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __mmask8 nan = _mm256_cmpgt_epu32_mask(_mm256_and_si256(b, _mm256_set1_epi32(0x7fffffff)),
                                               _mm256_set1_epi32(0x7f800000));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  r = _mm256_mask_mov_epi32(r, nan, _mm256_or_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(0x40)));
  return _mm256_cvtepi32_epi16(r);
}

// Why: one rounding of the fp32 result into the output dtype, n (<= 8) elements.
inline void store8(void* p, __m256 v, DType dt, int n) {
  const __mmask8 m = static_cast<__mmask8>((1u << n) - 1u);
  if (dt == DType::kFloat32) return _mm256_mask_storeu_ps(p, m, v);
  const __m128i h = dt == DType::kFloat16 ? _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
                                          : to_bf16_rne(v);
  _mm_mask_storeu_epi16(p, m, h);
}

// Why: the band's 8 adapter outputs Σ_r t[r]·B[n, r] at once. The band's B rows are one
// contiguous [8, rank] block (of `dt`, or int8 when kInt8); one transposing reduction replaces eight
// horizontal sums.
template <bool kInt8>
inline __m256 adapter_band(const float* t, const char* b_rows, int64_t rank, DType dt, int n_valid) {
  const int es = kInt8 ? 1 : element_size(dt);
  __m512 acc[8];
  for (int n = 0; n < 8; ++n) acc[n] = _mm512_setzero_ps();
  for (int64_t r = 0; r < rank; r += 16) {
    const int cnt = static_cast<int>(std::min<int64_t>(16, rank - r));
    const __mmask16 m = static_cast<__mmask16>((1u << cnt) - 1u);
    const __m512 tv = _mm512_maskz_loadu_ps(m, t + r);
    for (int n = 0; n < n_valid; ++n) {
      const char* p = b_rows + (n * rank + r) * es;
      const __m512 b = kInt8 ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)))
                             : load16(p, dt, cnt);
      acc[n] = _mm512_fmadd_ps(tv, b, acc[n]);
    }
  }
  __m256 half[8];
  for (int n = 0; n < 8; ++n) {
    half[n] = _mm256_add_ps(_mm512_castps512_ps256(acc[n]), _mm512_extractf32x8_ps(acc[n], 1));
  }
  const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(half[0], half[1]), _mm256_hadd_ps(half[2], half[3]));
  const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(half[4], half[5]), _mm256_hadd_ps(half[6], half[7]));
  // q0 lanes: rows 0-3 of the low 128 bits | rows 0-3 of the high 128 bits; likewise q1 for 4-7.
  return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

// Why: the epilogue's adapter term of band `band` for one x row (t_row), for the float and the int8
// kernels alike: B [rows, rank] of `dt`, or int8 with one scale per row when b_scales is set.
inline __m256 band_adapter_term(const float* t_row, const void* adapter_b, const float* b_scales, int64_t band,
                                int64_t rank, DType dt, int n_valid) {
  const char* b = static_cast<const char*>(adapter_b);
  if (b_scales == nullptr) return adapter_band<false>(t_row, b + 8 * band * rank * element_size(dt), rank, dt, n_valid);
  return _mm256_mul_ps(adapter_band<true>(t_row, b + 8 * band * rank, rank, dt, n_valid),
                       _mm256_maskz_loadu_ps(static_cast<__mmask8>((1u << n_valid) - 1u), b_scales + 8 * band));
}

// ---- row sums of a band's accumulators (the float and the int8 kernels) -------------------

// Why: lane chunk r of a0 (rows 0-3) / a1 (rows 4-7) holds 4 partial sums of one row -> 8 sums.
inline __m256 reduce_dot(__m512 a0, __m512 a1) {
  __m512 s = _mm512_add_ps(_mm512_shuffle_ps(a0, a1, 0x44), _mm512_shuffle_ps(a0, a1, 0xee));
  s = _mm512_add_ps(s, _mm512_shuffle_ps(s, s, 0xb1));  // lane 0: row r, lane 2: row r+4
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(idx, s));
}

// Why: folds the fma form (zmm p = rows 2p | 2p+1, 8 columns each) into reduce_dot's layout.
inline __m256 reduce_fma(const __m512* a) {
  __m512 f[4];
  for (int p = 0; p < 4; ++p) f[p] = _mm512_add_ps(a[p], _mm512_shuffle_f32x4(a[p], a[p], 0xb1));
  return reduce_dot(_mm512_shuffle_f32x4(f[0], f[1], 0x88), _mm512_shuffle_f32x4(f[2], f[3], 0x88));
}

// ---- tile decode: expand-loads read exactly popcount(mask) values -------------------------

// Why: 16-bit tiles (bf16/fp16) as two zmm, rows 0-3 and 4-7; both pointers come from `p`.
// (A plain 64-byte load + register vpexpandw measured no faster here, and needs end-of-array care.)
inline void expand16(const uint16_t* p, uint64_t w, __m512i& lo, __m512i& hi) {
  const uint32_t m0 = static_cast<uint32_t>(w);
  lo = _mm512_maskz_expandloadu_epi16(m0, p);
  hi = _mm512_maskz_expandloadu_epi16(static_cast<uint32_t>(w >> 32), p + _mm_popcnt_u32(m0));
}

// Why: the fma form wants fp32 rows 2p | 2p+1 in zmm p; 16-bit tiles widen here, once per tile.
inline void widen16(__m512i lo, __m512i hi, DType dt, __m512* out) {
  const __m256i h[4] = {_mm512_castsi512_si256(lo), _mm512_extracti64x4_epi64(lo, 1),
                        _mm512_castsi512_si256(hi), _mm512_extracti64x4_epi64(hi, 1)};
  for (int q = 0; q < 4; ++q) {
    out[q] = dt == DType::kFloat16
                 ? _mm512_cvtph_ps(h[q])
                 : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h[q]), 16));
  }
}


// Why: the fma form's step (float and int8): a tile decoded to fp32, rows 2p | 2p+1 in zmm p,
// against R rows of x (8 fp32 columns each, row r at xt + 8r); a[4r + p] accumulates.
template <int R>
__attribute__((always_inline)) inline void fma_rows(const __m512* wt, const float* xt, __m512* a) {
  for (int r = 0; r < R; ++r) {
    const __m512 xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(xt + r * 8));
    for (int q = 0; q < 4; ++q) a[4 * r + q] = _mm512_fmadd_ps(wt[q], xv, a[4 * r + q]);
  }
}

// ---- entering a 64-column group of a band ---------------------------------------------------

// Why: the group check + prefetch every AVX-512 band loop (float and int8) runs before a group's
// tiles: checked_group_start, or for an interior full group the same test fused with 8 unrolled
// popcounts (no padding can be involved there); then the values stream is prefetched
// `prefetch_bytes` ahead through the cursor `pf` and the bitmap `prefetch_tiles` words ahead.
// Returns the group's first value index, or -1 when the group is inconsistent.
__attribute__((always_inline)) inline int64_t enter_group_prefetching(const SparseWeightView& w,
                                                                     const GroupGeometry& geo, int es,
                                                                     const char*& pf, int64_t band, int64_t g,
                                                                     bool full, int64_t prefetch_bytes,
                                                                     int64_t prefetch_tiles) {
  const int32_t* offs = w.offsets + band * geo.groups + g;
  const uint64_t* gw = w.bitmap + band * geo.tiles + 8 * g;
  int64_t v;
  if (full) {
    v = offs[0];
    int64_t count = 0;
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) count += _mm_popcnt_u64(gw[i]);
    if (v < 0 || v + count != offs[1] || offs[1] > w.values_count) return -1;
  } else {
    v = checked_group_start(w, geo, band, g);
    if (v < 0) return -1;
  }
  const char* values = static_cast<const char*>(w.values);
  const char* end = values + int64_t{offs[1]} * es + prefetch_bytes;
  if (pf == nullptr) pf = values + v * es;
  for (; pf < end; pf += 64) _mm_prefetch(pf, _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(gw + prefetch_tiles), _MM_HINT_T0);
  return v;
}

// ---- the transposed product's group step (the float and the int8 kernels) -----------------

// Why: dx = dy·W one 64-column group at a time: the group of a band is decoded once to fp32 (4 zmm
// per tile, rows 2p | 2p+1 in zmm p), then each of mb dy rows adds Σ_r dy[8b+r]·W[r, :] into 8 tile
// accumulators acc[row * 8 + t] (lanes 0-7: even rows, 8-15: odd rows). `dy_band` points at dy row
// i0's 8 values of the band; n_valid of them are real (the last band may be short).
struct TransposedGroupStep {
  static constexpr int64_t kAhead = 4;  // the group kAhead bands ahead is prefetched
  __m512i pair_idx[4];  // zmm p broadcasts dy row 2p to lanes 0-7 and row 2p+1 to lanes 8-15
  TransposedGroupStep() {
    for (int p = 0; p < 4; ++p) {
      pair_idx[p] = _mm512_mask_blend_epi32(0xff00, _mm512_set1_epi32(2 * p), _mm512_set1_epi32(2 * p + 1));
    }
  }
  // The same group kAhead bands later: groups of later bands are a stride apart (no HW prefetch).
  static void prefetch_ahead(const SparseWeightView& w, const GroupGeometry& geo, int64_t band, int64_t g,
                             int64_t t0, int value_bytes) {
    if (band + kAhead >= geo.bands) return;
    const int64_t ahead = (band + kAhead) * geo.groups + g;
    const char* p = static_cast<const char*>(w.values) + int64_t{w.offsets[ahead]} * value_bytes;
    const char* e = static_cast<const char*>(w.values) + int64_t{w.offsets[ahead + 1]} * value_bytes;
    for (; p < e; p += 64) _mm_prefetch(p, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w.bitmap + (band + kAhead) * geo.tiles + t0), _MM_HINT_T0);
  }
  void accumulate(const __m512* tiles, int nt, const char* dy_band, int64_t dy_row_bytes, int mb, DType dt,
                  int n_valid, __m512* acc) const {
    for (int r = 0; r < mb; ++r) {
      const __m512 d = _mm512_castps256_ps512(load8(dy_band + r * dy_row_bytes, dt, n_valid));
      __m512 dp[4];
      for (int p = 0; p < 4; ++p) dp[p] = _mm512_permutexvar_ps(pair_idx[p], d);
      __m512* ar = acc + r * 8;
      for (int t = 0; t < nt; ++t) {
        __m512 s = _mm512_fmadd_ps(tiles[4 * t], dp[0], ar[t]);
        s = _mm512_fmadd_ps(tiles[4 * t + 1], dp[1], s);
        s = _mm512_fmadd_ps(tiles[4 * t + 2], dp[2], s);
        ar[t] = _mm512_fmadd_ps(tiles[4 * t + 3], dp[3], s);
      }
    }
  }
  // dx = dy·W over groups [group_begin, group_end), kRows dy rows per pass: for each band,
  // decode(band, g, first_value, bitmap_words, nt, tiles) writes the band's group in fp32 (4 zmm per
  // tile). `dt` is dy's and dx's dtype; value_bytes sizes the prefetch. Returns -1, or the
  // band * groups + g whose offsets are inconsistent.
  template <int kRows, class DecodeGroup>
  int64_t run(const SparseWeightView& w, int value_bytes, DType dt, const void* dy, int64_t dy_row_stride, void* dx,
              int64_t dx_row_stride, int64_t m, int64_t group_begin, int64_t group_end, DecodeGroup decode) const {
    const GroupGeometry geo = geometry_of(w);
    const int es = element_size(dt);
    alignas(64) __m512 tiles[32];  // one group decoded to fp32, 4 zmm per tile
    alignas(64) __m512 acc[kRows * 8];
    for (int64_t g = group_begin; g < group_end; ++g) {
      const int t0 = static_cast<int>(group_tile_begin(g));
      const int nt = static_cast<int>(group_tile_end(geo, g)) - t0;
      for (int64_t i0 = 0; i0 < m; i0 += kRows) {
        const int mb = static_cast<int>(std::min<int64_t>(kRows, m - i0));
        for (int i = 0; i < mb * 8; ++i) acc[i] = _mm512_setzero_ps();
        for (int64_t band = 0; band < geo.bands; ++band) {
          const int64_t v = checked_group_start(w, geo, band, g);
          if (v < 0) return band * geo.groups + g;
          prefetch_ahead(w, geo, band, g, t0, value_bytes);
          decode(band, g, v, w.bitmap + band * geo.tiles + t0, nt, tiles);
          const int n_valid = static_cast<int>(std::min<int64_t>(8, w.rows - 8 * band));
          accumulate(tiles, nt, static_cast<const char*>(dy) + (i0 * dy_row_stride + 8 * band) * es,
                     dy_row_stride * es, mb, dt, n_valid, acc);
        }
        const int64_t col0 = g * format::kGroupColumns;
        store(acc, nt, mb, static_cast<char*>(dx) + (i0 * dx_row_stride + col0) * es, dx_row_stride * es,
              w.cols - col0, dt);
      }
    }
    return -1;
  }
  // dx rows i0 .. i0+mb of the group: each tile's even- and odd-row lanes summed into 8 columns.
  // `dx_group` points at dx row i0's first column of the group; `cols_left` columns remain there.
  static void store(const __m512* acc, int nt, int mb, char* dx_group, int64_t dx_row_bytes, int64_t cols_left,
                    DType dt) {
    const int es = element_size(dt);
    for (int r = 0; r < mb; ++r) {
      for (int t = 0; t < nt; ++t) {
        const __m512 s = acc[r * 8 + t];
        const __m256 o = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
        store8(dx_group + r * dx_row_bytes + 8 * t * es, o, dt, static_cast<int>(std::min<int64_t>(8, cols_left - 8 * t)));
      }
    }
  }
};

}  // namespace
}  // namespace salr::kernels

// AVX-512 kernels for int8 BM8x8 weights (issue 21). Built with the AVX-512 flags of
// spmm_avx512.cpp (VBMI2 included: cpu_supports(kAvx512) requires it, else the AVX2 int8 kernel runs).
//
// A tile is one vpexpandb of its 64-bit bitmap word from the value stream (reads exactly popcount
// bytes), sign-extended to fp32 as zmm p = tile rows 2p | 2p+1, then FMA against 8 columns of x
// broadcast to both halves (the float kernel's fma form). Per-row scales multiply each output row
// once after the band's accumulation; per-group scales multiply the decoded tile (one vector per
// tile row pair, built once per group). The value stream is prefetched a few KB ahead, as the float
// kernel does: at 1 byte per value the bitmap -> popcount -> pointer chain is the same per tile.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "avx512_lanes.h"
#include "group_check.h"
#include "int8_kernels.h"

namespace salr::kernels {
namespace {

constexpr int kRowBlock = 16;             // x rows per pass over the bands (bounds the x scratch)
constexpr int64_t kPrefetchBytes = 4096;  // values prefetch distance (DRAM latency x bandwidth)
constexpr int64_t kPrefetchTiles = 96;    // bitmap prefetch distance in words (768 B)

// Why: the band loop's state as plain values, so the hot loop keeps it in registers.
struct Walk {
  SparseWeightView w;
  GroupGeometry geo;
  const float* scales;
  int64_t scale_groups;
  const char* pf;  // values prefetch cursor, kPrefetchBytes ahead of the decode
};

// Why: the band loops' group entry (avx512_lanes.h), with this file's prefetch distances.
__attribute__((always_inline)) inline int64_t enter_group(Walk& k, int64_t band, int64_t g, bool full) {
  return enter_group_prefetching(k.w, k.geo, 1, k.pf, band, g, full, kPrefetchBytes, kPrefetchTiles);
}

// Why: one tile to fp32, zmm p = rows 2p | 2p+1 (the fma layout); absent values are 0. The expanded
// tile goes through a stack line and is sign-extended from memory: three lane extracts fewer on
// port 5, which the expand and the extensions already load (a gain within this run's noise so far).
inline void decode_tile(const int8_t* p, uint64_t word, __m512* o) {
  alignas(64) int8_t line[64];
  _mm512_store_si512(line, _mm512_maskz_expandloadu_epi8(word, p));
  __asm__("" : "+m"(line));  // keep the round trip: the compiler would fold it back into extracts
  for (int q = 0; q < 4; ++q) {
    o[q] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(line + 16 * q))));
  }
}

// Why: the 8 row scales of (band, group) in `dst`; rows past the weight's last one get 0 (their
// bitmap bits are checked clear, so nothing is multiplied by it).
inline void band_scales(const float* scales, int64_t scale_groups, int64_t rows, int64_t band, int64_t g,
                        float* dst) {
  for (int r = 0; r < 8; ++r) {
    const int64_t n = 8 * band + r;
    dst[r] = n < rows ? scales[n * scale_groups + (scale_groups == 1 ? 0 : g)] : 0.0f;
  }
}

// Why: the scales of (band, group) in the fma layout: zmm p = row 2p (lanes 0-7) | row 2p+1 (8-15).
inline void scale_vectors(const float* scales, int64_t scale_groups, int64_t rows, int64_t band, int64_t g,
                          __m512* sv) {
  alignas(32) float s[8];
  band_scales(scales, scale_groups, rows, band, g, s);
  for (int p = 0; p < 4; ++p) {
    sv[p] = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(s[2 * p]), _mm512_set1_ps(s[2 * p + 1]));
  }
}

// Why: one tile against R rows of x (x scratch: tile t, row r at x[(t*R + r)*8]).
template <int R, bool kGroupScales>
__attribute__((always_inline)) inline void fma_tile(const int8_t* p, uint64_t word, const float* xt,
                                                    const __m512* sv, __m512* a) {
  __m512 wt[4];
  decode_tile(p, word, wt);
  if constexpr (kGroupScales) {
    for (int q = 0; q < 4; ++q) wt[q] = _mm512_mul_ps(wt[q], sv[q]);
  }
  fma_rows<R>(wt, xt, a);
}

// out[4r+p] = rows 2p | 2p+1 of x row r over one band. R = 1 alternates two accumulator sets to
// hide the FMA latency.
template <int R, bool kGroupScales>
int64_t fma_band(Walk& k, int64_t band, const float* x, __m512* out) {
  constexpr int S = R == 1 ? 2 : 1;
  __m512 a[S][4 * R];
  for (int s = 0; s < S; ++s)
    for (int i = 0; i < 4 * R; ++i) a[s][i] = _mm512_setzero_ps();
  const auto* values = static_cast<const int8_t*>(k.w.values);
  const uint64_t* words = k.w.bitmap + band * k.geo.tiles;
  const bool interior = band + 1 < k.geo.bands;
  __m512 sv[4];
  for (int64_t g = 0; g < k.geo.groups; ++g) {
    const bool full = interior && g + 1 < k.geo.groups;
    int64_t v = enter_group(k, band, g, full);
    if (v < 0) return band * k.geo.groups + g;
    if constexpr (kGroupScales) scale_vectors(k.scales, k.scale_groups, k.w.rows, band, g, sv);
    const int64_t t0 = 8 * g;
    if (full) {
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        fma_tile<R, kGroupScales>(values + v, words[t0 + i], x + (t0 + i) * R * 8, sv, a[i % S]);
        v += _mm_popcnt_u64(words[t0 + i]);
      }
    } else {
      for (int64_t t = t0; t < group_tile_end(k.geo, g); ++t) {
        fma_tile<R, kGroupScales>(values + v, words[t], x + t * R * 8, sv, a[0]);
        v += _mm_popcnt_u64(words[t]);
      }
    }
  }
  for (int i = 0; i < 4 * R; ++i) out[i] = S == 1 ? a[0][i] : _mm512_add_ps(a[0][i], a[S - 1][i]);
  return -1;
}

// Why: picks the fma_band instantiation: row blocks 4/2/1 x per-row / per-group scales.
inline int64_t band_dispatch(int R, bool group_scales, Walk& k, int64_t band, const float* x, __m512* out) {
  if (group_scales) {
    return R == 4 ? fma_band<4, true>(k, band, x, out) : R == 2 ? fma_band<2, true>(k, band, x, out)
                                                                : fma_band<1, true>(k, band, x, out);
  }
  return R == 4 ? fma_band<4, false>(k, band, x, out) : R == 2 ? fma_band<2, false>(k, band, x, out)
                                                               : fma_band<1, false>(k, band, x, out);
}

inline int block_rows(int left) { return left >= 4 ? 4 : left >= 2 ? 2 : 1; }

// Why: the thread's fp32 x scratch, reused across calls so the hot path never allocates.
inline float* x_scratch(size_t count) {
  struct alignas(64) Line { float f[16]; };
  thread_local std::vector<Line> storage;
  const size_t lines = (count * sizeof(float) + 63) / 64;
  if (storage.size() < lines) storage.resize(lines);
  return reinterpret_cast<float*>(storage.data());
}

// Rows [i0, i0+mb) of x as fp32 in the blocked layout (block of R rows at r0: tile t, row r at
// xs[r0*k8 + (t*R + r)*8]), zero padded to k8 columns.
void load_x(const Int8GemmArgs& a, int64_t i0, int mb, int64_t k8, float* xs) {
  const int es = element_size(a.dtype);
  for (int r0 = 0, R = 0; r0 < mb; r0 += R) {
    R = block_rows(mb - r0);
    for (int r = 0; r < R; ++r) {
      const char* src = static_cast<const char*>(a.x) + (i0 + r0 + r) * a.x_row_stride * es;
      for (int64_t k = 0; k < k8; k += 8) {
        const int n = static_cast<int>(std::clamp<int64_t>(a.weight.index.cols - k, 0, 8));
        _mm256_storeu_ps(xs + r0 * k8 + (k / 8 * R + r) * 8, n > 0 ? load8(src + k * es, a.dtype, n) : _mm256_setzero_ps());
      }
    }
  }
}

int64_t gemm_int8_avx512(const Int8GemmArgs& a, int64_t band_begin, int64_t band_end) {
  const SparseWeightView& w = a.weight.index;
  const GroupGeometry geo = geometry_of(w);
  const bool group_scales = a.weight.scale_groups != 1;
  const int es = element_size(a.dtype);
  const int64_t k8 = geo.tiles * 8;
  float* xs = x_scratch(static_cast<size_t>(std::min<int64_t>(a.m, kRowBlock) * k8));
  alignas(64) __m512 acc[kRowBlock * 4];
  for (int64_t i0 = 0; i0 < a.m; i0 += kRowBlock) {
    const int mb = static_cast<int>(std::min<int64_t>(kRowBlock, a.m - i0));
    load_x(a, i0, mb, k8, xs);
    Walk walk{w, geo, a.weight.scales, a.weight.scale_groups, nullptr};
    for (int64_t band = band_begin; band < band_end; ++band) {
      for (int r0 = 0, R = 0; r0 < mb; r0 += R) {
        R = block_rows(mb - r0);
        const int64_t bad = band_dispatch(R, group_scales, walk, band, xs + r0 * k8, acc + r0 * 4);
        if (bad >= 0) return bad;
        if (r0 + R < mb) walk.pf = nullptr;  // the next block re-reads this band: restart the cursor
      }
      // Epilogue: 8 row sums (· the row scales) + adapter + bias, rounded once into y.
      const int n_valid = static_cast<int>(std::min<int64_t>(8, w.rows - 8 * band));
      const __m256 row_scales = group_scales ? _mm256_set1_ps(1.0f)
                                             : load8(a.weight.scales + 8 * band, DType::kFloat32, n_valid);
      for (int r = 0; r < mb; ++r) {
        const int64_t i = i0 + r;
        __m256 out = _mm256_mul_ps(reduce_fma(acc + 4 * r), row_scales);
        if (a.rank > 0 && a.t != nullptr && a.adapter_b != nullptr) {
          out = _mm256_add_ps(out, band_adapter_term(a.t + i * a.rank, a.adapter_b, a.adapter_b_scales, band, a.rank,
                                                     a.dtype, n_valid));
        }
        if (a.bias != nullptr) {
          out = _mm256_add_ps(out, load8(static_cast<const char*>(a.bias) + 8 * band * es, a.dtype, n_valid));
        }
        store8(static_cast<char*>(a.y) + (i * a.y_row_stride + 8 * band) * es, out, a.dtype, n_valid);
      }
    }
  }
  return -1;
}

// dx for 64-column groups (TransposedGroupStep::run): each (band, group) decoded once to fp32 and
// scaled (the weights, not dy: a large dy times a scale must not overflow where only pruned zeros meet it).
int64_t gemm_transposed_int8_avx512(const Int8GemmTransposedArgs& a, int64_t group_begin, int64_t group_end) {
  const SparseWeightView& w = a.weight.index;
  const auto* values = static_cast<const int8_t*>(w.values);
  const auto decode = [&](int64_t band, int64_t g, int64_t v, const uint64_t* words, int nt, __m512* tiles) {
    __m512 sv[4];
    scale_vectors(a.weight.scales, a.weight.scale_groups, w.rows, band, g, sv);
    for (int t = 0; t < nt; v += _mm_popcnt_u64(words[t]), ++t) {
      decode_tile(values + v, words[t], tiles + 4 * t);
      for (int q = 0; q < 4; ++q) tiles[4 * t + q] = _mm512_mul_ps(tiles[4 * t + q], sv[q]);
    }
  };
  return TransposedGroupStep().run<kRowBlock>(w, 1, a.dtype, a.dy, a.dy_row_stride, a.dx, a.dx_row_stride, a.m,
                                              group_begin, group_end, decode);
}

// The large-M paths' dequantizer: every tile (empty ones included) expanded, scaled per row and
// stored as 8 rows of `dtype`, so the chunk needs no zero fill.
int64_t dequantize_int8_avx512(const Int8WeightView& w, DType dtype, void* dense, int64_t band_begin,
                               int64_t band_end) {
  const int es = element_size(dtype);
  const int64_t cols = w.index.cols;
  const auto* values = static_cast<const int8_t*>(w.index.values);
  return for_each_checked_tile(w.index, band_begin, band_end, [&](uint64_t word, int64_t v, int64_t offset, int rows,
                                                                  int width) {
    const int64_t band = offset / (8 * cols), tile = (offset - 8 * band * cols) / 8;
    alignas(32) float s[8];
    band_scales(w.scales, w.scale_groups, w.index.rows, band, tile / format::kTilesPerGroup, s);
    __m512 o[4];
    decode_tile(values + v, word, o);
    for (int r = 0; r < rows; ++r) {
      const __m256 row = r % 2 == 0 ? _mm512_castps512_ps256(o[r / 2]) : _mm512_extractf32x8_ps(o[r / 2], 1);
      store8(static_cast<char*>(dense) + (offset + r * cols) * es, _mm256_mul_ps(row, _mm256_set1_ps(s[r])), dtype,
             width);
    }
  });
}

const Int8KernelTable kAvx512Int8Table{"avx512", gemm_int8_avx512, gemm_transposed_int8_avx512,
                                       dequantize_int8_avx512};

}  // namespace

const Int8KernelTable* avx512_int8_table() { return &kAvx512Int8Table; }

}  // namespace salr::kernels

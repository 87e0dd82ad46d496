// AVX-512 BM8x8 kernels (design.md §1). Built with -mavx512{f,bw,vl,dq,vbmi2} -mfma -mf16c; the
// bf16 dot product (vdpbf16ps) lives in functions with target("avx512bf16"), used only when cpuid
// says so, so the rest of the file runs on any VBMI2 part.
//
// Forward (gemm): for each band and each block of up to 8 (dot form) or 4 (fma form) rows of x,
// walk the band's groups: check the group (group_check.h), expand each tile into registers
// (vpexpandw / vexpandps with a memory operand read exactly popcount values) and apply it to every
// row of the block, accumulators in registers. The values are one sequential stream per thread
// (bands are contiguous), so a software prefetch a few KB ahead of the decode keeps DRAM busy while
// the bitmap -> popcount -> pointer chain resolves; a second row block re-reads the band from cache.
// Compute forms: "dot" keeps bf16 pairs and uses vdpbf16ps (128-bit lane r = tile row r); "fma"
// converts the tile to fp32 (zmm p = rows 2p | 2p+1) and uses FMA. Both reduce to 8 row sums
// per band at the end, then add adapter and bias in fp32 and round once (RNE, as numeric.h).
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "avx512_lanes.h"
#include "group_check.h"
#include "kernels.h"
#include "numeric.h"


namespace salr::kernels {
namespace {

constexpr int kRowBlock = 16;             // x rows per decode pass: bounds the x scratch and accs
constexpr int64_t kPrefetchBytes = 6144;  // values prefetch distance (DRAM latency x bandwidth)
constexpr int64_t kPrefetchTiles = 96;    // bitmap prefetch distance in words (768 B)

// ---- one band for a block of R rows of x, accumulators in registers --------------------------
// x scratch layout: a block of R rows starting at row r0 stores element (tile t, row r, col c) at
// xs[r0*k8 + (t*R + r)*8 + c], so a tile's x for the whole block is one contiguous 16R/32R bytes.

// Why: the band loops' state as plain values, so the hot loop keeps it in registers.
struct Walk {
  SparseWeightView w;
  GroupGeometry geo;
  int es;
  const char* pf;  // values prefetch cursor, kPrefetchBytes ahead of the decode
};

// Why: the band loops' group entry (avx512_lanes.h), with this file's prefetch distances.
__attribute__((always_inline)) inline int64_t enter_group(Walk& k, int64_t band, int64_t g, bool full) {
  return enter_group_prefetching(k.w, k.geo, k.es, k.pf, band, g, full, kPrefetchBytes, kPrefetchTiles);
}

// Why: with more than 8 rows of x, a band is walked once per 8-row block. The first block expands
// each tile and also stores it (128 B) into a per-thread band buffer (64 KB at K = 4096, L2);
// later blocks load the expanded tiles back instead of repeating the expand-loads and group checks.
enum class Stage { kDirect, kStore, kLoad };

// Why: one tile of the dot form: expand rows 0-3 / 4-7 once (or load them staged), dp against R rows.
template <int R, Stage S>
__attribute__((target("avx512bf16"), always_inline)) inline void dot_tile(const uint16_t* p, uint64_t b,
                                                                         const uint16_t* xt, __m512* a,
                                                                         __m512i* staged) {
  __m512i lo, hi;
  if constexpr (S == Stage::kLoad) {
    lo = _mm512_load_si512(staged);
    hi = _mm512_load_si512(staged + 1);
  } else {
    expand16(p, b, lo, hi);
    if constexpr (S == Stage::kStore) {
      _mm512_store_si512(staged, lo);
      _mm512_store_si512(staged + 1, hi);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_maskz_broadcast_i32x4(
        0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xt + r * 8))));
    a[2 * r] = _mm512_dpbf16_ps(a[2 * r], reinterpret_cast<__m512bh>(lo), xv);
    a[2 * r + 1] = _mm512_dpbf16_ps(a[2 * r + 1], reinterpret_cast<__m512bh>(hi), xv);
  }
}

// Why: vdpbf16ps needs avx512bf16, which the file may not assume, so the whole band loop carries
// the target. S accumulator sets hide the dp latency when R is small (tile t uses set t % S).
// out[2r] = rows 0-3 (lane chunk q = row q), out[2r+1] = rows 4-7, for x row r of the block.
// kLoad reads tiles a kStore pass of the same band validated and expanded: no values, no checks.
template <int R, Stage St>
__attribute__((target("avx512bf16"))) int64_t dot_band(Walk& k, int64_t band, const uint16_t* x,
                                                      __m512* out, __m512i* staged) {
  constexpr int S = R >= 4 ? 1 : 4 / R;
  __m512 a[S][2 * R];
  for (int s = 0; s < S; ++s)
    for (int i = 0; i < 2 * R; ++i) a[s][i] = _mm512_setzero_ps();
  const uint16_t* values = static_cast<const uint16_t*>(k.w.values);
  const uint64_t* words = k.w.bitmap + band * k.geo.tiles;
  if constexpr (St == Stage::kLoad) {
    for (int64_t t = 0; t < k.geo.tiles; ++t) dot_tile<R, St>(nullptr, 0, x + t * R * 8, a[t % S], staged + 2 * t);
  } else {
    const bool interior = band + 1 < k.geo.bands;
    for (int64_t g = 0; g < k.geo.groups; ++g) {
      const bool full = interior && g + 1 < k.geo.groups;
      int64_t v = enter_group(k, band, g, full);
      if (v < 0) return band * k.geo.groups + g;
      const int64_t t0 = 8 * g;
      if (full) {
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          dot_tile<R, St>(values + v, words[t0 + i], x + (t0 + i) * R * 8, a[i % S], staged + 2 * (t0 + i));
          v += _mm_popcnt_u64(words[t0 + i]);
        }
      } else {
        for (int64_t t = t0; t < group_tile_end(k.geo, g); ++t) {
          dot_tile<R, St>(values + v, words[t], x + t * R * 8, a[0], staged + 2 * t);
          v += _mm_popcnt_u64(words[t]);
        }
      }
    }
  }
  for (int i = 0; i < 2 * R; ++i) {
    out[i] = a[0][i];
    for (int s = 1; s < S; ++s) out[i] = _mm512_add_ps(out[i], a[s][i]);
  }
  return -1;
}

// Why: picks the dot_band instantiation. Direct: R in {8,4,2,1} (M <= 8, one block per band);
// with more rows the first block is always R = 8 (store) and the rest load: 4 + 1 + 4 instantiations.
inline int64_t dot_dispatch(int R, Stage st, Walk& k, int64_t band, const uint16_t* x, __m512* out,
                            __m512i* staged) {
  if (st == Stage::kStore) return dot_band<8, Stage::kStore>(k, band, x, out, staged);
  if (st == Stage::kLoad) {
    return R == 8 ? dot_band<8, Stage::kLoad>(k, band, x, out, staged)
         : R == 4 ? dot_band<4, Stage::kLoad>(k, band, x, out, staged)
         : R == 2 ? dot_band<2, Stage::kLoad>(k, band, x, out, staged)
                  : dot_band<1, Stage::kLoad>(k, band, x, out, staged);
  }
  return R == 8 ? dot_band<8, Stage::kDirect>(k, band, x, out, staged)
       : R == 4 ? dot_band<4, Stage::kDirect>(k, band, x, out, staged)
       : R == 2 ? dot_band<2, Stage::kDirect>(k, band, x, out, staged)
                : dot_band<1, Stage::kDirect>(k, band, x, out, staged);
}

// Why: decodes one tile to fp32 rows 2p | 2p+1 (zmm p): the fma form's input for every dtype.
inline void decode_f32(const void* values, int64_t v, uint64_t b, DType dt, __m512* o) {
  if (dt == DType::kFloat32) {
    const float* p = static_cast<const float*>(values) + v;
    o[0] = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(b), p);
    o[1] = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(b >> 16), p + _mm_popcnt_u32(b & 0xffffu));
    o[2] = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(b >> 32), p + _mm_popcnt_u32(static_cast<uint32_t>(b)));
    o[3] = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(b >> 48), p + _mm_popcnt_u64(b & 0xffffffffffffull));
    return;
  }
  __m512i lo, hi;
  expand16(static_cast<const uint16_t*>(values) + v, b, lo, hi);
  widen16(lo, hi, dt, o);
}

// Why: one tile of the fma form: decode to fp32 once, FMA against R rows of x.
template <int R, DType DT>
__attribute__((always_inline)) inline void fma_tile(const void* values, int64_t v, uint64_t b, const float* xt,
                                                    __m512* a) {
  __m512 wt[4];
  decode_f32(values, v, b, DT, wt);
  fma_rows<R>(wt, xt, a);
}

// Why: the fp32 form (fp32, fp16, bf16 without BF16): out[4r+p] = rows 2p | 2p+1 of x row r.
// Templated on the dtype so the per-tile decode has no dtype branch.
template <int R, DType DT>
int64_t fma_band(Walk& k, int64_t band, const float* x, __m512* out) {
  constexpr int S = R == 1 ? 2 : 1;
  __m512 a[S][4 * R];
  for (int s = 0; s < S; ++s)
    for (int i = 0; i < 4 * R; ++i) a[s][i] = _mm512_setzero_ps();
  const uint64_t* words = k.w.bitmap + band * k.geo.tiles;
  const bool interior = band + 1 < k.geo.bands;
  for (int64_t g = 0; g < k.geo.groups; ++g) {
    const bool full = interior && g + 1 < k.geo.groups;
    int64_t v = enter_group(k, band, g, full);
    if (v < 0) return band * k.geo.groups + g;
    const int64_t t0 = 8 * g;
    if (full) {
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        fma_tile<R, DT>(k.w.values, v, words[t0 + i], x + (t0 + i) * R * 8, a[i % S]);
        v += _mm_popcnt_u64(words[t0 + i]);
      }
    } else {
      for (int64_t t = t0; t < group_tile_end(k.geo, g); ++t) {
        fma_tile<R, DT>(k.w.values, v, words[t], x + t * R * 8, a[0]);
        v += _mm_popcnt_u64(words[t]);
      }
    }
  }
  for (int i = 0; i < 4 * R; ++i) out[i] = S == 1 ? a[0][i] : _mm512_add_ps(a[0][i], a[S - 1][i]);
  return -1;
}

// Why: the thread's x scratch; reused across calls so the hot path never allocates.
template <typename T>
T* scratch(size_t count) {
  struct alignas(64) Line { float f[16]; };
  thread_local std::vector<Line> storage;
  const size_t lines = (count * sizeof(T) + 63) / 64;
  if (storage.size() < lines) storage.resize(lines);
  return reinterpret_cast<T*>(storage.data());
}

// Why: the per-thread band buffer of expanded tiles (Stage::kStore / kLoad), 64-byte aligned.
inline __m512i* band_scratch(int64_t tiles) {
  struct alignas(64) Zmm { uint64_t q[8]; };
  thread_local std::vector<Zmm> storage;
  if (storage.size() < static_cast<size_t>(2 * tiles)) storage.resize(static_cast<size_t>(2 * tiles));
  return reinterpret_cast<__m512i*>(storage.data());
}

// Why: the row-block size for rows [r, mb): 8/4/2/1 for the dot form, 4/2/1 for the fma form.
inline int block_rows(int left, bool dot) {
  return left >= 8 && dot ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
}

// Why: copies rows [i0, i0+mb) of x into the blocked scratch layout (bf16 or fp32), zero padded
// to k8 so the last tile reads 8 columns without a mask.
template <bool kDot>
void load_x(const GemmArgs& a, int64_t i0, int mb, int64_t k8, void* xs) {
  const DType dt = a.weight.dtype;
  const int es = element_size(dt);
  alignas(64) float tmp[16];
  for (int r0 = 0, R = 0; r0 < mb; r0 += R) {
    R = block_rows(mb - r0, kDot);
    for (int r = 0; r < R; ++r) {
      const char* src = static_cast<const char*>(a.x) + (i0 + r0 + r) * a.x_row_stride * es;
      for (int64_t k = 0; k < k8; k += 8) {
        const int n = static_cast<int>(std::clamp<int64_t>(a.weight.cols - k, 0, 8));
        const int64_t at = r0 * k8 + (k / 8 * R + r) * 8;
        if constexpr (kDot) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(xs) + at),
                           _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << n) - 1u), src + k * es));
        } else {
          _mm256_store_ps(tmp, load8(src + k * es, dt, n));
          std::memcpy(static_cast<float*>(xs) + at, tmp, 32);
        }
      }
    }
  }
}

// Why: picks the fma_band instantiation (3 dtypes x row blocks 4/2/1).
inline int64_t fma_dispatch(DType dt, int R, Walk& k, int64_t band, const float* x, __m512* out) {
  switch (dt) {
    case DType::kFloat32:
      return R == 4 ? fma_band<4, DType::kFloat32>(k, band, x, out) : R == 2 ? fma_band<2, DType::kFloat32>(k, band, x, out)
                                                                      : fma_band<1, DType::kFloat32>(k, band, x, out);
    case DType::kBFloat16:
      return R == 4 ? fma_band<4, DType::kBFloat16>(k, band, x, out) : R == 2 ? fma_band<2, DType::kBFloat16>(k, band, x, out)
                                                                       : fma_band<1, DType::kBFloat16>(k, band, x, out);
    case DType::kFloat16:
      return R == 4 ? fma_band<4, DType::kFloat16>(k, band, x, out) : R == 2 ? fma_band<2, DType::kFloat16>(k, band, x, out)
                                                                      : fma_band<1, DType::kFloat16>(k, band, x, out);
  }
  return -1;
}

// Why: the adapter rows of a band are read once, after its values; without a prefetch each band
// pays a DRAM miss on them (measured: +15% time at rank 32), as the value stream evicts them.
inline void prefetch_adapter_rows(const GemmArgs& a, int64_t band, int64_t band_end, int es) {
  if (a.adapter_b == nullptr || band >= band_end) return;
  const int64_t row_bytes = a.rank * (a.adapter_b_scales != nullptr ? 1 : es);  // an int8 adapter: 1 byte each
  const char* rows = static_cast<const char*>(a.adapter_b) + 8 * band * row_bytes;
  const int64_t last_row = std::min<int64_t>(8 * band + 8, a.weight.rows) - 8 * band;
  for (int64_t offset = 0; offset < last_row * row_bytes; offset += 64) {
    _mm_prefetch(rows + offset, _MM_HINT_T0);
  }
}

// Why: one driver for both forms; kDot selects bf16 pairs + vdpbf16ps, else fp32 + FMA.
template <bool kDot>
int64_t gemm_bands(const GemmArgs& a, int64_t band_begin, int64_t band_end) {
  using XT = std::conditional_t<kDot, uint16_t, float>;
  constexpr int kAcc = kDot ? 2 : 4;  // accumulator zmm per (x row, band)
  const SparseWeightView& w = a.weight;
  const GroupGeometry geo = geometry_of(w);
  const DType dt = w.dtype;
  const int es = element_size(dt);
  const int64_t k8 = geo.tiles * 8;
  XT* xs = scratch<XT>(static_cast<size_t>(std::min<int64_t>(a.m, kRowBlock) * k8));
  alignas(64) __m512 acc[kRowBlock * kAcc];
  // Expanded tiles of the current band, two zmm each (see Stage); only the dot form with M > 8 uses it.
  __m512i* staged = kDot && a.m > 8 ? band_scratch(geo.tiles) : nullptr;
  for (int64_t i0 = 0; i0 < a.m; i0 += kRowBlock) {
    const int mb = static_cast<int>(std::min<int64_t>(kRowBlock, a.m - i0));
    load_x<kDot>(a, i0, mb, k8, xs);
    Walk bw{w, geo, es, nullptr};
    for (int64_t band = band_begin; band < band_end; ++band) {
      prefetch_adapter_rows(a, band + 2, band_end, es);
      for (int r0 = 0, R = 0; r0 < mb; r0 += R) {
        R = block_rows(mb - r0, kDot);
        const XT* xb = xs + r0 * k8;
        __m512* out = acc + r0 * kAcc;
        int64_t bad = -1;
        if constexpr (kDot) {
          const Stage st = mb <= 8 ? Stage::kDirect : r0 == 0 ? Stage::kStore : Stage::kLoad;
          bad = dot_dispatch(R, st, bw, band, xb, out, staged);
        } else {
          bad = fma_dispatch(dt, R, bw, band, xb, out);
        }
        if (bad >= 0) return bad;
        // The next block re-reads this band's values (unless it loads staged tiles): restart the cursor.
        if (staged == nullptr && r0 + R < mb) bw.pf = nullptr;
      }
      // Epilogue: 8 row sums + adapter + bias, rounded once into y.
      const int n_valid = static_cast<int>(std::min<int64_t>(8, w.rows - 8 * band));
      for (int r = 0; r < mb; ++r) {
        const int64_t i = i0 + r;
        __m256 out = kDot ? reduce_dot(acc[r * kAcc], acc[r * kAcc + 1]) : reduce_fma(acc + r * kAcc);
        if (a.rank > 0 && a.t != nullptr && a.adapter_b != nullptr) {
          out = _mm256_add_ps(out, band_adapter_term(a.t + i * a.rank, a.adapter_b, a.adapter_b_scales, band, a.rank,
                                                     dt, n_valid));
        }
        if (a.bias != nullptr) {
          out = _mm256_add_ps(out, load8(static_cast<const char*>(a.bias) + 8 * band * es, dt, n_valid));
        }
        store8(static_cast<char*>(a.y) + (i * a.y_row_stride + 8 * band) * es, out, dt, n_valid);
      }
    }
  }
  return -1;
}

// Why: the bf16 path picks vdpbf16ps once per process when the CPU has it.
int64_t gemm_avx512(const GemmArgs& a, int64_t band_begin, int64_t band_end) {
#if defined(SALR_AVX512_FORCE_FMA)  // test builds: cover the fallback on a BF16 machine
  const bool has_bf16 = false;
#else
  static const bool has_bf16 = __builtin_cpu_supports("avx512bf16");
#endif
  if (a.weight.dtype == DType::kBFloat16 && has_bf16) return gemm_bands<true>(a, band_begin, band_end);
  return gemm_bands<false>(a, band_begin, band_end);
}

// dx for 64-column groups (TransposedGroupStep::run): each (band, group) decoded once to fp32.
int64_t gemm_transposed_avx512(const GemmTransposedArgs& a, int64_t group_begin, int64_t group_end) {
  const SparseWeightView& w = a.weight;
  const auto decode = [&](int64_t, int64_t, int64_t v, const uint64_t* words, int nt, __m512* tiles) {
    for (int t = 0; t < nt; v += _mm_popcnt_u64(words[t]), ++t) decode_f32(w.values, v, words[t], w.dtype, tiles + 4 * t);
  };
  return TransposedGroupStep().run<kRowBlock>(w, element_size(w.dtype), w.dtype, a.dy, a.dy_row_stride, a.dx,
                                              a.dx_row_stride, a.m, group_begin, group_end, decode);
}

const KernelTable kAvx512Table{"avx512", gemm_avx512, gemm_transposed_avx512, decode_bands_avx512,
                                adapter_project_avx2};

}  // namespace

const KernelTable* avx512_kernel_table() { return &kAvx512Table; }

}  // namespace salr::kernels

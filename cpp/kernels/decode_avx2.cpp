// AVX2 BM8x8 decode for the large-M paths (decode a chunk of bands, then a dense GEMM).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "avx2_rows.h"
#include "group_check.h"
#include "kernels.h"

namespace salr::kernels {
namespace {

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

}  // namespace

int64_t decode_bands_avx2(const SparseWeightView& w, void* dense, int64_t band_begin, int64_t band_end) {
  // bf16 and fp16 decode identically (raw 16-bit moves): one instantiation serves both.
  if (w.dtype == DType::kFloat32) return decode_bands_t<F32>(w, dense, band_begin, band_end);
  return decode_bands_t<Fp16>(w, dense, band_begin, band_end);
}

}  // namespace salr::kernels

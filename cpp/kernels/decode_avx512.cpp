// AVX-512 BM8x8 decode: one masked expand-load per half tile (vpexpandw / vexpandps read exactly
// the popcount values) and one 16- or 32-byte store per tile row. The large-M GEMM paths decode a
// cache-sized chunk of bands with this and hand it to the dense GEMM, so it must run near memory
// speed (the scalar bit loop is ~30x slower).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "group_check.h"
#include "kernels.h"

namespace salr::kernels {
namespace {

// Stores one decoded tile row of `width` (<= 8) elements; full rows take the unmasked store.
inline void store_row16(uint16_t* dst, __m128i row, int width) {
  if (width == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), row);
  } else {
    _mm_mask_storeu_epi16(dst, static_cast<__mmask8>((1u << width) - 1), row);
  }
}

inline void store_row32(float* dst, __m256 row, int width) {
  if (width == 8) {
    _mm256_storeu_ps(dst, row);
  } else {
    _mm256_mask_storeu_ps(dst, static_cast<__mmask8>((1u << width) - 1), row);
  }
}

// 16-bit values: rows 0-3 come from the low 32 bitmap bits, rows 4-7 from the high 32.
void decode_tile16(const uint16_t* values, uint64_t word, uint16_t* dst, int64_t ld, int rows, int width) {
  const uint32_t low = static_cast<uint32_t>(word), high = static_cast<uint32_t>(word >> 32);
  const __m512i top = _mm512_maskz_expandloadu_epi16(low, values);
  const __m512i bottom = _mm512_maskz_expandloadu_epi16(high, values + __builtin_popcount(low));
  // _mm512_extracti32x4_epi32 takes an immediate lane index, hence the unrolled stores.
  const __m128i lanes[8] = {
      _mm512_castsi512_si128(top), _mm512_extracti32x4_epi32(top, 1), _mm512_extracti32x4_epi32(top, 2),
      _mm512_extracti32x4_epi32(top, 3), _mm512_castsi512_si128(bottom), _mm512_extracti32x4_epi32(bottom, 1),
      _mm512_extracti32x4_epi32(bottom, 2), _mm512_extracti32x4_epi32(bottom, 3)};
  for (int r = 0; r < rows; ++r) store_row16(dst + r * ld, lanes[r], width);
}

// fp32 values: each quarter of the bitmap (16 bits) is two tile rows.
void decode_tile32(const float* values, uint64_t word, float* dst, int64_t ld, int rows, int width) {
  for (int q = 0; q < 4 && 2 * q < rows; ++q) {
    const __mmask16 mask = static_cast<__mmask16>(word >> (16 * q));
    const __m512 pair = _mm512_maskz_expandloadu_ps(mask, values);
    values += __builtin_popcount(mask);
    store_row32(dst + (2 * q) * ld, _mm512_castps512_ps256(pair), width);
    if (2 * q + 1 < rows) store_row32(dst + (2 * q + 1) * ld, _mm512_extractf32x8_ps(pair, 1), width);
  }
}

}  // namespace

int64_t decode_bands_avx512(const SparseWeightView& w, void* dense, int64_t band_begin, int64_t band_end) {
  if (w.dtype == DType::kFloat32) {
    const float* values = static_cast<const float*>(w.values);
    float* out = static_cast<float*>(dense);
    return for_each_checked_tile(w, band_begin, band_end, [&](uint64_t word, int64_t v, int64_t first, int rows,
                                                             int width) {
      decode_tile32(values + v, word, out + first, w.cols, rows, width);
    });
  }
  const uint16_t* values = static_cast<const uint16_t*>(w.values);
  uint16_t* out = static_cast<uint16_t*>(dense);
  return for_each_checked_tile(w, band_begin, band_end, [&](uint64_t word, int64_t v, int64_t first, int rows,
                                                           int width) {
    decode_tile16(values + v, word, out + first, w.cols, rows, width);
  });
}

}  // namespace salr::kernels

// Portable scalar conversions between the storage dtypes and fp32, identical to PyTorch's
// (round to nearest even, NaN kept quiet), so every ISA path rounds the output the same way.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace salr::kernels {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t bits = float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_to_float(sign);
  // Subnormal half: renormalize.
  int shift = 0;
  while ((mantissa & 0x400u) == 0) {
    mantissa <<= 1;
    ++shift;
  }
  mantissa &= 0x3ffu;
  return bits_to_float(sign | (static_cast<uint32_t>(113 - shift) << 23) | (mantissa << 13));
}

inline uint16_t float_to_fp16(float f) {
  const uint32_t bits = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu));
  if (magnitude >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to inf
  if (magnitude < 0x38800000u) {
    // Result is subnormal (or zero): add the magic that aligns the mantissa, float rounding does RNE.
    const float shifted = bits_to_float(magnitude) + 0.5f;
    return static_cast<uint16_t>(sign | (float_to_bits(shifted) - 0x3f000000u));
  }
  uint32_t rounded = magnitude + 0xc8000fffu + ((magnitude >> 13) & 1u);  // rebias + RNE
  return static_cast<uint16_t>(sign | (rounded >> 13));
}

// Loads element `i` of a buffer of `dtype` as fp32.
inline float load_as_float(const void* data, int64_t i, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return static_cast<const float*>(data)[i];
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(data)[i]);
    case DType::kFloat16: return fp16_to_float(static_cast<const uint16_t*>(data)[i]);
  }
  return 0.0f;
}

// sum_r t_row[r] · B[n, r] in fp32: B [rows, rank] of `dtype`, or int8 q with B[n, r] = b_scales[n] · q[n, r]
// when b_scales is set (an int8 adapter: the scale applied once to the row's sum).
inline float adapter_row_sum(const float* t_row, const void* b, const float* b_scales, int64_t n, int64_t rank,
                             DType dtype) {
  float sum = 0.0f;
  if (b_scales != nullptr) {
    const int8_t* q = static_cast<const int8_t*>(b) + n * rank;
    for (int64_t r = 0; r < rank; ++r) sum += t_row[r] * static_cast<float>(q[r]);
    return b_scales[n] * sum;
  }
  for (int64_t r = 0; r < rank; ++r) sum += t_row[r] * load_as_float(b, n * rank + r, dtype);
  return sum;
}

// Stores fp32 `v` as element `i` of a buffer of `dtype` (round to nearest even).
inline void store_from_float(void* data, int64_t i, float v, DType dtype) {
  switch (dtype) {
    case DType::kFloat32: static_cast<float*>(data)[i] = v; return;
    case DType::kBFloat16: static_cast<uint16_t*>(data)[i] = float_to_bf16(v); return;
    case DType::kFloat16: static_cast<uint16_t*>(data)[i] = float_to_fp16(v); return;
  }
}

// True when the stored element is not zero (-0.0 counts as zero, NaN as nonzero).
inline bool is_nonzero(const void* data, int64_t i, DType dtype) {
  if (dtype == DType::kFloat32) {
    return (float_to_bits(static_cast<const float*>(data)[i]) & 0x7fffffffu) != 0;
  }
  return (static_cast<const uint16_t*>(data)[i] & 0x7fffu) != 0;
}

}  // namespace salr::kernels

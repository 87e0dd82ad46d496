// AVX2 row expansion shared by the AVX2 translation units (spmm_avx2.cpp, decode_avx2.cpp; both
// built with -mavx2 -mfma -mf16c): one table entry per 8-bit row mask places a tile row's packed
// values in their 8 column slots (zeros elsewhere), plus the per-dtype loads and stores.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace salr::kernels {
namespace {

constexpr int64_t kPad = 8;  // a row expansion reads 8 elements from the row's first value

// Expansion tables, one entry per row mask, built by code at static init.
struct Tables {
  alignas(32) uint8_t bf16[256][32];    // vpshufb of a broadcast 16-byte load: bf16 -> fp32 bits
  alignas(16) uint8_t fp16[256][16];    // pshufb: packed halves to their slots, zero elsewhere
  alignas(16) uint8_t tail16[256][16];  // the same from a 16-byte window the row's values end

  // fp32: the vpermps source lane of each slot (low 3 bits), with the sign bit set where the slot
  // holds a value (the vblendvps selector): one load per row instead of an index and a keep mask.
  alignas(32) uint32_t f32[256][8];
  Tables() {
    for (int mask = 0; mask < 256; ++mask) {
      int j = 0;  // index of the next packed value
      for (int c = 0; c < 8; ++c) {
        const bool set = (mask >> c) & 1;
        for (int b = 0; b < 4; ++b) bf16[mask][4 * c + b] = 0x80;
        fp16[mask][2 * c] = fp16[mask][2 * c + 1] = 0x80;
        f32[mask][c] = set ? (0x80000000u | static_cast<uint32_t>(j)) : 0u;
        tail16[mask][2 * c] = tail16[mask][2 * c + 1] = 0x80;
        if (!set) continue;
        bf16[mask][4 * c + 2] = static_cast<uint8_t>(2 * j);  // bf16 is the high half of fp32
        bf16[mask][4 * c + 3] = static_cast<uint8_t>(2 * j + 1);
        fp16[mask][2 * c] = static_cast<uint8_t>(2 * j);
        fp16[mask][2 * c + 1] = static_cast<uint8_t>(2 * j + 1);
        ++j;
      }
      for (int b = 0; b < 16; ++b) {  // value j sits at element 8 - popcount + j of the window
        tail16[mask][b] = fp16[mask][b] == 0x80 ? 0x80 : static_cast<uint8_t>(fp16[mask][b] + 2 * (8 - j));
      }
    }
  }
};
const Tables g_tables;

// Per-dtype loads, stores and row expansion: the three template instantiations of every kernel.
struct Bf16 {
  using T = uint16_t;
  static constexpr int kEntryShift = 5;  // log2 of the table entry size in bytes
  // One row of a tile: 8 packed values from p, placed by the shuffle at byte `entry` of the table
  // (mask << kEntryShift: the kernels precompute it for a whole group at once).
  static __m256 row_at(const T* p, unsigned entry) {
    const __m256i src = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i ctl = _mm256_load_si256(reinterpret_cast<const __m256i*>(&g_tables.bf16[0][0] + entry));
    return _mm256_castsi256_ps(_mm256_shuffle_epi8(src, ctl));
  }
  static __m256 row(const T* p, unsigned mask) { return row_at(p, mask << kEntryShift); }
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
  static constexpr int kEntryShift = 4;
  static __m256 row_at(const T* p, unsigned entry) {
    const __m128i src = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i ctl = _mm_load_si128(reinterpret_cast<const __m128i*>(&g_tables.fp16[0][0] + entry));
    return _mm256_cvtph_ps(_mm_shuffle_epi8(src, ctl));
  }
  static __m256 row(const T* p, unsigned mask) { return row_at(p, mask << kEntryShift); }
  static __m256 load8(const T* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // vcvtps2ph rounds to nearest even and quiets NaN exactly like numeric.h's float_to_fp16.
  static void store8(T* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

struct F32 {
  using T = float;
  static constexpr int kEntryShift = 5;
  static __m256 row_at(const T* p, unsigned entry) {
    const char* e = reinterpret_cast<const char*>(&g_tables.f32[0][0]) + entry;
    const __m256i sel = _mm256_load_si256(reinterpret_cast<const __m256i*>(e));
    const __m256 placed = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), sel);
    return _mm256_blendv_ps(_mm256_setzero_ps(), placed, _mm256_castsi256_ps(sel));
  }
  static __m256 row(const T* p, unsigned mask) { return row_at(p, mask << kEntryShift); }
  static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  static void store8(T* p, __m256 v) { _mm256_storeu_ps(p, v); }
};

// int8 rows of an int8 adapter (only load8: the adapter epilogue and projection read whole rows).
struct I8 {
  using T = int8_t;
  static __m256 load8(const T* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

// The calling thread's fp32 scratch (x rows, t rows, decoded groups, accumulators), reused across
// calls so that a kernel call allocates nothing once warm. One per translation unit and thread;
// valid until the next call into the same file's kernels on this thread.
inline float* float_scratch(size_t count) {
  thread_local std::vector<float> storage;
  if (storage.size() < count) storage.resize(count);
  return storage.data();
}

// Prefetch `bytes` past p, in integer arithmetic: the address may lie past the array (no fault).
inline void prefetch_ahead(const void* p, int64_t bytes) {
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + bytes), _MM_HINT_T0);
}

// Offset of tile row r's first value inside the tile: popcount of the bits of rows < r.
inline int64_t row_offset(uint64_t word, int r) {
  return r == 0 ? 0 : static_cast<int64_t>(_mm_popcnt_u64(_bzhi_u64(word, 8 * r)));
}

// Offsets of the eight tile rows' first values inside the tile, byte r = popcount of rows < r:
// byte popcounts (SWAR) and an exclusive prefix by one multiplication, no serial popcount chain.
inline uint64_t row_offsets(uint64_t word) {
  uint64_t c = word - ((word >> 1) & 0x5555555555555555ull);
  c = (c & 0x3333333333333333ull) + ((c >> 2) & 0x3333333333333333ull);
  c = (c + (c >> 4)) & 0x0f0f0f0f0f0f0f0full;  // byte r: popcount of row r (<= 8)
  return c * 0x0101010101010100ull;            // byte r: sum of bytes < r (<= 56: no carry)
}

// Rotation by a constant, which BMI2 does in one non-destructive rorx (a shift needs a copy first).
inline uint64_t rotate_right(uint64_t v, int n) { return n == 0 ? v : (v >> n) | (v << (64 - n)); }

// acc[r] += row r of one tile * the tile's 8 x columns (fp32, fp16, int8). Each row costs two loads (its
// values and its table entry), the expansion and one FMA; its offset and table entry are cut out of
// `offs` and `word` in registers. Why registers: index bytes read from memory cost load slots, and
// loads (about two per cycle on the Zen 5 measured, bench/RESULTS.md) are what the loop runs out of.

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

}  // namespace
}  // namespace salr::kernels

// Torch-free CPU kernels over the BM8x8 format (design.md §1, convention 6).
//
// Every ISA (scalar, AVX2, AVX-512) implements the same two entry points; the ATen glue owns
// argument checks, allocation and threading, and hands each thread a range of bands (forward) or
// of 64-column groups (transposed product). Accumulation is always in fp32.
#pragma once

#include <cstdint>

namespace salr::kernels {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline int element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// A read-only view of one BM8x8 weight of logical shape [rows, cols].
struct SparseWeightView {
  const uint64_t* bitmap;  // [num_bands(rows), tiles_per_band(cols)]
  const void* values;      // nonzeros of `dtype` in tile order
  const int32_t* offsets;  // [num_offsets(rows, cols)]
  int64_t values_count;    // length of `values`: every read is checked against it
  int64_t rows;
  int64_t cols;
  DType dtype;
};

// y[i, n] = sum_k x[i, k] * W[n, k] + sum_r t[i, r] * adapter_b[n, r] + bias[n]
// x, y, adapter_b and bias share the weight's dtype; t is fp32 (x·Aᵀ, computed once by the glue).
// An int8 adapter (issue 21): adapter_b holds int8 q with B[n, r] = adapter_b_scales[n] · q[n, r].
struct GemmArgs {
  SparseWeightView weight;
  const void* x;           // [m, cols], element (i, k) at x[i * x_row_stride + k]
  int64_t m;
  int64_t x_row_stride;
  void* y;                 // [m, rows], element (i, n) at y[i * y_row_stride + n]; overwritten
  int64_t y_row_stride;
  const float* t;          // [m, rank] contiguous, or nullptr when there is no adapter
  const void* adapter_b;   // [rows, rank] contiguous, or nullptr
  int64_t rank;
  const void* bias;        // [rows], or nullptr
  const float* adapter_b_scales = nullptr;  // [rows]: adapter_b is int8; nullptr: of the weight's dtype
};

// Kernels never trust the index: before reading a (band, group) they check that its bitmap words
// agree with offsets and leave the padding empty (group_check.h). They return -1 when all was
// consistent, else the offsets index band * groups + group of the first bad group they met (the
// glue then raises; the output is garbage).

// Writes y[:, 8*band_begin : min(8*band_end, rows)] for every row of x.
using GemmBandsFn = int64_t (*)(const GemmArgs& args, int64_t band_begin, int64_t band_end);

// dx[i, k] = sum_n dy[i, n] * W[n, k]: the x-gradient, over the same bitmap (no decoded W).
struct GemmTransposedArgs {
  SparseWeightView weight;
  const void* dy;          // [m, rows], element (i, n) at dy[i * dy_row_stride + n]
  int64_t m;
  int64_t dy_row_stride;
  void* dx;                // [m, cols], element (i, k) at dx[i * dx_row_stride + k]; overwritten
  int64_t dx_row_stride;
};

// Writes dx[:, 64*group_begin : min(64*group_end, cols)] for every row of dy.
using GemmTransposedGroupsFn = int64_t (*)(const GemmTransposedArgs& args, int64_t group_begin,
                                        int64_t group_end);

// Writes the dense rows of bands [begin, end) (zeros included) into `dense`, a row-major
// [rows, cols] matrix (band b's rows start at dense + 8*b*cols elements). Feeds the large-M paths.
using DecodeBandsFn = int64_t (*)(const SparseWeightView& weight, void* dense, int64_t band_begin,
                                  int64_t band_end);

// t[i, r] = sum_k x[i, k] * a[r, k] in fp32: the adapter's rank-R intermediate T = x·Aᵀ of the
// kernel path (small M), computed once per call before the bands run.
struct AdapterProjectArgs {
  const void* x;  // [m, cols], row stride x_row_stride, of `dtype`
  int64_t m;
  int64_t x_row_stride;
  const void* a;  // [rank, cols] contiguous, of `dtype` (int8 when a_int8: an int8 adapter's unscaled A)
  int64_t rank;
  int64_t cols;
  DType dtype;
  float* t;  // [m, rank] contiguous; columns [rank_begin, rank_end) overwritten
  bool a_int8 = false;
  // The rows of A this call projects (a parallel task's share); the whole adapter when rank_end <= 0.
  int64_t rank_begin = 0;
  int64_t rank_end = 0;
  int64_t row_end() const { return rank_end > 0 ? rank_end : rank; }
};
using AdapterProjectFn = void (*)(const AdapterProjectArgs& args);

struct KernelTable {
  const char* name;
  GemmBandsFn gemm;
  GemmTransposedGroupsFn gemm_transposed;
  DecodeBandsFn decode;
  AdapterProjectFn adapter_project;
};

// The SIMD decoders live in their own files (decode_avx2.cpp, decode_avx512.cpp) and are wired into
// the tables; the AVX-512 table shares the AVX2 adapter projection (a GEMV over cache-resident A).
int64_t decode_bands_avx2(const SparseWeightView& weight, void* dense, int64_t band_begin, int64_t band_end);
int64_t decode_bands_avx512(const SparseWeightView& weight, void* dense, int64_t band_begin,
                            int64_t band_end);
void adapter_project_avx2(const AdapterProjectArgs& args);

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Each returns nullptr when that ISA's translation unit was not compiled in.
const KernelTable* scalar_kernel_table();
const KernelTable* avx2_kernel_table();
const KernelTable* avx512_kernel_table();

// --- ISA selection (isa_dispatch.cpp) ---------------------------------------------------------
const char* isa_name(Isa isa);
bool cpu_supports(Isa isa);         // cpuid (and the OS) allow it
bool isa_compiled(Isa isa);         // its translation unit is in this build
Isa best_available_isa();
// Parses SALR_CPU_ISA (scalar|avx2|avx512|auto). Returns false and fills `error` on a bad value or
// an ISA this CPU or build cannot run; otherwise the ISA to use.
bool selected_isa(Isa* isa, const char** error);
const KernelTable& kernel_table(Isa isa);
// The dtype the large-M path (decode + ATen GEMM) computes in for a weight of `dtype`: 16-bit
// weights widen to fp32 where torch has no fast 16-bit GEMM. Parses SALR_CPU_DENSE_GEMM
// (auto|native|fp32); false and `error` on a bad value (isa_dispatch.cpp says why the rule is so).
bool selected_dense_gemm_dtype(DType dtype, DType* gemm_dtype, const char** error);

// --- Format codec (bitmap_codec.cpp, scalar: encode/decode are not on the inference hot path) --
// Pass 1 of encode: bitmap words and value counts per (band, group) for bands [begin, end).
// `group_counts` has the offsets layout without the sentinel.
void encode_count(const void* dense, int64_t rows, int64_t cols, DType dtype, uint64_t* bitmap,
                  int32_t* group_counts, int64_t band_begin, int64_t band_end);
// Pass 2 of encode: copies the nonzeros of bands [begin, end) to their offsets.
void encode_fill(const void* dense, const SparseWeightView& out, void* values, int64_t band_begin,
                 int64_t band_end);
// decode_bands and gather_bands return -1 or the first bad group, like the GEMM kernels.
// Writes the dense [rows, cols] rows of bands [begin, end) (zeros included).
int64_t decode_bands(const SparseWeightView& weight, void* dense, int64_t band_begin,
                     int64_t band_end);
// Sampled product compaction: copies the mask positions of `dense_rows` (fp32, rows
// [8*band_begin, ...) of a [rows, cols] matrix, row stride `row_stride`, first row = band_begin's)
// into `values` (weight dtype), i.e. values of bands [begin, end).
int64_t gather_bands(const SparseWeightView& weight, const float* dense_rows, int64_t row_stride,
                     void* values, int64_t band_begin, int64_t band_end);

}  // namespace salr::kernels

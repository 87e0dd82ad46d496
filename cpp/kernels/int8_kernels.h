// Torch-free CPU kernels over BM8x8 weights with int8 values and fp32 scales (issue 21).
//
// Same walk, checks and threading contract as the float kernels (kernels.h); what differs is the
// value type and the dequantization: W[n, k] = scale(n, k) · q[n, k], with one scale per output row
// or per (row, 64-column group), the offsets' groups. Activations (x, y, adapter_b, bias, dy, dx) are
// of any float DType; accumulation is fp32 and the scale is applied once per row (per group) to the
// row's (group's) accumulated sum.
#pragma once

#include <cstdint>

#include "kernels.h"

namespace salr::kernels {

struct Int8WeightView {
  SparseWeightView index;  // bitmap, offsets, value count and shape; index.values -> int8 (index.dtype unused)
  const float* scales;     // [rows, scale_groups] row-major
  int64_t scale_groups;    // 1: one scale per row; groups_per_band(cols): one per 64-column group
};

// The scale of row n's 64-column group g.
inline float int8_scale(const Int8WeightView& w, int64_t n, int64_t group) {
  return w.scales[n * w.scale_groups + (w.scale_groups == 1 ? 0 : group)];
}

// y[i, n] = sum_k x[i, k] · W[n, k] + sum_r t[i, r] · adapter_b[n, r] + bias[n]; x, y, adapter_b and
// bias of `dtype`, t fp32 (x·Aᵀ, computed by the glue with the float table's adapter_project).
struct Int8GemmArgs {
  Int8WeightView weight;
  DType dtype;
  const void* x;  // [m, cols], row stride x_row_stride
  int64_t m;
  int64_t x_row_stride;
  void* y;  // [m, rows], row stride y_row_stride; overwritten
  int64_t y_row_stride;
  const float* t;          // [m, rank] or nullptr
  const void* adapter_b;   // [rows, rank] contiguous or nullptr
  int64_t rank;
  const void* bias;        // [rows] or nullptr
  const float* adapter_b_scales = nullptr;  // [rows]: adapter_b is int8 (GemmArgs has the rule)
};
// Writes y[:, 8*band_begin : min(8*band_end, rows)]; returns -1 or the first bad group (kernels.h).
using Int8GemmBandsFn = int64_t (*)(const Int8GemmArgs& args, int64_t band_begin, int64_t band_end);

// dx[i, k] = sum_n dy[i, n] · W[n, k]; dy and dx of `dtype`.
struct Int8GemmTransposedArgs {
  Int8WeightView weight;
  DType dtype;
  const void* dy;  // [m, rows], row stride dy_row_stride
  int64_t m;
  int64_t dy_row_stride;
  void* dx;  // [m, cols], row stride dx_row_stride; overwritten
  int64_t dx_row_stride;
};
// Writes dx[:, 64*group_begin : min(64*group_end, cols)].
using Int8GemmTransposedGroupsFn = int64_t (*)(const Int8GemmTransposedArgs& args, int64_t group_begin,
                                               int64_t group_end);

// Writes the dequantized dense rows of bands [begin, end) (zeros included) as `dtype` into the
// row-major [rows, cols] `dense` (band b's rows start at dense + 8*b*cols elements): the large-M paths.
using Int8DequantizeBandsFn = int64_t (*)(const Int8WeightView& weight, DType dtype, void* dense,
                                          int64_t band_begin, int64_t band_end);

struct Int8KernelTable {
  const char* name;
  Int8GemmBandsFn gemm;
  Int8GemmTransposedGroupsFn gemm_transposed;
  Int8DequantizeBandsFn dequantize;
};

// The scalar dequantizer (int8_scalar.cpp), in every table: it feeds the large-M paths, where the
// ATen GEMM on the chunk dominates the time.
int64_t dequantize_bands_int8(const Int8WeightView& weight, DType dtype, void* dense, int64_t band_begin,
                              int64_t band_end);

const Int8KernelTable* scalar_int8_table();
// nullptr when that ISA's translation unit is not built.
const Int8KernelTable* avx2_int8_table();
const Int8KernelTable* avx512_int8_table();
// The table of `isa` (isa_dispatch.cpp picks it exactly as kernel_table does for floats).
const Int8KernelTable& int8_kernel_table(Isa isa);

// --- Codec (bitmap_codec.cpp): bitmap_encode / bitmap_decode of raw int8 values ----------------
void encode_count_int8(const int8_t* dense, int64_t rows, int64_t cols, uint64_t* bitmap, int32_t* group_counts,
                       int64_t band_begin, int64_t band_end);
void encode_fill_int8(const int8_t* dense, const SparseWeightView& index, int8_t* values, int64_t band_begin,
                      int64_t band_end);
int64_t decode_bands_int8(const SparseWeightView& index, int8_t* dense, int64_t band_begin, int64_t band_end);

}  // namespace salr::kernels

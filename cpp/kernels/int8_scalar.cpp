// Scalar kernels for int8 BM8x8 weights: the portable fallback and the oracle of the SIMD paths.
// Written for clarity: walk each group's set bits in storage order (group_check.h).
#include <algorithm>
#include <cstring>
#include <vector>

#include "group_check.h"
#include "int8_kernels.h"
#include "numeric.h"

namespace salr::kernels {
namespace {

// y[:, band rows] = x · W_bandᵀ + t · B_bandᵀ + bias, one row of x at a time. Each group's sum is
// scaled once (per-group scales) or the row's whole sum once (per-row scales).
int64_t gemm_bands_int8_scalar(const Int8GemmArgs& a, int64_t band_begin, int64_t band_end) {
  const Int8WeightView& w = a.weight;
  const GroupGeometry geo = geometry_of(w.index);
  const auto* q = static_cast<const int8_t*>(w.index.values);
  std::vector<float> x_row(static_cast<size_t>(geo.tiles * format::kTileEdge), 0.0f);
  for (int64_t i = 0; i < a.m; ++i) {
    for (int64_t k = 0; k < w.index.cols; ++k) x_row[k] = load_as_float(a.x, i * a.x_row_stride + k, a.dtype);
    for (int64_t band = band_begin; band < band_end; ++band) {
      const int64_t row_end = std::min<int64_t>(8 * band + 8, w.index.rows);
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t group = 0; group < geo.groups; ++group) {
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const bool consistent = for_each_nonzero(w.index, geo, band, group, [&](int64_t t, int bit, int64_t v) {
          part[bit >> 3] += static_cast<float>(q[v]) * x_row[t * 8 + (bit & 7)];
        });
        if (!consistent) return band * geo.groups + group;
        for (int64_t n = 8 * band; n < row_end; ++n) {
          const float scale = w.scale_groups == 1 ? 1.0f : int8_scale(w, n, group);
          acc[n - 8 * band] += scale * part[n - 8 * band];
        }
      }
      for (int64_t n = 8 * band; n < row_end; ++n) {
        float out = w.scale_groups == 1 ? int8_scale(w, n, 0) * acc[n - 8 * band] : acc[n - 8 * band];
        if (a.rank > 0) out += adapter_row_sum(a.t + i * a.rank, a.adapter_b, a.adapter_b_scales, n, a.rank, a.dtype);
        if (a.bias != nullptr) out += load_as_float(a.bias, n, a.dtype);
        store_from_float(a.y, i * a.y_row_stride + n, out, a.dtype);
      }
    }
  }
  return -1;
}

// dx[:, group columns] = dy · W[:, group columns], W = scale · q per stored value (the weight is
// scaled, not dy: a large dy times a scale must not overflow on its own), accumulated in fp32.
int64_t gemm_transposed_groups_int8_scalar(const Int8GemmTransposedArgs& a, int64_t group_begin,
                                           int64_t group_end) {
  const Int8WeightView& w = a.weight;
  const GroupGeometry geo = geometry_of(w.index);
  const auto* q = static_cast<const int8_t*>(w.index.values);
  float acc[format::kGroupColumns];
  for (int64_t group = group_begin; group < group_end; ++group) {
    const int64_t col_begin = group * format::kGroupColumns;
    const int64_t col_end = std::min<int64_t>(col_begin + format::kGroupColumns, w.index.cols);
    for (int64_t i = 0; i < a.m; ++i) {
      std::fill(acc, acc + format::kGroupColumns, 0.0f);
      for (int64_t band = 0; band < geo.bands; ++band) {
        const bool consistent = for_each_nonzero(w.index, geo, band, group, [&](int64_t t, int bit, int64_t v) {
          const int64_t n = 8 * band + (bit >> 3);
          const float dy = load_as_float(a.dy, i * a.dy_row_stride + n, a.dtype);
          acc[(t - group_tile_begin(group)) * 8 + (bit & 7)] += dy * (int8_scale(w, n, group) * static_cast<float>(q[v]));
        });
        if (!consistent) return band * geo.groups + group;
      }
      for (int64_t k = col_begin; k < col_end; ++k) {
        store_from_float(a.dx, i * a.dx_row_stride + k, acc[k - col_begin], a.dtype);
      }
    }
  }
  return -1;
}

}  // namespace

// dense[n, k] = scale(n, k) · q[n, k] rounded once to `dtype`; zeros elsewhere.
int64_t dequantize_bands_int8(const Int8WeightView& w, DType dtype, void* dense, int64_t band_begin,
                              int64_t band_end) {
  const GroupGeometry geo = geometry_of(w.index);
  const int64_t cols = w.index.cols;
  const auto* q = static_cast<const int8_t*>(w.index.values);
  const int64_t row_begin = 8 * band_begin;
  const int64_t row_end = std::min<int64_t>(8 * band_end, w.index.rows);
  if (row_end > row_begin) {  // +0.0 is all-zero bits in every float dtype
    const int size = element_size(dtype);
    std::memset(static_cast<char*>(dense) + row_begin * cols * size, 0, (row_end - row_begin) * cols * size);
  }
  for (int64_t band = band_begin; band < band_end; ++band) {
    for (int64_t group = 0; group < geo.groups; ++group) {
      const bool consistent = for_each_nonzero(w.index, geo, band, group, [&](int64_t t, int bit, int64_t v) {
        const int64_t n = 8 * band + (bit >> 3);
        store_from_float(dense, n * cols + 8 * t + (bit & 7), int8_scale(w, n, group) * static_cast<float>(q[v]),
                         dtype);
      });
      if (!consistent) return band * geo.groups + group;
    }
  }
  return -1;
}

namespace {
const Int8KernelTable kScalarInt8Table{"scalar", gemm_bands_int8_scalar, gemm_transposed_groups_int8_scalar,
                                       dequantize_bands_int8};
}  // namespace

const Int8KernelTable* scalar_int8_table() { return &kScalarInt8Table; }

}  // namespace salr::kernels

// Scalar BM8x8 kernels: the portable fallback and the oracle the SIMD paths are tested against.
// Written for clarity: walk each tile's set bits in storage order.
#include <algorithm>
#include <vector>

#include "group_check.h"
#include "kernels.h"
#include "numeric.h"

namespace salr::kernels {
namespace {

// y[:, band rows] = x · W_bandᵀ + t · B_bandᵀ + bias, one output row of x at a time.
int64_t gemm_bands_scalar(const GemmArgs& a, int64_t band_begin, int64_t band_end) {
  const SparseWeightView& w = a.weight;
  const GroupGeometry geo = geometry_of(w);
  const DType dt = w.dtype;
  std::vector<float> x_row(static_cast<size_t>(geo.tiles * format::kTileEdge), 0.0f);
  for (int64_t i = 0; i < a.m; ++i) {
    for (int64_t k = 0; k < w.cols; ++k) x_row[k] = load_as_float(a.x, i * a.x_row_stride + k, dt);
    for (int64_t band = band_begin; band < band_end; ++band) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t group = 0; group < geo.groups; ++group) {
        const bool consistent = for_each_nonzero(w, geo, band, group, [&](int64_t t, int bit, int64_t v) {
          acc[bit >> 3] += load_as_float(w.values, v, dt) * x_row[t * 8 + (bit & 7)];
        });
        if (!consistent) return band * geo.groups + group;
      }
      const int64_t row_end = std::min<int64_t>(8 * band + 8, w.rows);
      for (int64_t n = 8 * band; n < row_end; ++n) {
        float out = acc[n - 8 * band];
        if (a.rank > 0) out += adapter_row_sum(a.t + i * a.rank, a.adapter_b, a.adapter_b_scales, n, a.rank, dt);
        if (a.bias != nullptr) out += load_as_float(a.bias, n, dt);
        store_from_float(a.y, i * a.y_row_stride + n, out, dt);
      }
    }
  }
  return -1;
}

// dx[:, group columns] = dy · W[:, group columns], accumulated over all bands in fp32.
int64_t gemm_transposed_groups_scalar(const GemmTransposedArgs& a, int64_t group_begin,
                                      int64_t group_end) {
  const SparseWeightView& w = a.weight;
  const GroupGeometry geo = geometry_of(w);
  const DType dt = w.dtype;
  float acc[format::kGroupColumns];
  for (int64_t group = group_begin; group < group_end; ++group) {
    const int64_t col_begin = group * format::kGroupColumns;
    const int64_t col_end = std::min<int64_t>(col_begin + format::kGroupColumns, w.cols);
    for (int64_t i = 0; i < a.m; ++i) {
      std::fill(acc, acc + format::kGroupColumns, 0.0f);
      for (int64_t band = 0; band < geo.bands; ++band) {
        const bool consistent = for_each_nonzero(w, geo, band, group, [&](int64_t t, int bit, int64_t v) {
          const float dy = load_as_float(a.dy, i * a.dy_row_stride + 8 * band + (bit >> 3), dt);
          acc[(t - group_tile_begin(group)) * 8 + (bit & 7)] += dy * load_as_float(w.values, v, dt);
        });
        if (!consistent) return band * geo.groups + group;
      }
      for (int64_t k = col_begin; k < col_end; ++k) {
        store_from_float(a.dx, i * a.dx_row_stride + k, acc[k - col_begin], dt);
      }
    }
  }
  return -1;
}

// t[i, r] = x[i, :] · A[r, :] in fp32.
void adapter_project_scalar(const AdapterProjectArgs& a) {
  for (int64_t i = 0; i < a.m; ++i) {
    for (int64_t r = a.rank_begin; r < a.row_end(); ++r) {
      float acc = 0.0f;
      for (int64_t k = 0; k < a.cols; ++k) {
        const float a_rk = a.a_int8 ? static_cast<float>(static_cast<const int8_t*>(a.a)[r * a.cols + k])
                                    : load_as_float(a.a, r * a.cols + k, a.dtype);
        acc += load_as_float(a.x, i * a.x_row_stride + k, a.dtype) * a_rk;
      }
      a.t[i * a.rank + r] = acc;
    }
  }
}

const KernelTable kScalarTable{"scalar", gemm_bands_scalar, gemm_transposed_groups_scalar, decode_bands,
                               adapter_project_scalar};

}  // namespace

const KernelTable* scalar_kernel_table() { return &kScalarTable; }

}  // namespace salr::kernels

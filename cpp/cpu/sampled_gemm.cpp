// salr.sampled_gemm on the CPU: (leftᵀ·right) at the bitmap's nonzeros (SDDMM), shaped like values.
// Computed a chunk of bands at a time (ATen GEMM into an fp32 scratch of a few MB, then the
// bitmap gathers the mask positions), so the dense N×K product never exists at once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "checks.h"
#include "op_checks.h"
#include "dense_chunks.h"

namespace salr {
namespace {

constexpr const char* kOp = "sampled_gemm";

at::Tensor sampled_gemm_cpu(const at::Tensor& left, const at::Tensor& right, const at::Tensor& bitmap,
                            const at::Tensor& values, const at::Tensor& offsets, int64_t out_features,
                            int64_t in_features) {
  const int64_t rows = out_features, cols = in_features;
  check_cpu(kOp, "values", values);
  check_sampled_gemm_args(kOp, left, right, bitmap, values, offsets, rows, cols);
  check_offsets_ends(kOp, values, offsets);

  at::Tensor out = at::empty_like(values);
  const at::Tensor left_f = left.to(at::kFloat);
  const at::Tensor right_f = right.to(at::kFloat);
  const kernels::SparseWeightView view = weight_view(bitmap, values, offsets, rows, cols);
  FirstBadGroup bad;
  for_each_band_chunk(rows, cols, [&](int64_t b0, int64_t b1, int64_t r0, int64_t r1) {
    const at::Tensor dense = at::mm(left_f.narrow(1, r0, r1 - r0).t(), right_f).contiguous();
    at::parallel_for(b0, b1, 1, [&](int64_t c0, int64_t c1) {
      const float* band_rows = dense.const_data_ptr<float>() + (8 * c0 - r0) * cols;
      bad.note(kernels::gather_bands(view, band_rows, cols, out.data_ptr(), c0, c1));
    });
    if (bad.index >= 0) fail_inconsistent(kOp, bad.index, cols);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(salr, CPU, m) { m.impl("sampled_gemm", &sampled_gemm_cpu); }

}  // namespace salr

// salr.bitmap_decode on the CPU: BM8x8 -> dense [rows, cols], every group checked first.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "parallel_checked.h"
#include "kernels/int8_kernels.h"
#include "op_checks.h"

namespace salr {
namespace {

constexpr const char* kOp = "bitmap_decode";

at::Tensor bitmap_decode_cpu(const at::Tensor& bitmap, const at::Tensor& values,
                             const at::Tensor& offsets, int64_t rows, int64_t cols) {
  check_cpu(kOp, "values", values);
  check_bitmap_decode_args(kOp, bitmap, values, offsets, rows, cols);
  check_offsets_ends(kOp, values, offsets);
  at::Tensor dense = at::empty({rows, cols}, values.options());
  const kernels::SparseWeightView view = weight_view(bitmap, values, offsets, rows, cols);
  const kernels::DecodeBandsFn decode = selected_kernels(kOp).decode;
  const bool int8 = values.scalar_type() == at::kChar;  // issue 21: raw int8 values, scales not applied
  parallel_checked(kOp, format::num_bands(rows), 1, cols, [&](int64_t b0, int64_t b1) {
    return int8 ? kernels::decode_bands_int8(view, dense.data_ptr<int8_t>(), b0, b1)
                : decode(view, dense.data_ptr(), b0, b1);
  });
  return dense;
}

}  // namespace

TORCH_LIBRARY_IMPL(salr, CPU, m) { m.impl("bitmap_decode", &bitmap_decode_cpu); }

}  // namespace salr

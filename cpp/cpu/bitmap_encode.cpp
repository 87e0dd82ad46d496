// salr.bitmap_encode on the CPU: dense [rows, cols] -> BM8x8 (bitmap, values, offsets); float or int8.
// Two passes over bands in parallel (count, then fill) with a serial prefix sum between them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "kernels/int8_kernels.h"
#include "op_checks.h"

namespace salr {
namespace {

constexpr const char* kOp = "bitmap_encode";

std::tuple<at::Tensor, at::Tensor, at::Tensor> bitmap_encode_cpu(const at::Tensor& dense_in) {
  check_cpu(kOp, "dense", dense_in);
  check_bitmap_encode_args(kOp, dense_in);
  const at::Tensor dense = dense_in.contiguous();
  const int64_t rows = dense.size(0), cols = dense.size(1);
  const int64_t bands = format::num_bands(rows), tiles = format::tiles_per_band(cols);
  const int64_t groups = format::groups_per_band(cols);
  const auto dtype = kernel_dtype(dense.scalar_type());

  at::Tensor bitmap = at::empty({bands, tiles}, dense.options().dtype(at::kLong));
  at::Tensor offsets = at::empty({bands * groups + 1}, dense.options().dtype(at::kInt));
  auto* words = reinterpret_cast<uint64_t*>(bitmap.data_ptr<int64_t>());
  int32_t* offs = offsets.data_ptr<int32_t>();
  // Pass 1 writes each group's count into offsets[index + 1]; the prefix sum turns counts into starts.
  const bool int8 = dense.scalar_type() == at::kChar;  // issue 21: quantized values, moved as bytes
  at::parallel_for(0, bands, 1, [&](int64_t b0, int64_t b1) {
    if (int8) {
      kernels::encode_count_int8(dense.const_data_ptr<int8_t>(), rows, cols, words, offs + 1, b0, b1);
    } else {
      kernels::encode_count(dense.const_data_ptr(), rows, cols, dtype, words, offs + 1, b0, b1);
    }
  });
  offs[0] = 0;
  int64_t running = 0;
  for (int64_t i = 1; i <= bands * groups; ++i) {
    running += offs[i];
    SALR_CHECK(running <= std::numeric_limits<int32_t>::max(), kOp,
               "dense has more than 2^31-1 nonzeros; split the weight (offsets are int32)");
    offs[i] = static_cast<int32_t>(running);
  }
  at::Tensor values = at::empty({running}, dense.options());
  const kernels::SparseWeightView view{words, nullptr, offs, running, rows, cols, dtype};
  at::parallel_for(0, bands, 1, [&](int64_t b0, int64_t b1) {
    if (int8) {
      kernels::encode_fill_int8(dense.const_data_ptr<int8_t>(), view, values.data_ptr<int8_t>(), b0, b1);
    } else {
      kernels::encode_fill(dense.const_data_ptr(), view, values.data_ptr(), b0, b1);
    }
  });
  return {bitmap, values, offsets};
}

}  // namespace

TORCH_LIBRARY_IMPL(salr, CPU, m) { m.impl("bitmap_encode", &bitmap_encode_cpu); }

}  // namespace salr

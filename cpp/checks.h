// Argument checks at the C++ boundary (convention 3): every message starts with the op's name and
// names the argument, so a bad call is an error a user can act on, never a crash.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <string>

#include "bitmap_format.h"
#include "kernels/kernels.h"

namespace salr {

#define SALR_CHECK(cond, op, ...) TORCH_CHECK((cond), "salr.", op, ": ", __VA_ARGS__)

inline bool is_weight_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// The dtypes `values` may have: a float weight, or int8 with fp32 scales (issue 21).
inline bool is_values_dtype(at::ScalarType t) { return is_weight_dtype(t) || t == at::kChar; }

inline kernels::DType kernel_dtype(at::ScalarType t) {
  if (t == at::kBFloat16) return kernels::DType::kBFloat16;
  if (t == at::kHalf) return kernels::DType::kFloat16;
  return kernels::DType::kFloat32;
}

inline void check_cpu(const char* op, const char* arg, const at::Tensor& t) {
  SALR_CHECK(t.device().is_cpu(), op, arg, " must be on the CPU here (this kernel is the CPU one), got ",
             t.device());
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType want) {
  SALR_CHECK(t.scalar_type() == want, op, arg, " must have dtype ", want, ", got ", t.scalar_type());
}

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  SALR_CHECK(t.dim() == dim, op, arg, " must be ", dim, "-D, got shape ", t.sizes());
}

// The three tensors of a BM8x8 weight of logical shape [rows, cols]: dtypes, shapes, layout and the
// O(1) parts of consistency. The kernels check every group's popcount against offsets as they go.
inline void check_bitmap_weight(const char* op, const at::Tensor& bitmap, const at::Tensor& values,
                                const at::Tensor& offsets, int64_t rows, int64_t cols) {
  SALR_CHECK(rows >= 0 && cols >= 0, op, "out_features and in_features must be >= 0, got ", rows,
             " and ", cols);
  check_dtype(op, "bitmap", bitmap, at::kLong);
  check_dtype(op, "offsets", offsets, at::kInt);
  SALR_CHECK(is_values_dtype(values.scalar_type()), op,
             "values must be float32, bfloat16, float16 or int8, got ", values.scalar_type());
  check_dim(op, "bitmap", bitmap, 2);
  check_dim(op, "values", values, 1);
  check_dim(op, "offsets", offsets, 1);
  const int64_t bands = format::num_bands(rows);
  const int64_t tiles = format::tiles_per_band(cols);
  SALR_CHECK(bitmap.size(0) == bands && bitmap.size(1) == tiles, op, "bitmap must have shape [",
             bands, ", ", tiles, "] for a [", rows, ", ", cols, "] weight, got ", bitmap.sizes());
  SALR_CHECK(offsets.size(0) == format::num_offsets(rows, cols), op, "offsets must have ",
             format::num_offsets(rows, cols), " entries for a [", rows, ", ", cols,
             "] weight, got ", offsets.size(0));
  SALR_CHECK(bitmap.is_contiguous(), op, "bitmap must be contiguous");
  SALR_CHECK(values.is_contiguous(), op, "values must be contiguous");
  SALR_CHECK(offsets.is_contiguous(), op, "offsets must be contiguous");
  SALR_CHECK(bitmap.device() == values.device() && offsets.device() == values.device(), op,
             "bitmap, values and offsets must be on one device, got ", bitmap.device(), ", ",
             values.device(), ", ", offsets.device());
}

// The O(1) half of the consistency check, on the CPU: the sentinel must equal the value count.
inline void check_offsets_ends(const char* op, const at::Tensor& values, const at::Tensor& offsets) {
  const int32_t* o = offsets.const_data_ptr<int32_t>();
  const int64_t last = offsets.size(0) - 1;
  SALR_CHECK(o[0] == 0, op, "offsets[0] must be 0, got ", o[0]);
  SALR_CHECK(o[last] == values.size(0), op, "offsets[-1] must equal the number of values (",
             values.size(0), "), got ", o[last], ": bitmap, values and offsets do not belong together");
}

inline kernels::SparseWeightView weight_view(const at::Tensor& bitmap, const at::Tensor& values,
                                             const at::Tensor& offsets, int64_t rows, int64_t cols) {
  return kernels::SparseWeightView{
      reinterpret_cast<const uint64_t*>(bitmap.const_data_ptr<int64_t>()),
      values.const_data_ptr(), offsets.const_data_ptr<int32_t>(), values.size(0), rows, cols,
      kernel_dtype(values.scalar_type())};
}

// Raised when a kernel met a group whose bitmap disagrees with offsets (or sets padding bits).
[[noreturn]] inline void fail_inconsistent(const char* op, int64_t bad_index, int64_t cols) {
  const int64_t groups = format::groups_per_band(cols);
  TORCH_CHECK(false, "salr.", op, ": bitmap, values and offsets are inconsistent at band ",
              bad_index / groups, ", column group ", bad_index % groups,
              " (the bitmap's popcount disagrees with offsets, or a padding bit is set)");
}

// The kernel table the dispatcher picked (cpuid, or SALR_CPU_ISA).
inline const kernels::KernelTable& selected_kernels(const char* op) {
  kernels::Isa isa;
  const char* error = nullptr;
  SALR_CHECK(kernels::selected_isa(&isa, &error), op, error);
  return kernels::kernel_table(isa);
}

// Records the first bad group any thread saw (kernels return -1 when all was consistent).
struct FirstBadGroup {
  std::atomic<int64_t> index{-1};
  void note(int64_t bad) {
    int64_t expected = -1;
    if (bad >= 0) index.compare_exchange_strong(expected, bad);
  }
};

}  // namespace salr

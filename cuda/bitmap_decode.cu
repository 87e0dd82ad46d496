// salr.bitmap_decode on CUDA: BM8x8 -> dense [rows, cols]. One warp per (band, 64-column group);
// lane l writes the group's columns 2l, 2l+1 of all 8 rows, finding each value with the popcount
// of its tile's bitmap below its bit (cuda_common.cuh, lane_tile). Also the decoder behind the
// dense (large-M) paths of the GEMM ops.
//
// Consistency: the op checks every group (popcounts against offsets, padding bits clear) on the
// GPU and raises the CPU's error after one device->host read of the result. The internal decode of
// the dense GEMM paths skips that read (it would force a sync into every large-M call): there the
// kernel only clamps every index, so a bad weight gives garbage but never a fault.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "cuda_common.cuh"

namespace salr::cuda {
namespace {

constexpr const char* kOp = "bitmap_decode";

// Element types are moved as raw bits: one instantiation per element size (2 bytes: bf16 and
// fp16; 4 bytes: fp32), since decoding never does arithmetic on a value.
template <typename Bits>
__global__ void __launch_bounds__(kCodecThreads) decode_kernel(const uint64_t* __restrict__ bitmap,
                                                              const Bits* __restrict__ values,
                                                              const int32_t* __restrict__ offsets,
                                                              int64_t nnz, int64_t rows, int64_t cols,
                                                              Bits* __restrict__ dense,
                                                              unsigned long long* bad_group) {
  const int lane = threadIdx.x & 31;
  const int64_t bands = format::num_bands(rows), tiles = format::tiles_per_band(cols);
  const int64_t groups = format::groups_per_band(cols);
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kCodecWarpsPerBlock + (threadIdx.x >> 5);
  if (index >= bands * groups) return;
  const int64_t band = index / groups, group = index % groups;
  const int64_t group_start = offsets[index];
  const LaneTile tile = lane_tile(bitmap, band, tiles, group, group_start, lane);
  const int64_t col0 = group * format::kGroupColumns + 2 * lane;
  bool padding_bit_set = false;
  for (int r = 0; r < format::kTileEdge; ++r) {
    const int64_t row = band * format::kTileEdge + r;
    for (int j = 0; j < 2; ++j) {
      const int bit = format::bit_of(r, format::mma_lane_pair_col(lane) + j);
      const bool set = (tile.word >> bit) & 1;
      const int64_t col = col0 + j;
      if (row >= rows || col >= cols) {
        padding_bit_set |= set;
        continue;
      }
      Bits v = 0;
      if (set && nnz > 0) {
        int64_t at = tile.value_start + format::values_before_bit(tile.word, bit);
        at = at < 0 ? 0 : (at >= nnz ? nnz - 1 : at);  // bounds only; a consistent weight never clamps
        v = values[at];
      }
      dense[row * cols + col] = v;
    }
  }
  if (bad_group == nullptr) return;
  // The group's popcount must equal its offsets span (the first lane of each tile counts it).
  int count = tile.exists ? format::popcount64(tile.word) : 0;
  count = (lane & 3) == 0 ? count : 0;
  for (int step = 16; step > 0; step >>= 1) count += __shfl_xor_sync(0xffffffffu, count, step);
  const bool bad = __any_sync(0xffffffffu, padding_bit_set) || count != offsets[index + 1] - group_start;
  if (bad && lane == 0) atomicMin(bad_group, static_cast<unsigned long long>(index));
}

template <typename Bits>
void launch_decode(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets, int64_t rows,
                   int64_t cols, at::Tensor& dense, const at::Tensor* bad_group) {
  const int64_t warps = format::num_bands(rows) * format::groups_per_band(cols);
  const int64_t blocks = (warps + kCodecWarpsPerBlock - 1) / kCodecWarpsPerBlock;
  decode_kernel<Bits><<<static_cast<unsigned>(blocks), kCodecThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint64_t*>(bitmap.const_data_ptr<int64_t>()),
      static_cast<const Bits*>(values.const_data_ptr()), offsets.const_data_ptr<int32_t>(), values.size(0), rows,
      cols, static_cast<Bits*>(dense.data_ptr()),
      bad_group ? reinterpret_cast<unsigned long long*>(bad_group->data_ptr<int64_t>()) : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor bitmap_decode_cuda(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets,
                              int64_t rows, int64_t cols) {
  check_cuda(kOp, "values", values);
  check_bitmap_weight(kOp, bitmap, values, offsets, rows, cols);
  const c10::cuda::CUDAGuard guard(values.device());
  // The same O(1) sentinel check as the CPU, plus the per-group check, in one device->host read.
  at::Tensor bad = at::full({1}, std::numeric_limits<int64_t>::max(), offsets.options().dtype(at::kLong));
  at::Tensor dense = decode_to_dense(bitmap, values, offsets, rows, cols, &bad);
  const at::Tensor ends = at::stack({offsets.select(0, 0).to(at::kLong),
                                     offsets.select(0, offsets.size(0) - 1).to(at::kLong), bad.select(0, 0)})
                              .cpu();
  const int64_t* e = ends.const_data_ptr<int64_t>();
  SALR_CHECK(e[0] == 0, kOp, "offsets[0] must be 0, got ", e[0]);
  SALR_CHECK(e[1] == values.size(0), kOp, "offsets[-1] must equal the number of values (", values.size(0),
             "), got ", e[1], ": bitmap, values and offsets do not belong together");
  if (e[2] != std::numeric_limits<int64_t>::max()) fail_inconsistent(kOp, e[2], cols);
  return dense;
}

}  // namespace

at::Tensor decode_to_dense(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets,
                           int64_t rows, int64_t cols, const at::Tensor* bad_group) {
  at::Tensor dense = at::empty({rows, cols}, values.options());
  if (rows == 0 || cols == 0) return dense;
  if (values.element_size() == 2) {
    launch_decode<uint16_t>(bitmap, values, offsets, rows, cols, dense, bad_group);
  } else {
    launch_decode<uint32_t>(bitmap, values, offsets, rows, cols, dense, bad_group);
  }
  return dense;
}

TORCH_LIBRARY_IMPL(salr, CUDA, m) { m.impl("bitmap_decode", &bitmap_decode_cuda); }

}  // namespace salr::cuda

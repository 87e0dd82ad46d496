// salr.bitmap_encode on CUDA: dense [rows, cols] -> BM8x8 (bitmap, values, offsets).
//   1. count: one warp per (band, 64-column group) builds the group's 8 tile words from two ballots
//      per row and writes the group's value count;
//   2. an inclusive scan of the counts (ATen) gives offsets; its last entry, read on the host, sizes
//      values (the one sync: the output size depends on the data);
//   3. gather: the same warps copy every nonzero to its value index (popcount prefix + popcount
//      below the bit). The gather kernel also serves sampled_gemm (the product at the bitmap).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "cuda_common.cuh"

namespace salr::cuda {
namespace {

constexpr const char* kOp = "bitmap_encode";

// Nonzero test on raw bits: +0 and -0 are zero (the reference's `dense != 0`), NaN is a value.
__device__ __forceinline__ bool is_nonzero(uint8_t bits) { return bits != 0; }  // int8 (issue 21)
__device__ __forceinline__ bool is_nonzero(uint16_t bits) { return (bits & 0x7fffu) != 0; }
__device__ __forceinline__ bool is_nonzero(uint32_t bits) { return (bits & 0x7fffffffu) != 0; }

// Spreads 4 bits to the even positions of a byte: lanes hold columns 2c and 2c+1 of a tile row in
// two ballots, and the tile's row byte interleaves them.
__device__ __forceinline__ uint32_t spread_even(uint32_t nibble) {
  return (nibble & 1u) | ((nibble & 2u) << 1) | ((nibble & 4u) << 2) | ((nibble & 8u) << 3);
}

// One instantiation per element size (raw bits; no arithmetic on values).
template <typename Bits>
__global__ void __launch_bounds__(kCodecThreads) count_kernel(const Bits* __restrict__ dense, int64_t rows,
                                                             int64_t cols, uint64_t* __restrict__ bitmap,
                                                             int32_t* __restrict__ counts) {
  const int lane = threadIdx.x & 31;
  const int64_t tiles = format::tiles_per_band(cols), groups = format::groups_per_band(cols);
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kCodecWarpsPerBlock + (threadIdx.x >> 5);
  if (index >= format::num_bands(rows) * groups) return;
  const int64_t band = index / groups, group = index % groups;
  const int64_t col0 = group * format::kGroupColumns + 2 * lane;
  uint64_t word = 0;  // lanes 0..7: the word of tile `lane` of the group
  for (int r = 0; r < format::kTileEdge; ++r) {
    const int64_t row = band * format::kTileEdge + r;
    const Bits* src = dense + row * cols;
    const bool in_row = row < rows;
    const uint32_t even = __ballot_sync(0xffffffffu, in_row && col0 < cols && is_nonzero(src[col0]));
    const uint32_t odd = __ballot_sync(0xffffffffu, in_row && col0 + 1 < cols && is_nonzero(src[col0 + 1]));
    const uint32_t byte = spread_even((even >> (4 * (lane & 7))) & 0xfu) |
                          (spread_even((odd >> (4 * (lane & 7))) & 0xfu) << 1);
    word |= static_cast<uint64_t>(byte) << (r * format::kTileEdge);
  }
  const int64_t tile = group * format::kTilesPerGroup + lane;
  const bool owns_tile = lane < format::kTilesPerGroup && tile < tiles;
  if (owns_tile) bitmap[band * tiles + tile] = word;
  int count = owns_tile ? format::popcount64(word) : 0;
  for (int step = 16; step > 0; step >>= 1) count += __shfl_xor_sync(0xffffffffu, count, step);
  if (lane == 0) counts[index] = count;
}

// out[value index] = src[row, col] at every set bit of the bitmap (indices clamped to out).
template <typename Bits>
__global__ void __launch_bounds__(kCodecThreads) gather_kernel(const Bits* __restrict__ src, int64_t rows,
                                                              int64_t cols, const uint64_t* __restrict__ bitmap,
                                                              const int32_t* __restrict__ offsets,
                                                              Bits* __restrict__ out, int64_t nnz) {
  const int lane = threadIdx.x & 31;
  const int64_t tiles = format::tiles_per_band(cols), groups = format::groups_per_band(cols);
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kCodecWarpsPerBlock + (threadIdx.x >> 5);
  if (index >= format::num_bands(rows) * groups) return;
  const int64_t band = index / groups, group = index % groups;
  const LaneTile tile = lane_tile(bitmap, band, tiles, group, offsets[index], lane);
  const int64_t col0 = group * format::kGroupColumns + 2 * lane;
  for (int r = 0; r < format::kTileEdge; ++r) {
    const int64_t row = band * format::kTileEdge + r;
    for (int j = 0; j < 2; ++j) {
      const int bit = format::bit_of(r, format::mma_lane_pair_col(lane) + j);
      const int64_t at = tile.value_start + format::values_before_bit(tile.word, bit);
      if (((tile.word >> bit) & 1) && row < rows && col0 + j < cols && at >= 0 && at < nnz) {
        out[at] = src[row * cols + col0 + j];
      }
    }
  }
}

int64_t codec_blocks(int64_t rows, int64_t cols) {
  const int64_t warps = format::num_bands(rows) * format::groups_per_band(cols);
  return (warps + kCodecWarpsPerBlock - 1) / kCodecWarpsPerBlock;
}

template <typename Bits>
void launch_count(const at::Tensor& dense, at::Tensor& bitmap, at::Tensor& counts) {
  const int64_t rows = dense.size(0), cols = dense.size(1);
  count_kernel<Bits><<<static_cast<unsigned>(codec_blocks(rows, cols)), kCodecThreads, 0,
                       c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const Bits*>(dense.const_data_ptr()), rows, cols,
      reinterpret_cast<uint64_t*>(bitmap.data_ptr<int64_t>()), counts.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Bits>
void launch_gather(const at::Tensor& src, const at::Tensor& bitmap, const at::Tensor& offsets, at::Tensor& out) {
  const int64_t rows = src.size(0), cols = src.size(1);
  gather_kernel<Bits><<<static_cast<unsigned>(codec_blocks(rows, cols)), kCodecThreads, 0,
                        c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const Bits*>(src.const_data_ptr()), rows, cols,
      reinterpret_cast<const uint64_t*>(bitmap.const_data_ptr<int64_t>()), offsets.const_data_ptr<int32_t>(),
      static_cast<Bits*>(out.data_ptr()), out.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bitmap_encode_cuda(const at::Tensor& dense_in) {
  check_cuda(kOp, "dense", dense_in);
  check_bitmap_encode_args(kOp, dense_in);
  const c10::cuda::CUDAGuard guard(dense_in.device());
  const at::Tensor dense = dense_in.contiguous();
  const int64_t rows = dense.size(0), cols = dense.size(1);
  const int64_t bands = format::num_bands(rows), tiles = format::tiles_per_band(cols);
  const int64_t groups = format::groups_per_band(cols);
  at::Tensor bitmap = at::empty({bands, tiles}, dense.options().dtype(at::kLong));
  at::Tensor counts = at::empty({bands * groups}, dense.options().dtype(at::kInt));
  if (bands * groups == 0) {
    return {bitmap, at::empty({0}, dense.options()), at::zeros({1}, dense.options().dtype(at::kInt))};
  }
  if (dense.element_size() == 1) {
    launch_count<uint8_t>(dense, bitmap, counts);
  } else if (dense.element_size() == 2) {
    launch_count<uint16_t>(dense, bitmap, counts);
  } else {
    launch_count<uint32_t>(dense, bitmap, counts);
  }
  const at::Tensor ends = at::cumsum(counts, 0, at::kLong);
  const int64_t nnz = ends.select(0, ends.size(0) - 1).item<int64_t>();
  SALR_CHECK(nnz <= std::numeric_limits<int32_t>::max(), kOp,
             "dense has more than 2^31-1 nonzeros; split the weight (offsets are int32)");
  at::Tensor offsets = at::zeros({bands * groups + 1}, dense.options().dtype(at::kInt));
  offsets.narrow(0, 1, bands * groups).copy_(ends);
  at::Tensor values = at::empty({nnz}, dense.options());
  if (nnz > 0) gather_at_bitmap(dense, bitmap, offsets, values);
  return {bitmap, values, offsets};
}

}  // namespace

void gather_at_bitmap(const at::Tensor& dense, const at::Tensor& bitmap, const at::Tensor& offsets, at::Tensor& out) {
  if (dense.numel() == 0 || out.numel() == 0) return;
  if (out.element_size() == 1) {
    launch_gather<uint8_t>(dense, bitmap, offsets, out);
  } else if (out.element_size() == 2) {
    launch_gather<uint16_t>(dense, bitmap, offsets, out);
  } else {
    launch_gather<uint32_t>(dense, bitmap, offsets, out);
  }
}

TORCH_LIBRARY_IMPL(salr, CUDA, m) { m.impl("bitmap_encode", &bitmap_encode_cuda); }

}  // namespace salr::cuda

// salr.bitmap_decode on CUDA: BM8x8 -> dense [rows, cols]. One warp per (band, 64-column group);
// each lane expands two 8-element tile rows from the row's bitmap byte (decode_kernel). Also the
// decoder behind the dense (large-M) paths of the GEMM ops and of sparse_gemm_transposed.
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

// Element types are moved as raw bits: one instantiation per element size (1 byte: int8; 2 bytes:
// bf16 and fp16; 4 bytes: fp32), since decoding never does arithmetic on a value.
//
// Lane l owns tile (l % 8) of the warp's group, rows l / 8 and l / 8 + 4: it expands each row's
// 8-bit mask from consecutive values (one popcount for the row's start) and writes the 8 outputs
// with 16-byte stores when the rows allow it (vector_rows), so 8 lanes write one 128-byte row run.
template <typename Bits>
__global__ void __launch_bounds__(kCodecThreads) decode_kernel(const uint64_t* __restrict__ bitmap,
                                                              const Bits* __restrict__ values,
                                                              const int32_t* __restrict__ offsets,
                                                              int64_t nnz, int64_t rows, int64_t cols,
                                                              bool vector_rows, Bits* __restrict__ dense,
                                                              unsigned long long* bad_group) {
  const int lane = threadIdx.x & 31;
  const int64_t tiles = format::tiles_per_band(cols), groups = format::groups_per_band(cols);
  const int64_t index = static_cast<int64_t>(blockIdx.x) * kCodecWarpsPerBlock + (threadIdx.x >> 5);
  if (index >= format::num_bands(rows) * groups) return;
  const int64_t band = index / groups, group = index % groups;
  const int64_t group_start = offsets[index];
  const int tile_in_group = lane & 7;
  // The lane's tile word and where its values start (popcount prefix of the earlier tiles).
  uint64_t word = 0;
  int64_t tile_start = group_start;
  for (int t = 0; t < format::kTilesPerGroup; ++t) {
    const int64_t tile = group * format::kTilesPerGroup + t;
    const uint64_t w = tile < tiles ? bitmap[band * tiles + tile] : 0;
    if (t < tile_in_group) tile_start += format::popcount64(w);
    if (t == tile_in_group) word = w;
  }
  const int64_t col0 = (group * format::kTilesPerGroup + tile_in_group) * format::kTileEdge;
  const int64_t valid_cols = cols - col0 < 8 ? cols - col0 : 8;  // <= 0 past the band's last tile
  bool padding_bit_set = false;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = (lane >> 3) + 4 * half;
    const int64_t row = band * format::kTileEdge + r;
    const uint32_t mask = format::row_mask(word, r);
    int64_t at = tile_start + format::values_before_bit(word, format::bit_of(r, 0));
    Bits out[format::kTileEdge];
#pragma unroll
    for (int c = 0; c < format::kTileEdge; ++c) {
      const bool set = (mask >> c) & 1u;
      const int64_t clamped = at < 0 ? 0 : (at >= nnz ? nnz - 1 : at);  // bounds only
      out[c] = set && nnz > 0 ? values[clamped] : Bits{0};
      at += set;
    }
    if (row >= rows || valid_cols <= 0) {
      padding_bit_set |= mask != 0;
      continue;
    }
    if (valid_cols < 8) padding_bit_set |= (mask >> valid_cols) != 0;
    Bits* dst = dense + row * cols + col0;
    if (vector_rows && valid_cols == 8) {
      if constexpr (sizeof(Bits) == 1) {  // int8 values (issue 21): one 8-byte store
        uint32_t lo = 0, hi = 0;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          lo |= uint32_t{out[c]} << (8 * c);
          hi |= uint32_t{out[c + 4]} << (8 * c);
        }
        *reinterpret_cast<uint2*>(dst) = make_uint2(lo, hi);
      } else if constexpr (sizeof(Bits) == 2) {
        *reinterpret_cast<uint4*>(dst) =
            make_uint4(out[0] | (uint32_t{out[1]} << 16), out[2] | (uint32_t{out[3]} << 16),
                       out[4] | (uint32_t{out[5]} << 16), out[6] | (uint32_t{out[7]} << 16));
      } else {
        reinterpret_cast<uint4*>(dst)[0] = make_uint4(out[0], out[1], out[2], out[3]);
        reinterpret_cast<uint4*>(dst)[1] = make_uint4(out[4], out[5], out[6], out[7]);
      }
    } else {
      for (int c = 0; c < valid_cols; ++c) dst[c] = out[c];
    }
  }
  if (bad_group == nullptr) return;
  // The group's popcount must equal its offsets span (lanes 0-7 count one tile each).
  int count = lane < format::kTilesPerGroup ? format::popcount64(word) : 0;
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
      cols, (cols * static_cast<int64_t>(sizeof(Bits))) % 16 == 0, static_cast<Bits*>(dense.data_ptr()),
      bad_group ? reinterpret_cast<unsigned long long*>(bad_group->data_ptr<int64_t>()) : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor bitmap_decode_cuda(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets,
                              int64_t rows, int64_t cols) {
  check_cuda(kOp, "values", values);
  check_bitmap_decode_args(kOp, bitmap, values, offsets, rows, cols);
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
  if (values.element_size() == 1) {
    launch_decode<uint8_t>(bitmap, values, offsets, rows, cols, dense, bad_group);
  } else if (values.element_size() == 2) {
    launch_decode<uint16_t>(bitmap, values, offsets, rows, cols, dense, bad_group);
  } else {
    launch_decode<uint32_t>(bitmap, values, offsets, rows, cols, dense, bad_group);
  }
  return dense;
}

at::Tensor dense_weight(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets,
                        int64_t rows, int64_t cols, const std::optional<at::Tensor>& scales, at::ScalarType dtype) {
  const at::Tensor decoded = decode_to_dense(bitmap, values, offsets, rows, cols, nullptr);
  if (values.scalar_type() != at::kChar) return decoded;
  const at::Tensor per_column = scales->dim() == 1 ? scales->unsqueeze(1)
                                                   : scales->repeat_interleave(format::kGroupColumns, 1).narrow(1, 0, cols);
  return (decoded.to(at::kFloat) * per_column).to(dtype);
}

TORCH_LIBRARY_IMPL(salr, CUDA, m) { m.impl("bitmap_decode", &bitmap_decode_cuda); }

}  // namespace salr::cuda

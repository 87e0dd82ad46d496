// The sparse_lowrank_gemm forward on 2:4 weights (issue 17): mma.sp.m16n8k32 (bf16 / fp16) straight
// from the re-laid weight (cpp/sparse24_layout.h), no decode:
//   y[m, n] = sum_k x[m, k] W[n, k] + sum_r T[m, r] B[n, r] + bias[n],  T = x·Aᵀ (fp32, precomputed)
//
// One template, two shapes (Sparse24Shape): a block is 4 warps; each warp owns kRowBlocks 16-row
// blocks of W and all the block's tokens (kTokenTiles n8 tiles), so its A fragment is reused across
// the tokens and each B fragment (one ldmatrix.x4 per n8 tile and k32 step) across its row blocks.
//   * Decode (M <= 16): 1 row block x 2 token tiles per warp, 4 k32 tiles per stage, split-K (as the
//     unstructured kernel) so the weight is streamed once by enough blocks to fill the GPU.
//   * Tiled (larger M): 2 row blocks x 8 token tiles (128 rows x 64 tokens per block), 1 k32 tile
//     per stage, 4 stages.
// Per stage the block cp.async's (bulk 16-byte copies) its warps' contiguous tile runs (576 bytes
// per 16x32 tile) and the x slab into a shared ring; each lane then reads its 16-byte A operand
// (conflict-free, lane-major) and its metadata word. Every copy is unconditional: out-of-range tiles,
// rows and tokens are zero-filled (src-size 0), so the main loop has no branch but its back edge.
//
// Torch-free (cuda/budget/sparse24.cu compiles it alone for the static gate).
#pragma once

#include <cstdint>
#include <type_traits>

#include "device_common.cuh"
#include "sparse24_layout.h"

namespace salr::cuda::mma24 {

using salr::cuda::Half16;
namespace layout = salr::sparse24;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunksPerTile = layout::kTileHalves * 2 / 16;  // 36 16-byte copies per 576-byte tile

template <int kTokenTiles_, int kRowBlocks_, int kKTiles_, int kStages_, int kMinBlocks_>
struct Sparse24Shape {
  static constexpr int kTokenTiles = kTokenTiles_;          // n8 tiles per warp (all the block's tokens)
  static constexpr int kRowBlocks = kRowBlocks_;            // 16-row blocks per warp
  static constexpr int kKTiles = kKTiles_;                  // k32 tiles per pipeline stage
  static constexpr int kStages = kStages_;
  static constexpr int kMinBlocks = kMinBlocks_;            // per SM: caps registers (launch bounds)
  static constexpr int kTokens = 8 * kTokenTiles;
  static constexpr int kBlockRowBlocks = kWarps * kRowBlocks;
  static constexpr int kStageCols = layout::kTileCols * kKTiles;
  static constexpr int kXRow = kStageCols + 8;              // +16 B: conflict-free ldmatrix rows
  static constexpr int kRunChunks = kKTiles * kChunksPerTile;         // 16-byte copies per row block
  static constexpr int kWarpChunks = kRowBlocks * kRunChunks;
  static constexpr int kWarpChunksPadded = (kWarpChunks + 31) / 32 * 32;  // every lane copies every time
  static constexpr int kWarpHalves = kWarpChunksPadded * 8;
};

using DecodeShape = Sparse24Shape<2, 1, 4, 3, 4>;
using TiledShape = Sparse24Shape<8, 2, 1, 4, 2>;  // 64 accumulators per lane: up to 255 registers
constexpr int64_t kDecodeMaxRows = DecodeShape::kTokens;  // M <= 16 takes the decode shape

template <class S>
struct __align__(16) Stage24 {
  uint16_t weights[kWarps][S::kWarpHalves];  // per warp: row block r's kKTiles tiles at r * kKTiles
  uint16_t x[S::kTokens][S::kXRow];
};

template <class S>
struct Shared24 {
  static constexpr int kBlockRows = S::kBlockRowBlocks * layout::kTileRows;
  static constexpr int kOutStride = kBlockRows + 4;  // +4 floats: the lanes' scattered writes hit 32 banks
  union {
    Stage24<S> stages[S::kStages];
    float out[S::kTokens][kOutStride];  // after the main loop: the block's fp32 tile, token-major
  };
  int is_last_block;
};

struct Params24 {
  const uint16_t* tiles;  // [row_blocks, k_blocks, kTileHalves], 16-byte aligned
  int64_t row_blocks, k_blocks;
  const uint16_t* x;      // [m, ldx], 16-byte aligned rows, columns >= cols8 never read
  int64_t ldx, cols8, m;
  uint16_t* y;            // [m, rows] contiguous
  int64_t rows;
  const float* t;             // [m, rank] or nullptr
  const uint16_t* adapter_b;  // [rows, rank] or nullptr
  int64_t rank;
  const uint16_t* bias;  // [rows] or nullptr
  float* workspace;      // [splits, m, rows] when splits > 1
  int* counters;         // [grid.y * grid.x] zeros when splits > 1
  int splits, steps_per_split, steps;  // steps: pipeline stages over all of K
};

// ---- device helpers ---------------------------------------------------------------------------------

// Four 8x8 16-bit matrices from shared memory: the B fragment b0..b3 of one n8 tile and k32 step
// (matrix i = k columns 8i..8i+7 of 8 token rows; lane l gives the address of row l%8 of matrix l/8).
__device__ __forceinline__ void ldmatrix_x4(uint32_t b[4], const void* row_address) {
  const uint32_t address = shared_address(row_address);
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(address));
}

// acc (16x8 fp32) += A (16x32, 2:4: 4 registers + metadata, selector 0) * B (32x8, 4 registers).
template <typename Scalar>
__device__ __forceinline__ void mma_sp_m16n8k32(float acc[4], const uint4& a, const uint32_t b[4], uint32_t meta) {
  if constexpr (std::is_same_v<Scalar, __nv_bfloat16>) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
        "{%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(meta));
  }
}

// Issues the copies of pipeline step `step` (k32 tiles step * kKTiles ...) into `st`. Steps past
// the split's end copy zeros, so the caller issues one per iteration without a branch.
template <class S>
__device__ __forceinline__ void load_stage(const Params24& p, Stage24<S>& st, int64_t row_block0, int64_t token0,
                                           int step, bool in_range) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t first_tile = static_cast<int64_t>(step) * S::kKTiles;
  // The warp's kRowBlocks runs of kKTiles tiles, flattened; chunks past them land in the padding.
#pragma unroll
  for (int j = 0; j < S::kWarpChunksPadded / 32; ++j) {
    const int c = 32 * j + lane;
    const int run = c / S::kRunChunks, in_run = c % S::kRunChunks;
    const int64_t row_block = row_block0 + warp * S::kRowBlocks + run;
    const bool valid = in_range && c < S::kWarpChunks && row_block < p.row_blocks &&
                       first_tile + in_run / kChunksPerTile < p.k_blocks;
    const uint16_t* src = p.tiles + (row_block * p.k_blocks + first_tile) * layout::kTileHalves + 8 * in_run;
    cp_async_16(&st.weights[warp][8 * c], valid ? src : p.tiles, valid ? 16 : 0);
  }
  constexpr int kRowChunks = S::kStageCols / 8;
  static_assert(S::kTokens * kRowChunks % kThreads == 0, "whole x copies per thread");
#pragma unroll
  for (int j = 0; j < S::kTokens * kRowChunks / kThreads; ++j) {
    const int i = kThreads * j + threadIdx.x;
    const int token = i / kRowChunks, chunk = i % kRowChunks;
    const int64_t col = static_cast<int64_t>(step) * S::kStageCols + 8 * chunk;
    const bool valid = in_range && token0 + token < p.m && col < p.cols8;
    cp_async_16(&st.x[token][8 * chunk], valid ? p.x + (token0 + token) * p.ldx + col : p.x, valid ? 16 : 0);
  }
}

// The warp's mma work on one landed stage: kKTiles x kRowBlocks x kTokenTiles mma.sp.
template <typename Scalar, class S>
__device__ __forceinline__ void compute_stage(const Stage24<S>& st, float acc[S::kRowBlocks][S::kTokenTiles][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int meta_half = layout::kOperandHalves + 2 * layout::metadata_word_of_lane(lane);
#pragma unroll
  for (int kt = 0; kt < S::kKTiles; ++kt) {
    uint4 a[S::kRowBlocks];
    uint32_t meta[S::kRowBlocks];
#pragma unroll
    for (int r = 0; r < S::kRowBlocks; ++r) {
      const uint16_t* tile = st.weights[warp] + (r * S::kKTiles + kt) * layout::kTileHalves;
      a[r] = *reinterpret_cast<const uint4*>(tile + 8 * lane);
      meta[r] = *reinterpret_cast<const uint32_t*>(tile + meta_half);
    }
#pragma unroll
    for (int nt = 0; nt < S::kTokenTiles; ++nt) {
      uint32_t b[4];
      ldmatrix_x4(b, &st.x[8 * nt + (lane & 7)][layout::kTileCols * kt + 8 * (lane >> 3)]);
#pragma unroll
      for (int r = 0; r < S::kRowBlocks; ++r) mma_sp_m16n8k32<Scalar>(acc[r][nt], a[r], b, meta[r]);
    }
  }
}

// y = sum + T·Bᵀ + bias for one output element, rounded once.
template <typename Scalar>
__device__ __forceinline__ void store_output(const Params24& p, int64_t row, int64_t token, float sum) {
  if (p.rank > 0) {
    const float* t_row = p.t + token * p.rank;
    const uint16_t* b_row = p.adapter_b + row * p.rank;
    for (int64_t r = 0; r < p.rank; ++r) sum += t_row[r] * Half16<Scalar>::to_float(b_row[r]);
  }
  if (p.bias != nullptr) sum += Half16<Scalar>::to_float(p.bias[row]);
  p.y[token * p.rows + row] = Half16<Scalar>::from_float(sum);
}

template <typename Scalar, class S>
__global__ void __launch_bounds__(kThreads, S::kMinBlocks) sparse24_forward_kernel(const Params24 p) {
  __shared__ Shared24<S> smem;
  const int64_t row_block0 = static_cast<int64_t>(blockIdx.x) * S::kBlockRowBlocks;
  const int64_t token0 = static_cast<int64_t>(blockIdx.y) * S::kTokens;
  const int step_begin = static_cast<int>(blockIdx.z) * p.steps_per_split;
  const int steps = min(p.steps - step_begin, p.steps_per_split);

  float acc[S::kRowBlocks][S::kTokenTiles][4];
#pragma unroll
  for (int r = 0; r < S::kRowBlocks; ++r)
#pragma unroll
    for (int nt = 0; nt < S::kTokenTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][nt][i] = 0.f;

#pragma unroll
  for (int s = 0; s < S::kStages - 1; ++s) {
    load_stage<S>(p, smem.stages[s], row_block0, token0, step_begin + s, s < steps);
    cp_async_commit();
  }
  int read_slot = 0, write_slot = S::kStages - 1;
  // Budget per 16x32 2:4 tile (576 B): 132 SMs x 4 schedulers x 1.755 GHz / (0.9 x 4.8 TB/s / 576 B)
  // = 123.6 issue slots at H200 bandwidth, x ~0.65 issue efficiency = 80 warp-instructions. sm_90a
  // (sass_budget.py): decode 192 per iteration of 4 tiles = 48.0; tiled 150 per 2 tiles = 75.0 (each
  // tile then serves 64 tokens: compute-bound, the memory budget is only an upper bound there).
  // SALR_BUDGET kernel=sparse24_forward_kernel.*Sparse24ShapeILi2ELi1ELi4ELi3ELi4E tiles_per_iter=4 tile=16x32 bytes_per_tile=576 max_per_tile=80
  // SALR_BUDGET kernel=sparse24_forward_kernel.*Sparse24ShapeILi8ELi2ELi1ELi4ELi2E tiles_per_iter=2 tile=16x32 bytes_per_tile=576 max_per_tile=80
  for (int j = 0; j < steps; ++j) {
    cp_async_wait<S::kStages - 2>();
    __syncthreads();  // stage j landed for all threads; the slot written next was read at j - 1
    const int next = j + S::kStages - 1;
    load_stage<S>(p, smem.stages[write_slot], row_block0, token0, step_begin + next, next < steps);
    cp_async_commit();
    compute_stage<Scalar, S>(smem.stages[read_slot], acc);
    read_slot = read_slot == S::kStages - 1 ? 0 : read_slot + 1;
    write_slot = write_slot == S::kStages - 1 ? 0 : write_slot + 1;
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the stages: their memory becomes the output tile

  // Accumulators -> the block's tile in shared memory (mma C layout: rows g and g + 8, tokens 2t and
  // 2t + 1), so the stores below run along rows: coalesced, and a short loop instead of an unrolled
  // epilogue per accumulator.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < S::kRowBlocks; ++r)
#pragma unroll
    for (int nt = 0; nt < S::kTokenTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = (warp * S::kRowBlocks + r) * layout::kTileRows + (lane >> 2) + (i >= 2 ? 8 : 0);
        smem.out[8 * nt + 2 * (lane & 3) + (i & 1)][row] = acc[r][nt][i];
      }
  __syncthreads();

  constexpr int kBlockRows = Shared24<S>::kBlockRows;
  const int64_t row0 = row_block0 * layout::kTileRows;
  // Split-K: partial tiles to the workspace; the last block of a tile to arrive sums them in split
  // order (deterministic) and runs the epilogue.
  if (p.splits > 1) {
    for (int i = threadIdx.x; i < S::kTokens * kBlockRows; i += kThreads) {
      const int64_t token = token0 + i / kBlockRows, row = row0 + i % kBlockRows;
      if (token < p.m && row < p.rows) {
        __stcg(&p.workspace[(blockIdx.z * p.m + token) * p.rows + row], smem.out[i / kBlockRows][i % kBlockRows]);
      }
    }
    if (!last_split_to_arrive(&p.counters[blockIdx.y * gridDim.x + blockIdx.x], p.splits, smem.is_last_block)) return;
  }
  for (int i = threadIdx.x; i < S::kTokens * kBlockRows; i += kThreads) {
    const int64_t token = token0 + i / kBlockRows, row = row0 + i % kBlockRows;
    if (token >= p.m || row >= p.rows) continue;
    float sum = smem.out[i / kBlockRows][i % kBlockRows];
    if (p.splits > 1) {
      sum = 0.f;
      for (int z = 0; z < p.splits; ++z) sum += __ldcg(&p.workspace[(z * p.m + token) * p.rows + row]);
    }
    store_output<Scalar>(p, row, token, sum);
  }
}

}  // namespace salr::cuda::mma24

// The "stream" sparse_lowrank_gemm forward kernel (issue 16; opt-in: SALR_CUDA_KERNEL=stream):
//   y[m, n] = sum_k x[m, k] W[n, k] + sum_r T[m, r] B[n, r] + bias[n]
// on the re-laid weight of cpp/stream_layout.h (one record per band pair and 64-column group).
//
// The weight is the mma.m16n8k16 B operand: each warp owns one band pair (16 output rows = two n8
// tiles), the activations are the A operand (16 tokens per token tile, kTokenTiles tiles per block;
// with kHalfTile only tokens 0-7 exist and a1/a3 are zero registers). Per K-step (one record) the
// block copies each warp's record and the x tile into a kStages ring with 16-byte cp.async
// (predicated, no branch: a fixed number of rounds sized for a full-density record); then every warp
// runs one warp scan over its record header (the lanes' run starts) and, per k16 step and band, one
// decode_step per lane (3 LDS + 2 funnel shifts + 2 prmt + 2 AND from a 16-entry selector table in
// shared memory), reads its A registers for the permuted K with one 8-byte LDS per 8 tokens and
// issues 2 x kTokenTiles HMMA: the decode is paid once per stage whatever the token tile.
//
// Split-K (grid.z > 1) reduces deterministically through the same workspace + arrival counter as the
// A-operand kernel (sparse_mma_kernel.cuh), whose epilogue (adapter term, bias, cast) it shares.
#pragma once

#include "device_common.cuh"
#include "sparse_mma_kernel.cuh"
#include "stream_layout.h"

namespace salr::cuda::stream {

namespace layout = salr::stream;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kPairsPerBlock = kWarps;
constexpr int kStages = 4;
constexpr int kTokensPerTile = 16;
constexpr int kRecordSlot = layout::kMaxRecordBytes + layout::kRecordReadSlack;
constexpr int kRecordCopyRounds = (layout::kMaxRecordBytes / 16 + 31) / 32;  // 16-byte chunks per lane
constexpr int kGroupCols = static_cast<int>(format::kGroupColumns);
constexpr int kXRow = kGroupCols + 16;  // 160-byte rows: the 8-byte A loads of a warp hit no bank twice
constexpr int kMaxGroupsPerSplit = 64;  // bounds the per-block offsets table

struct StreamParams {
  mma::ForwardParams base;  // x, y, adapter, bias, split-K fields (the weight fields are unused)
  const unsigned char* records;   // 16-byte aligned
  const int64_t* record_offsets;  // [pairs * groups + 1] byte offsets
  int64_t pairs;
};

template <int kTokenTiles>
struct StreamShared {
  struct Stage {
    unsigned char records[kWarps][kRecordSlot];
    uint16_t x[kTokensPerTile * kTokenTiles][kXRow];
  };
  layout::Expansion table[16];
  int64_t offsets[kWarps][kMaxGroupsPerSplit + 1];  // the block's pairs x its groups (+ end)
  Stage stages[kStages];
  int is_last_block;
};

template <int kTokenTiles>
constexpr int shared_bytes() {
  return static_cast<int>(sizeof(StreamShared<kTokenTiles>));
}

// Blocks per SM the shared memory allows on Hopper (228 KB), at most 4: the register bound.
template <int kTokenTiles>
constexpr int min_blocks_per_sm() {
  const int blocks = (227 * 1024) / shared_bytes<kTokenTiles>();
  return blocks < 1 ? 1 : (blocks > 4 ? 4 : blocks);
}

// 16 bytes global -> shared when `pred`, else nothing (no branch: a predicated cp.async).
__device__ __forceinline__ void cp_async_16_if(void* dst, const void* src, bool pred) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n @p cp.async.cg.shared.global [%0], [%1], 16;\n}\n" ::"r"(
          shared_address(dst)),
      "l"(src), "r"(static_cast<int>(pred)));
}

// Issues the copies of K-step j into ring slot `slot` (nothing for the weight when !active; the x
// tile is then zero-filled, harmless in a free slot).
template <int kTokenTiles>
__device__ __forceinline__ void load_stage(const StreamParams& p, StreamShared<kTokenTiles>& smem, int64_t token0,
                                           int group_begin, int j, int slot, bool active) {
  auto& st = smem.stages[slot];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t begin = smem.offsets[warp][j];
  const int chunks = active ? static_cast<int>((smem.offsets[warp][j + 1] - begin) >> 4) : 0;
  const unsigned char* src = p.records + begin;
#pragma unroll
  for (int r = 0; r < kRecordCopyRounds; ++r) {
    const int c = lane + 32 * r;
    cp_async_16_if(&st.records[warp][16 * c], src + 16 * c, c < chunks);
  }
  const mma::ForwardParams& q = p.base;
#pragma unroll
  for (int i = 0; i < kTokenTiles; ++i) {
    const int index = threadIdx.x + kThreads * i, token = index >> 3, chunk = index & 7;
    const int64_t col = static_cast<int64_t>(group_begin + j) * kGroupCols + 8 * chunk;
    const bool ok = active && token0 + token < q.m && col < q.cols8;
    cp_async_16(&st.x[token][8 * chunk], ok ? q.x + (token0 + token) * q.ldx + col : q.x, ok ? 16 : 0);
  }
}

// One warp's work on the record in ring slot `slot`: scan, then 4 k16 steps x 2 bands of decode and
// 2 x kTokenTiles HMMA.
template <typename Scalar, int kTokenTiles, bool kHalfTile>
__device__ __forceinline__ void compute_stage(const StreamShared<kTokenTiles>& smem, int slot,
                                              float acc[kTokenTiles][2][4]) {
  const auto& st = smem.stages[slot];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned char* record = st.records[warp];
  const uint32_t header = *reinterpret_cast<const uint32_t*>(record + 4 * lane);
  const uint32_t counts = layout::packed_counts(header);
  uint32_t inclusive = counts;
#pragma unroll
  for (int delta = 1; delta < 32; delta *= 2) {
    inclusive = layout::scan_step(inclusive, __shfl_up_sync(0xffffffffu, inclusive, delta), lane, delta);
  }
  const uint32_t total = __shfl_sync(0xffffffffu, inclusive, 31);
  const uint32_t exclusive = inclusive - counts;
  uint32_t cursor[2] = {layout::run_cursor_band0(exclusive), layout::run_cursor_band1(exclusive, total)};
  const uint16_t* x_lane = &st.x[format::mma_lane_row(lane)][layout::physical_column(lane, 0, 0)];
#pragma unroll
  for (int step = 0; step < layout::kStepsPerGroup; ++step) {
    uint32_t b[2][2];
    layout::decode_step(record, header, step, smem.table, cursor[0], b[0]);
    layout::decode_step(record, header >> 16, step, smem.table, cursor[1], b[1]);
#pragma unroll
    for (int tt = 0; tt < kTokenTiles; ++tt) {
      const uint16_t* xr = x_lane + tt * kTokensPerTile * kXRow + 16 * step;
      const uint2 top = *reinterpret_cast<const uint2*>(xr);  // a0 (logical k 2t..) and a2 (k 2t+8..)
      const uint2 bottom = kHalfTile ? make_uint2(0u, 0u) : *reinterpret_cast<const uint2*>(xr + 8 * kXRow);
      const uint32_t a[4] = {top.x, bottom.x, top.y, bottom.y};
      mma_m16n8k16<Scalar>(acc[tt][0], a, b[0][0], b[0][1]);
      mma_m16n8k16<Scalar>(acc[tt][1], a, b[1][0], b[1][1]);
    }
  }
}

// Accumulator element i of (token tile tt, band) of this lane: its output row and token (C layout:
// rows = tokens, columns = the band's 8 output rows).
__device__ __forceinline__ void stream_accumulator_position(int64_t pair0, int64_t token0, int tt, int band, int i,
                                                            int64_t& row, int64_t& token) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  row = (pair0 + warp) * 16 + 8 * band + format::mma_lane_pair_col(lane) + (i & 1);
  token = token0 + kTokensPerTile * tt + format::mma_lane_row(lane) + 8 * (i >> 1);
}

template <typename Scalar, int kTokenTiles, bool kHalfTile>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<kTokenTiles>())
    stream_forward_kernel(const StreamParams p) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  auto& smem = *reinterpret_cast<StreamShared<kTokenTiles>*>(shared_raw);
  const mma::ForwardParams& q = p.base;
  const int64_t pair0 = static_cast<int64_t>(blockIdx.x) * kPairsPerBlock;
  const int64_t token0 = static_cast<int64_t>(blockIdx.y) * kTokensPerTile * kTokenTiles;
  const int group_begin = static_cast<int>(blockIdx.z) * q.groups_per_split;
  const int steps = static_cast<int>(min(q.groups - group_begin, static_cast<int64_t>(q.groups_per_split)));
  if (threadIdx.x < 16) smem.table[threadIdx.x] = layout::expansion_of(threadIdx.x);
  for (int i = threadIdx.x; i < kWarps * (steps + 1); i += kThreads) {
    const int w = i / (steps + 1), g = i % (steps + 1);
    const int64_t pair = pair0 + w;
    smem.offsets[w][g] = pair < p.pairs ? p.record_offsets[pair * q.groups + group_begin + g] : 0;
  }
  __syncthreads();

  float acc[kTokenTiles][2][4] = {};
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    load_stage(p, smem, token0, group_begin, s, s, s < steps);
    cp_async_commit();
  }
  // SALR_BUDGET kernel=stream_forward_kernelI13__nv_bfloat16Li1ELb[01]E tiles_per_iter=4 tile=16x16 bytes_per_tile=288 max_per_tile=55
  // SALR_BUDGET kernel=stream_forward_kernelI13__nv_bfloat16Li8ELb0E tiles_per_iter=4 tile=16x16 bytes_per_tile=288 max_per_tile=200
  for (int j = 0; j < steps; ++j) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage j landed for all threads; slot (j - 1) % kStages is free again
    const int next = j + kStages - 1;
    load_stage(p, smem, token0, group_begin, next, next % kStages, next < steps);
    cp_async_commit();
    compute_stage<Scalar, kTokenTiles, kHalfTile>(smem, j % kStages, acc);
  }
  cp_async_wait<0>();

  if (q.splits > 1) {
#pragma unroll
    for (int tt = 0; tt < kTokenTiles; ++tt) {
#pragma unroll
      for (int band = 0; band < 2; ++band) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          int64_t row, token;
          stream_accumulator_position(pair0, token0, tt, band, i, row, token);
          if (row < q.rows && token < q.m) {
            __stcg(&q.workspace[(blockIdx.z * q.m + token) * q.rows + row], acc[tt][band][i]);
          }
        }
      }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      const int arrived = atomicAdd(&q.counters[blockIdx.y * gridDim.x + blockIdx.x], 1);
      smem.is_last_block = arrived == q.splits - 1;
    }
    __syncthreads();
    if (!smem.is_last_block) return;
    __threadfence();
  }
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) {
#pragma unroll
    for (int band = 0; band < 2; ++band) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int64_t row, token;
        stream_accumulator_position(pair0, token0, tt, band, i, row, token);
        if (row >= q.rows || token >= q.m) continue;
        float sum = acc[tt][band][i];
        if (q.splits > 1) {
          sum = 0.f;
          for (int z = 0; z < q.splits; ++z) sum += __ldcg(&q.workspace[(z * q.m + token) * q.rows + row]);
        }
        mma::store_output<Scalar>(q, row, token, sum);
      }
    }
  }
}

}  // namespace salr::cuda::stream

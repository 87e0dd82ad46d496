// The "stream" sparse_lowrank_gemm forward kernel (issue 16; opt-in: SALR_CUDA_KERNEL=stream):
//   y[m, n] = sum_k x[m, k] W[n, k] + sum_r T[m, r] B[n, r] + bias[n]
// on the re-laid weight of cpp/stream_layout.h (one record per band pair and 64-column group).
//
// The weight is the mma.m16n8k16 B operand: each warp owns one band pair (16 output rows = two n8
// tiles), the activations are the A operand (16 tokens per token tile, kTokenTiles tiles per block),
// staged by the host glue in layout::x_block_index order so a lane's four A registers under the K
// permutation are one 16-byte load. Per K-step (one record) the block copies each warp's record and
// the x blocks into a kStages ring with 16-byte cp.async (predicated, no branch: a fixed number of
// rounds sized for a full-density record); then every warp runs one warp scan over its record
// header (the lanes' run starts) and, per k16 step and band, one decode_step per lane (3 LDS + 2
// funnel shifts + 2 prmt + 2 AND from a 16-entry selector table in shared memory) and issues
// 2 x kTokenTiles HMMA: the decode is paid once per stage whatever the token tile.
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
constexpr int kMaxGroupsPerSplit = 64;  // bounds the per-block offsets table

struct StreamParams {
  mma::ForwardParams base;  // x, y, adapter, bias, split-K fields (the weight fields are unused)
  const unsigned char* records;   // 16-byte aligned
  const int64_t* record_offsets;  // [pairs * groups + 1] byte offsets
  int64_t pairs;
  // x staged as layout::x_block_index blocks [token tiles][groups][2048 B] (zero padded);
  // x_tile_stride = groups * 2048, the bytes between token tiles.
  const unsigned char* x_blocks;
  int64_t x_tile_stride;
};

template <int kTokenTiles>
struct StreamShared {
  struct Stage {
    unsigned char records[kWarps][kRecordSlot];
    uint16_t x[kTokenTiles][layout::kXBlockBytes / 2];
  };
  layout::Expansion table[16];
  // Per (warp, K-step) of the block: its record's start in 16-byte units and its 16-byte chunks.
  uint2 copies[kWarps][kMaxGroupsPerSplit];
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

// Issues the copies of K-step j into ring slot `slot` (nothing when !active): each warp its pair's
// record, every thread one 16-byte chunk of each token tile's x block.
template <int kTokenTiles>
__device__ __forceinline__ void load_stage(const StreamParams& p, StreamShared<kTokenTiles>& smem,
                                           const unsigned char* x_base, int j, int slot, bool active) {
  auto& st = smem.stages[slot];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint2 copy = smem.copies[warp][active ? j : 0];
  const int left = (active ? static_cast<int>(copy.y) : 0) - lane;  // chunks from this lane's first on
  const unsigned char* src = p.records + 16 * static_cast<uint64_t>(copy.x + lane);
  unsigned char* dst = st.records[warp] + 16 * lane;
#pragma unroll
  for (int r = 0; r < kRecordCopyRounds; ++r) cp_async_16_if(dst + 512 * r, src + 512 * r, left > 32 * r);
  const unsigned char* x_src = x_base + static_cast<int64_t>(j) * layout::kXBlockBytes + 16 * threadIdx.x;
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) {
    cp_async_16_if(&st.x[tt][8 * threadIdx.x], x_src + tt * p.x_tile_stride, active);
  }
}

// Inclusive warp scan: scan_step's arithmetic, with the shfl.up's own "source lane exists"
// predicate guarding the add (2 instructions a round).
__device__ __forceinline__ uint32_t warp_inclusive_scan(uint32_t value) {
#pragma unroll
  for (int delta = 1; delta < 32; delta *= 2) {
    asm("{\n .reg .pred p;\n .reg .b32 below;\n shfl.sync.up.b32 below|p, %0, %1, 0, -1;\n @p add.u32 %0, %0, below;\n}\n"
        : "+r"(value)
        : "r"(delta));
  }
  return value;
}

// One warp's work on the record in ring slot `slot`: scan, then 4 k16 steps x 2 bands of decode and
// 2 x kTokenTiles HMMA.
template <typename Scalar, int kTokenTiles>
__device__ __forceinline__ void compute_stage(const StreamShared<kTokenTiles>& smem, const unsigned char* shared_base,
                                              int slot, float acc[kTokenTiles][2][4]) {
  const auto& st = smem.stages[slot];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned char* record = st.records[warp];
  const uint32_t header = *reinterpret_cast<const uint32_t*>(record + 4 * lane);
  const uint32_t counts = layout::packed_counts(header);
  const uint32_t inclusive = warp_inclusive_scan(counts);
  const uint32_t total = __shfl_sync(0xffffffffu, inclusive, 31);
  const uint32_t exclusive = inclusive - counts;
  const uint32_t record_at = static_cast<uint32_t>(record - shared_base);
  uint32_t cursor[2] = {record_at + layout::run_cursor_band0(exclusive),
                        record_at + layout::run_cursor_band1(exclusive, total)};
  const uint4* x_lane = reinterpret_cast<const uint4*>(st.x[0]) + (lane & 3) * 8 + format::mma_lane_row(lane);
#pragma unroll
  for (int step = 0; step < layout::kStepsPerGroup; ++step) {
    uint32_t b[2][2];
    layout::decode_step(shared_base, header, step, smem.table, cursor[0], b[0]);
    layout::decode_step(shared_base, header >> 16, step, smem.table, cursor[1], b[1]);
#pragma unroll
    for (int tt = 0; tt < kTokenTiles; ++tt) {
      const uint4 quad = x_lane[tt * (layout::kXBlockBytes / 16) + 32 * step];
      const uint32_t a[4] = {quad.x, quad.y, quad.z, quad.w};
      mma_m16n8k16<Scalar>(acc[tt][0], a, b[0][0], b[0][1]);
      mma_m16n8k16<Scalar>(acc[tt][1], a, b[1][0], b[1][1]);
    }
  }
}

// Calls fn(output row, token, accumulator) for every accumulator of this lane inside the output
// (C layout: rows = tokens, columns = the band's 8 output rows).
template <int kTokenTiles, typename Fn>
__device__ __forceinline__ void for_each_output(int64_t pair0, int64_t token0, const mma::ForwardParams& q,
                                                const float (&acc)[kTokenTiles][2][4], Fn fn) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int tt = 0; tt < kTokenTiles; ++tt) {
#pragma unroll
    for (int band = 0; band < 2; ++band) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t row = (pair0 + warp) * 16 + 8 * band + format::mma_lane_pair_col(lane) + (i & 1);
        const int64_t token = token0 + kTokensPerTile * tt + format::mma_lane_row(lane) + 8 * (i >> 1);
        if (row < q.rows && token < q.m) fn(row, token, acc[tt][band][i]);
      }
    }
  }
}

template <typename Scalar, int kTokenTiles>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm<kTokenTiles>())
    stream_forward_kernel(const StreamParams p) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  auto& smem = *reinterpret_cast<StreamShared<kTokenTiles>*>(shared_raw);
  const mma::ForwardParams& q = p.base;
  const int64_t pair0 = static_cast<int64_t>(blockIdx.x) * kPairsPerBlock;
  const int64_t token0 = static_cast<int64_t>(blockIdx.y) * kTokensPerTile * kTokenTiles;
  const int group_begin = static_cast<int>(blockIdx.z) * q.groups_per_split;
  const int steps = static_cast<int>(min(q.groups - group_begin, static_cast<int64_t>(q.groups_per_split)));
  const unsigned char* x_base = p.x_blocks + static_cast<int64_t>(blockIdx.y) * kTokenTiles * p.x_tile_stride +
                                static_cast<int64_t>(group_begin) * layout::kXBlockBytes;
  if (threadIdx.x < 16) smem.table[threadIdx.x] = layout::expansion_of(threadIdx.x);
  for (int i = threadIdx.x; i < kWarps * steps; i += kThreads) {
    const int w = i / steps, g = i % steps;
    const int64_t pair = pair0 + w, record = pair * q.groups + group_begin + g;
    const int64_t begin = pair < p.pairs ? p.record_offsets[record] : 0;
    const int64_t end = pair < p.pairs ? p.record_offsets[record + 1] : 0;
    smem.copies[w][g] = make_uint2(static_cast<uint32_t>(begin >> 4), static_cast<uint32_t>((end - begin) >> 4));
  }
  __syncthreads();

  float acc[kTokenTiles][2][4] = {};
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    load_stage(p, smem, x_base, s, s, s < steps);
    cp_async_commit();
  }
  // SALR_BUDGET kernel=stream_forward_kernelI13__nv_bfloat16Li1EE tiles_per_iter=4 tile=16x16 bytes_per_tile=288 max_per_tile=55 threads=128
  // SALR_BUDGET kernel=stream_forward_kernelI13__nv_bfloat16Li8EE tiles_per_iter=4 tile=16x16 bytes_per_tile=288 max_per_tile=200 threads=128
  for (int j = 0; j < steps; ++j) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage j landed for all threads; slot (j - 1) % kStages is free again
    const int next = j + kStages - 1;
    load_stage(p, smem, x_base, next, next % kStages, next < steps);
    cp_async_commit();
    compute_stage<Scalar, kTokenTiles>(smem, shared_raw, j % kStages, acc);
  }
  cp_async_wait<0>();

  if (q.splits > 1) {
    for_each_output(pair0, token0, q, acc, [&](int64_t row, int64_t token, float sum) {
      __stcg(&q.workspace[(blockIdx.z * q.m + token) * q.rows + row], sum);
    });
    if (!last_split_to_arrive(&q.counters[blockIdx.y * gridDim.x + blockIdx.x], q.splits, smem.is_last_block)) {
      return;
    }
  }
  for_each_output(pair0, token0, q, acc, [&](int64_t row, int64_t token, float sum) {
    if (q.splits > 1) {
      sum = 0.f;
      for (int z = 0; z < q.splits; ++z) sum += __ldcg(&q.workspace[(z * q.m + token) * q.rows + row]);
    }
    mma::store_output<Scalar>(q, row, token, sum);
  });
}

}  // namespace salr::cuda::stream

// The sparse_lowrank_gemm forward kernel for bf16 / fp16 (small M, memory-bound):
//   y[m, n] = sum_k x[m, k] W[n, k] + sum_r T[m, r] B[n, r] + bias[n],  T = x·Aᵀ (fp32, precomputed)
//
// Work: block (x, y, z) = 8 bands (64 output rows) x 16 tokens x one split of the 64-column groups.
// Each of the 4 warps owns one band pair = the 16 rows of an mma.m16n8k16 A operand and both n8
// token tiles. Per K-step (one 64-column group) the block cp.async's into a 4-stage shared ring:
// the 8 bands' tile words (64 B each), their packed values for the group (one contiguous run per
// band, copied in 16-byte chunks from the 16-byte boundary at or below its start) and the x tile.
// Every lane then decodes its A registers straight from the packed values (format::a_fragment_k16:
// popcount prefix of earlier tiles + popcount below its bit) -- no dense weight in shared memory.
//
// Shared memory is sized for full density (512 values per band and group), so any density 0-100%
// is safe; indices derived from bitmaps never leave a band's slot whatever the data.
//
// Split-K (grid.z > 1): each block writes its fp32 partial tile to a workspace [splits, M, N]; the
// last block of a tile to finish (a per-tile arrival counter) sums the partials in split order
// (deterministic) and runs the epilogue (adapter, bias, cast). With one split the block runs it
// directly. Consistency of bitmap/offsets is not checked here (no sync on the hot path): every
// offset is clamped into values and into the 512-value slot, so a bad weight never faults.
#pragma once

#include "device_common.cuh"

namespace salr::cuda::mma {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBandsPerBlock = 2 * kWarps;  // one band pair (16 mma rows) per warp
constexpr int kTokensPerBlock = 16;         // two n8 mma tiles per warp
constexpr int kStages = 4;                  // cp.async ring depth: Hopper needs ~3 groups in flight
constexpr int kGroupTiles = static_cast<int>(format::kTilesPerGroup);
constexpr int kGroupCols = static_cast<int>(format::kGroupColumns);
constexpr int kMaxGroupValues = kGroupTiles * 64;      // full density
// + up to 7 values below the aligned start; lane_value_pair's reads past a run (at most index 518)
// stay inside the slot.
constexpr int kValueSlot = kMaxGroupValues + 8;
constexpr int kXRow = kGroupCols + 8;                  // +16 B: conflict-free B-fragment loads
constexpr int kMaxGroupsPerSplit = 64;                 // bounds the per-block offsets table
constexpr int kMinBlocksPerSm = 4;                     // 4 x ~46 KB shared memory per H100 SM

struct __align__(16) Stage {
  uint64_t bitmaps[kBandsPerBlock][kGroupTiles];
  uint16_t values[kBandsPerBlock][kValueSlot];
  uint16_t x[kTokensPerBlock][kXRow];
};

struct SharedStorage {
  Stage stages[kStages];
  int32_t offsets[kBandsPerBlock][kMaxGroupsPerSplit + 1];  // the block's bands x its groups (+ end)
  int is_last_block;
};
static_assert(sizeof(SharedStorage) <= 48 * 1024, "static shared memory limit");

struct ForwardParams {
  const uint64_t* bitmap;  // [bands, tiles]
  const uint16_t* values;  // 16-byte aligned
  const int32_t* offsets;
  int64_t nnz;
  int64_t rows, bands, tiles, groups;
  const uint16_t* x;  // [m, ldx], 16-byte aligned rows, columns >= cols8 never read
  int64_t ldx, cols8, m;
  uint16_t* y;  // [m, rows] contiguous
  const float* t;          // [m, rank] or nullptr
  const uint16_t* adapter_b;  // [rows, rank] or nullptr
  int64_t rank;
  const uint16_t* bias;  // [rows] or nullptr
  float* workspace;      // [splits, m, rows] when splits > 1
  int* counters;         // [grid.y * grid.x] zeros when splits > 1
  int splits, groups_per_split;
};

// [start, start + count) of a band's values in group step `j` of the block's split, clamped so the
// copy stays inside values and inside the band's 512-value slot.
__device__ __forceinline__ void band_group_range(const int32_t* band_offsets, int j, int64_t nnz, int64_t& start,
                                                 int& count) {
  int64_t s = band_offsets[j], e = band_offsets[j + 1];
  s = s < 0 ? 0 : (s > nnz ? nnz : s);
  e = e < s ? s : (e > nnz ? nnz : e);
  start = s;
  count = static_cast<int>(e - s > kMaxGroupValues ? kMaxGroupValues : e - s);
}

// Issues the copies of K-step j into ring slot `slot`: half-warp per band for words and values,
// one 16-byte x chunk per thread.
__device__ __forceinline__ void load_stage(const ForwardParams& p, SharedStorage& smem, int64_t band0,
                                           int64_t token0, int group_begin, int j, int slot) {
  Stage& st = smem.stages[slot];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int band_slot = 2 * warp + (lane >> 4), half_lane = lane & 15;
  const int64_t band = band0 + band_slot, group = group_begin + j;
  if (half_lane < kGroupTiles) {
    const int64_t tile = group * kGroupTiles + half_lane;
    const bool ok = band < p.bands && tile < p.tiles;
    cp_async_8(&st.bitmaps[band_slot][half_lane], ok ? p.bitmap + band * p.tiles + tile : p.bitmap, ok ? 8 : 0);
  }
  int64_t start;
  int count;
  band_group_range(smem.offsets[band_slot], j, p.nnz, start, count);
  const int64_t first = start & ~int64_t{7};
  const int chunks = static_cast<int>((start + count - first + 7) >> 3);
  for (int c = half_lane; c < chunks; c += 16) cp_async_16(&st.values[band_slot][8 * c], p.values + first + 8 * c, 16);
  const int token = threadIdx.x >> 3, chunk = threadIdx.x & 7;
  const int64_t col = group * kGroupCols + 8 * chunk;
  const bool ok = token0 + token < p.m && col < p.cols8;
  cp_async_16(&st.x[token][8 * chunk], ok ? p.x + (token0 + token) * p.ldx + col : p.x, ok ? 16 : 0);
}

// The warp's mma work for the K-step in ring slot `slot`: 4 k16 steps x (1 or 2) n8 tiles.
template <typename Scalar>
__device__ __forceinline__ void compute_stage(const ForwardParams& p, const SharedStorage& smem, int j, int slot,
                                              const format::LaneDecode& decode, bool second_token_tile,
                                              float acc[2][4]) {
  const Stage& st = smem.stages[slot];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int top = 2 * warp, bottom = top + 1;
  int64_t top_start, bottom_start;
  int unused;
  band_group_range(smem.offsets[top], j, p.nnz, top_start, unused);
  band_group_range(smem.offsets[bottom], j, p.nnz, bottom_start, unused);
  const uint16_t* top_values = st.values[top] + (top_start & 7);
  const uint16_t* bottom_values = st.values[bottom] + (bottom_start & 7);
  const int token_row = format::mma_lane_row(lane), k_pair = format::mma_lane_pair_col(lane);
  int top_cursor = 0, bottom_cursor = 0;
#pragma unroll
  for (int step = 0; step < kGroupTiles / 2; ++step) {
    uint32_t a[format::kFragmentRegisters];
    format::a_fragment_k16(st.bitmaps[top], st.bitmaps[bottom], top_values, bottom_values, step, decode,
                           top_cursor, bottom_cursor, a);
    const int k = 16 * step + k_pair;
    const uint32_t b0 = *reinterpret_cast<const uint32_t*>(&st.x[token_row][k]);
    const uint32_t b1 = *reinterpret_cast<const uint32_t*>(&st.x[token_row][k + 8]);
    mma_m16n8k16<Scalar>(acc[0], a, b0, b1);
    if (second_token_tile) {
      const uint32_t b2 = *reinterpret_cast<const uint32_t*>(&st.x[token_row + 8][k]);
      const uint32_t b3 = *reinterpret_cast<const uint32_t*>(&st.x[token_row + 8][k + 8]);
      mma_m16n8k16<Scalar>(acc[1], a, b2, b3);
    }
  }
}

// Adds the adapter term and bias to a finished fp32 sum and stores it in the output dtype.
template <typename Scalar>
__device__ __forceinline__ void store_output(const ForwardParams& p, int64_t row, int64_t token, float sum) {
  if (p.t != nullptr) {
    const float* t_row = p.t + token * p.rank;
    const uint16_t* b_row = p.adapter_b + row * p.rank;
    for (int64_t r = 0; r < p.rank; ++r) sum += t_row[r] * Half16<Scalar>::to_float(b_row[r]);
  }
  if (p.bias != nullptr) sum += Half16<Scalar>::to_float(p.bias[row]);
  p.y[token * p.rows + row] = Half16<Scalar>::from_float(sum);
}

// Accumulator element i of n8 tile nt of this lane: its output row and token (mma C layout).
__device__ __forceinline__ void accumulator_position(int64_t band0, int64_t token0, int nt, int i, int64_t& row,
                                                     int64_t& token) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  row = (band0 + 2 * warp) * format::kTileEdge + format::mma_lane_row(lane) + (i >= 2 ? 8 : 0);
  token = token0 + 8 * nt + format::mma_lane_pair_col(lane) + (i & 1);
}

template <typename Scalar>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) sparse_mma_forward_kernel(const ForwardParams p) {
  __shared__ SharedStorage smem;
  const int64_t band0 = static_cast<int64_t>(blockIdx.x) * kBandsPerBlock;
  const int64_t token0 = static_cast<int64_t>(blockIdx.y) * kTokensPerBlock;
  const int group_begin = static_cast<int>(blockIdx.z) * p.groups_per_split;
  const int steps = static_cast<int>(min(p.groups - group_begin, static_cast<int64_t>(p.groups_per_split)));
  // Offsets of the block's bands for its groups: every stage's copy needs its start and end.
  for (int i = threadIdx.x; i < kBandsPerBlock * (steps + 1); i += kThreads) {
    const int band_slot = i / (steps + 1), g = i % (steps + 1);
    const int64_t band = band0 + band_slot;
    smem.offsets[band_slot][g] = band < p.bands ? p.offsets[band * p.groups + group_begin + g] : 0;
  }
  __syncthreads();

  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  const bool second_token_tile = token0 + 8 < p.m;  // uniform over the block
  const format::LaneDecode decode = format::lane_decode(threadIdx.x & 31);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load_stage(p, smem, band0, token0, group_begin, s, s);
    cp_async_commit();  // an empty group keeps the wait count uniform
  }
  // SALR_BUDGET kernel=sparse_mma_forward_kernelI13__nv_bfloat16E tiles_per_iter=4 tile=16x16 bytes_per_tile=288 max_per_tile=55 gate=report
  for (int j = 0; j < steps; ++j) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage j landed for all threads; slot (j - 1) % kStages is free again
    const int next = j + kStages - 1;
    if (next < steps) load_stage(p, smem, band0, token0, group_begin, next, next % kStages);
    cp_async_commit();
    compute_stage<Scalar>(p, smem, j, j % kStages, decode, second_token_tile, acc);
  }
  cp_async_wait<0>();

  if (p.splits > 1) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        int64_t row, token;
        accumulator_position(band0, token0, nt, i, row, token);
        if (row < p.rows && token < p.m) __stcg(&p.workspace[(blockIdx.z * p.m + token) * p.rows + row], acc[nt][i]);
      }
    }
    if (!last_split_to_arrive(&p.counters[blockIdx.y * gridDim.x + blockIdx.x], p.splits, smem.is_last_block)) return;
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      int64_t row, token;
      accumulator_position(band0, token0, nt, i, row, token);
      if (row >= p.rows || token >= p.m) continue;
      float sum = acc[nt][i];
      if (p.splits > 1) {
        sum = 0.f;
        for (int z = 0; z < p.splits; ++z) sum += __ldcg(&p.workspace[(z * p.m + token) * p.rows + row]);
      }
      store_output<Scalar>(p, row, token, sum);
    }
  }
}

}  // namespace salr::cuda::mma

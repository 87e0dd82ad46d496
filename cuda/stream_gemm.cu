// The stream path of salr.sparse_lowrank_gemm (stream_gemm.h): the load-time re-layout of a BM8x8
// weight into stream records (cpp/stream_layout.h) on the GPU, cached per weight, the activations
// staged in quad order, and the launch of stream_forward_kernel (stream_kernel.cuh).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/StorageImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "cuda_common.cuh"
#include "stream_gemm.h"
#include "stream_kernel.cuh"
#include "stream_relayout.cuh"

namespace salr::cuda::stream {
namespace {

constexpr const char* kOp = "sparse_lowrank_gemm";

struct Relaid {
  at::Tensor records, record_offsets;
};

Relaid relayout(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets, int64_t rows,
                int64_t cols) {
  const int64_t bands = format::num_bands(rows), tiles = format::tiles_per_band(cols);
  const int64_t groups = format::groups_per_band(cols), records = layout::num_pairs(bands) * groups;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* words = reinterpret_cast<const uint64_t*>(bitmap.const_data_ptr<int64_t>());
  at::Tensor record_offsets = at::zeros({records + 1}, bitmap.options().dtype(at::kLong));
  const unsigned blocks = static_cast<unsigned>((records + kRelayoutWarps - 1) / kRelayoutWarps);
  if (records > 0) {
    at::Tensor sizes = at::empty({records}, record_offsets.options());
    record_sizes_kernel<<<blocks, 32 * kRelayoutWarps, 0, stream>>>(words, bands, tiles, groups, records,
                                                                    sizes.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor ends = record_offsets.narrow(0, 1, records);
    at::cumsum_out(ends, sizes, 0);
  }
  const int64_t total = record_offsets[records].item<int64_t>();  // once per weight
  TORCH_CHECK(total < (int64_t{1} << 36), "salr.", kOp, ": the stream kernel's records address 16-byte units ",
              "with 32 bits (64 GiB), this weight needs ", total, " bytes");
  at::Tensor out = at::zeros({std::max<int64_t>(total, 16)}, bitmap.options().dtype(at::kByte));
  if (records > 0) {
    record_fill_kernel<<<blocks, 32 * kRelayoutWarps, 0, stream>>>(
        words, static_cast<const uint16_t*>(values.const_data_ptr()), offsets.const_data_ptr<int32_t>(),
        values.size(0), bands, tiles, groups, records, record_offsets.const_data_ptr<int64_t>(),
        out.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {out, record_offsets};
}

// ---- the cache: one re-layout per weight, rebuilt when a tensor of it is written or replaced ----

int64_t version_of(const at::Tensor& t) { return t.is_inference() ? -1 : t._version(); }

struct CacheEntry {
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storages;  // bitmap, values, offsets
  std::vector<const void*> data;
  std::vector<int64_t> versions;
  int64_t rows, cols;
  Relaid relaid;
};

std::mutex cache_mutex;
std::vector<CacheEntry> cache;

Relaid cached_relayout(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets, int64_t rows,
                       int64_t cols) {
  const std::vector<at::Tensor> parts = {bitmap, values, offsets};
  std::vector<const void*> data;
  std::vector<int64_t> versions;
  for (const auto& t : parts) {
    data.push_back(t.const_data_ptr());
    versions.push_back(version_of(t));
  }
  const std::lock_guard<std::mutex> lock(cache_mutex);
  // Entries whose weight is gone can never match again (their storages are freed).
  cache.erase(std::remove_if(cache.begin(), cache.end(),
                             [](const CacheEntry& e) {
                               return std::any_of(e.storages.begin(), e.storages.end(),
                                                  [](const auto& s) { return s.expired(); });
                             }),
              cache.end());
  for (auto it = cache.begin(); it != cache.end(); ++it) {
    bool same_storage = true;
    for (size_t i = 0; i < parts.size(); ++i) {
      same_storage = same_storage && it->storages[i]._unsafe_get_target() == parts[i].storage().unsafeGetStorageImpl();
    }
    if (!same_storage) continue;
    if (it->data == data && it->versions == versions && it->rows == rows && it->cols == cols) return it->relaid;
    cache.erase(it);  // the same weight, changed: rebuild below
    break;
  }
  CacheEntry entry{{}, data, versions, rows, cols, relayout(bitmap, values, offsets, rows, cols)};
  for (const auto& t : parts) entry.storages.emplace_back(t.storage().getWeakStorageImpl());
  cache.push_back(entry);
  return entry.relaid;
}

// ---- launch ----------------------------------------------------------------------------------

template <typename Scalar, int kTokenTiles>
void launch(const StreamParams& p, dim3 grid) {
  const auto kernel = stream_forward_kernel<Scalar, kTokenTiles>;
  constexpr int bytes = shared_bytes<kTokenTiles>();
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  kernel<<<grid, kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Scalar>
void launch_for_tokens(int token_tiles, const StreamParams& p, dim3 grid) {
  switch (token_tiles) {
    case 1: return launch<Scalar, 1>(p, grid);
    case 2: return launch<Scalar, 2>(p, grid);
    case 4: return launch<Scalar, 4>(p, grid);
    default: return launch<Scalar, 8>(p, grid);
  }
}

int blocks_per_sm(int token_tiles) {
  switch (token_tiles) {
    case 1: return min_blocks_per_sm<1>();
    case 2: return min_blocks_per_sm<2>();
    case 4: return min_blocks_per_sm<4>();
    default: return min_blocks_per_sm<8>();
  }
}

}  // namespace

bool selected() {
  const char* kernel = std::getenv("SALR_CUDA_KERNEL");
  if (kernel == nullptr || kernel[0] == '\0' || std::strcmp(kernel, "mma") == 0) return false;
  TORCH_CHECK(std::strcmp(kernel, "stream") == 0, "salr: SALR_CUDA_KERNEL must be 'mma' (the default) or 'stream', got '",
              kernel, "'");
  return true;
}

at::Tensor forward(const at::Tensor& x2d, const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets,
                   int64_t rows, int64_t cols, const at::Tensor& adapter_b, int64_t rank, const at::Tensor& t,
                   const std::optional<at::Tensor>& bias) {
  const int64_t m = x2d.size(0);
  TORCH_CHECK(m >= 1 && m <= kMaxStreamRows, "salr.", kOp, ": the stream kernel takes 1..", kMaxStreamRows,
              " rows of x, got ", m);
  const Relaid relaid = cached_relayout(bitmap, values, offsets, rows, cols);
  const int64_t bands = format::num_bands(rows), pairs = layout::num_pairs(bands);
  const int64_t groups = format::groups_per_band(cols);
  const int token_tiles = m <= 16 ? 1 : (m <= 32 ? 2 : (m <= 64 ? 4 : 8));
  const int64_t pair_blocks = (pairs + kPairsPerBlock - 1) / kPairsPerBlock;
  const int64_t token_blocks = (m + kTokensPerTile * token_tiles - 1) / (kTokensPerTile * token_tiles);

  // x in quad order: [token tiles][groups][2048 B], zero padded to whole tiles and groups.
  const int64_t padded_tiles = token_blocks * token_tiles;
  at::Tensor padded = at::zeros({padded_tiles * kTokensPerTile, groups * format::kGroupColumns}, x2d.options());
  padded.narrow(0, 0, m).narrow(1, 0, cols).copy_(x2d);
  const at::Tensor x_blocks =
      padded.view({padded_tiles, 2, 8, groups, 4, 4, 2, 2}).permute({0, 3, 4, 5, 2, 6, 1, 7}).contiguous();

  // Split K until the grid fills two waves (as the mma path), at most kMaxGroupsPerSplit groups and
  // at least 4 per split; SALR_CUDA_SPLIT_K forces it (bench/bench_cuda.py --splits).
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t min_splits = (groups + kMaxGroupsPerSplit - 1) / kMaxGroupsPerSplit;
  const int64_t target = 2 * sms * blocks_per_sm(token_tiles);
  const int64_t wanted = (target + pair_blocks * token_blocks - 1) / (pair_blocks * token_blocks);
  const SplitK plan = plan_split_k(wanted, min_splits, groups / 4, groups, m, rows, pair_blocks * token_blocks, x2d);
  const int64_t splits = plan.splits, groups_per_split = plan.steps_per_split;
  const at::Tensor &workspace = plan.workspace, &counters = plan.counters;
  TORCH_CHECK(pair_blocks < (int64_t{1} << 31) && token_blocks < 65536 && splits < 65536, "salr.", kOp,
              ": the weight is too large for one launch of the stream kernel");

  at::Tensor y = at::empty({m, rows}, x2d.options());
  StreamParams p{};
  mma::ForwardParams& q = p.base;
  q.rows = rows;
  q.groups = groups;
  q.m = m;
  q.y = static_cast<uint16_t*>(y.data_ptr());
  q.t = rank > 0 ? t.const_data_ptr<float>() : nullptr;
  q.adapter_b = rank > 0 ? static_cast<const uint16_t*>(adapter_b.const_data_ptr()) : nullptr;
  q.rank = rank;
  q.bias = bias.has_value() ? static_cast<const uint16_t*>(bias->const_data_ptr()) : nullptr;
  q.workspace = splits > 1 ? workspace.data_ptr<float>() : nullptr;
  q.counters = splits > 1 ? counters.data_ptr<int>() : nullptr;
  q.splits = static_cast<int>(splits);
  q.groups_per_split = static_cast<int>(groups_per_split);
  p.records = relaid.records.const_data_ptr<uint8_t>();
  p.record_offsets = relaid.record_offsets.const_data_ptr<int64_t>();
  p.pairs = pairs;
  p.x_blocks = static_cast<const unsigned char*>(x_blocks.const_data_ptr());
  p.x_tile_stride = groups * layout::kXBlockBytes;
  const dim3 grid(static_cast<unsigned>(pair_blocks), static_cast<unsigned>(token_blocks),
                  static_cast<unsigned>(splits));
  if (values.scalar_type() == at::kBFloat16) {
    launch_for_tokens<__nv_bfloat16>(token_tiles, p, grid);
  } else {
    launch_for_tokens<__half>(token_tiles, p, grid);
  }
  return y;
}

}  // namespace salr::cuda::stream

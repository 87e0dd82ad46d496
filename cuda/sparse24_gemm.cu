// The 2:4 path of salr.sparse_lowrank_gemm on CUDA (issue 17): detection, re-layout and its cache,
// the launch of the mma.sp kernels (sparse24_kernel.cuh). Opt-in: SALR_CUDA_SPARSE24=1.
//
// Detection (one kernel over the tile words, one device->host read) and re-layout (one thread per
// lane of every 16x32 tile, through the host-twinned helpers of cpp/sparse24_layout.h) run once per
// weight. The cache keeps, per values tensor, weak references to the three tensors' storages, their
// version counters, data pointers and the shape: an in-place edit, a new tensor at a recycled address
// or a freed weight is a miss. Weights that are not 2:4 are cached as such (no re-detection).
//
// Test hooks (tests/test_cuda_24.py): torch.ops.salr_sparse24.detect / relayout / cache_stats.
#include "sparse24_gemm.h"

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>

#include "cuda_common.cuh"
#include "sparse24_kernel.cuh"

namespace salr::cuda {
namespace {

namespace layout = salr::sparse24;
constexpr const char* kOp = "sparse_lowrank_gemm";

__global__ void detect_kernel(const uint64_t* words, int64_t count, int* not_2to4) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (!layout::word_is_2to4(words[i])) *not_2to4 = 1;
  }
}

__global__ void relayout_kernel(const layout::WeightView w, int64_t row_blocks, int64_t k_blocks, uint16_t* tiles) {
  const int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (index >= row_blocks * k_blocks * layout::kLanes) return;
  const int64_t tile = index / layout::kLanes;
  layout::relayout_tile_lane(w, tile / k_blocks, tile % k_blocks, static_cast<int>(index % layout::kLanes),
                             tiles + tile * layout::kTileHalves);
}

unsigned grid_for(int64_t threads, int64_t per_block) {
  return static_cast<unsigned>(std::clamp<int64_t>((threads + per_block - 1) / per_block, 1, int64_t{1} << 20));
}

bool detect_2to4(const at::Tensor& bitmap) {
  at::Tensor flag = at::zeros({1}, bitmap.options().dtype(at::kInt));
  if (bitmap.numel() > 0) {
    detect_kernel<<<grid_for(bitmap.numel(), 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const uint64_t*>(bitmap.const_data_ptr<int64_t>()), bitmap.numel(), flag.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return flag.item<int>() == 0;
}

// The sparse24 tiles [row_blocks, k_blocks, kTileHalves] (int16) of a checked BM8x8 weight.
at::Tensor relayout(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets, int64_t rows,
                    int64_t cols) {
  const int64_t row_blocks = layout::row_blocks(rows), k_blocks = layout::k_blocks(cols);
  at::Tensor tiles = at::empty({row_blocks, k_blocks, layout::kTileHalves}, values.options().dtype(at::kShort));
  const layout::WeightView w{reinterpret_cast<const uint64_t*>(bitmap.const_data_ptr<int64_t>()),
                             static_cast<const uint16_t*>(values.const_data_ptr()),
                             offsets.const_data_ptr<int32_t>(),
                             values.size(0),
                             rows,
                             cols,
                             format::tiles_per_band(cols),
                             format::groups_per_band(cols)};
  const int64_t threads = row_blocks * k_blocks * layout::kLanes;
  if (threads > 0) {
    relayout_kernel<<<grid_for(threads, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        w, row_blocks, k_blocks, static_cast<uint16_t*>(tiles.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return tiles;
}

// ---- the cache ------------------------------------------------------------------------------------

struct TensorKey {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  uint32_t version;

  explicit TensorKey(const at::Tensor& t)
      : storage(t.storage().getWeakStorageImpl()), data(t.const_data_ptr()), version(t._version()) {}
  bool matches(const at::Tensor& t) const {
    return !storage.expired() && storage._unsafe_get_target() == t.storage().unsafeGetStorageImpl() &&
           data == t.const_data_ptr() && version == t._version();
  }
};

struct CacheEntry {
  TensorKey bitmap, values, offsets;
  int64_t rows, cols;
  at::Tensor tiles;  // undefined: the weight is not 2:4
};

struct Cache {
  std::mutex mutex;
  std::unordered_map<const void*, CacheEntry> entries;  // keyed by the values' data pointer
  int64_t relayouts = 0;                                 // re-layouts done (tests: the path ran)
};

Cache& cache() {
  static Cache* instance = new Cache();  // never destroyed: no CUDA frees after the runtime's teardown
  return *instance;
}

// The cached tiles of this weight (undefined when it is not 2:4), computing them on a miss.
at::Tensor cached_tiles(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets, int64_t rows,
                        int64_t cols) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.entries.find(values.const_data_ptr());
    if (it != c.entries.end() && it->second.values.matches(values) && it->second.bitmap.matches(bitmap) &&
        it->second.offsets.matches(offsets) && it->second.rows == rows && it->second.cols == cols) {
      return it->second.tiles;
    }
  }
  at::Tensor tiles = detect_2to4(bitmap) ? relayout(bitmap, values, offsets, rows, cols) : at::Tensor();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.relayouts += tiles.defined() ? 1 : 0;
  for (auto it = c.entries.begin(); it != c.entries.end();) {  // drop entries of freed weights
    it = it->second.values.storage.expired() ? c.entries.erase(it) : std::next(it);
  }
  c.entries.insert_or_assign(values.const_data_ptr(), CacheEntry{TensorKey(bitmap), TensorKey(values),
                                                                 TensorKey(offsets), rows, cols, tiles});
  return tiles;
}

// ---- the launch ---------------------------------------------------------------------------------------

int64_t sm_count(const at::Tensor& on) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, on.get_device()));
  return sms;
}

template <typename Scalar, class S>
at::Tensor launch(const at::Tensor& x2d, const at::Tensor& tiles, int64_t rows, const at::Tensor& adapter_b,
                  const at::Tensor& t, const std::optional<at::Tensor>& bias) {
  const int64_t m = x2d.size(0);
  const int64_t row_blocks = tiles.size(0), k_blocks = tiles.size(1);
  const int64_t block_rows = (row_blocks + S::kBlockRowBlocks - 1) / S::kBlockRowBlocks;
  const int64_t token_blocks = (m + S::kTokens - 1) / S::kTokens;
  const int64_t steps = (k_blocks + S::kKTiles - 1) / S::kKTiles;
  // Split K until two waves of resident blocks fill the GPU, keeping >= 2 stages per split (as the
  // unstructured kernel; SALR_CUDA_SPLIT_K forces a count for tuning).
  const int64_t target = 2 * sm_count(x2d) * S::kMinBlocks;
  const int64_t wanted = (target + block_rows * token_blocks - 1) / (block_rows * token_blocks);
  const SplitK plan = plan_split_k(wanted, 1, steps / 2, steps, m, rows, block_rows * token_blocks, x2d);
  const int64_t splits = plan.splits, steps_per_split = plan.steps_per_split;
  const at::Tensor &workspace = plan.workspace, &counters = plan.counters;
  TORCH_CHECK(block_rows < (int64_t{1} << 31) && token_blocks < 65536 && splits < 65536, "salr.", kOp,
              ": the weight or batch is too large for one launch of the 2:4 kernel");

  at::Tensor y = at::empty({m, rows}, x2d.options());
  mma24::Params24 p{};
  p.tiles = static_cast<const uint16_t*>(tiles.const_data_ptr());
  p.row_blocks = row_blocks;
  p.k_blocks = k_blocks;
  p.x = static_cast<const uint16_t*>(x2d.const_data_ptr());
  p.ldx = x2d.stride(0);
  p.cols8 = x2d.size(1);
  p.m = m;
  p.y = static_cast<uint16_t*>(y.data_ptr());
  p.rows = rows;
  p.rank = adapter_b.defined() ? adapter_b.size(1) : 0;
  p.t = p.rank > 0 ? t.const_data_ptr<float>() : nullptr;
  p.adapter_b = p.rank > 0 ? static_cast<const uint16_t*>(adapter_b.const_data_ptr()) : nullptr;
  p.bias = bias.has_value() ? static_cast<const uint16_t*>(bias->const_data_ptr()) : nullptr;
  p.workspace = splits > 1 ? workspace.data_ptr<float>() : nullptr;
  p.counters = splits > 1 ? counters.data_ptr<int>() : nullptr;
  p.splits = static_cast<int>(splits);
  p.steps_per_split = static_cast<int>(steps_per_split);
  p.steps = static_cast<int>(steps);
  const dim3 grid(static_cast<unsigned>(block_rows), static_cast<unsigned>(token_blocks),
                  static_cast<unsigned>(splits));
  mma24::sparse24_forward_kernel<Scalar, S><<<grid, mma24::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

template <typename Scalar>
at::Tensor launch_for_m(const at::Tensor& x2d, const at::Tensor& tiles, int64_t rows, const at::Tensor& adapter_b,
                        const at::Tensor& t, const std::optional<at::Tensor>& bias) {
  return x2d.size(0) <= mma24::kDecodeMaxRows
             ? launch<Scalar, mma24::DecodeShape>(x2d, tiles, rows, adapter_b, t, bias)
             : launch<Scalar, mma24::TiledShape>(x2d, tiles, rows, adapter_b, t, bias);
}

// ---- test hooks ---------------------------------------------------------------------------------------

bool detect_op(const at::Tensor& bitmap) {
  check_cuda("salr_sparse24.detect", "bitmap", bitmap);
  check_dtype("salr_sparse24.detect", "bitmap", bitmap, at::kLong);
  const c10::cuda::CUDAGuard guard(bitmap.device());
  return detect_2to4(bitmap.contiguous());
}

at::Tensor relayout_op(const at::Tensor& bitmap, const at::Tensor& values, const at::Tensor& offsets, int64_t rows,
                       int64_t cols) {
  check_bitmap_weight("salr_sparse24.relayout", bitmap, values, offsets, rows, cols);
  check_cuda("salr_sparse24.relayout", "values", values);
  SALR_CHECK(values.element_size() == 2, "salr_sparse24.relayout", "values must be bfloat16 or float16, got ",
             values.scalar_type());
  const c10::cuda::CUDAGuard guard(values.device());
  return relayout(bitmap, values, offsets, rows, cols);
}

std::vector<int64_t> cache_stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  const int64_t with_tiles = std::count_if(c.entries.begin(), c.entries.end(),
                                           [](const auto& e) { return e.second.tiles.defined(); });
  return {static_cast<int64_t>(c.entries.size()), with_tiles, c.relayouts};
}

}  // namespace

bool sparse24_enabled() {
  const char* flag = std::getenv("SALR_CUDA_SPARSE24");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

std::optional<at::Tensor> sparse24_forward(const at::Tensor& x2d_in, const at::Tensor& bitmap,
                                           const at::Tensor& values, const at::Tensor& offsets, int64_t rows,
                                           int64_t cols, const at::Tensor& adapter_b, const at::Tensor& t,
                                           const std::optional<at::Tensor>& bias) {
  const at::Tensor tiles = cached_tiles(bitmap, values, offsets, rows, cols);
  if (!tiles.defined()) return std::nullopt;
  // x rows 16-byte aligned with a multiple-of-8 width (the kernel copies 8-element chunks).
  const int64_t m = x2d_in.size(0), cols8 = format::tiles_per_band(cols) * format::kTileEdge;
  at::Tensor x2d = x2d_in.contiguous();
  if (cols8 != cols || reinterpret_cast<uintptr_t>(x2d.const_data_ptr()) % 16 != 0) {
    at::Tensor padded = at::zeros({m, cols8}, x2d.options());
    padded.narrow(1, 0, cols).copy_(x2d);
    x2d = padded;
  }
  return values.scalar_type() == at::kBFloat16 ? launch_for_m<__nv_bfloat16>(x2d, tiles, rows, adapter_b, t, bias)
                                               : launch_for_m<__half>(x2d, tiles, rows, adapter_b, t, bias);
}

TORCH_LIBRARY(salr_sparse24, m) {
  m.def("detect(Tensor bitmap) -> bool");
  m.def("relayout(Tensor bitmap, Tensor values, Tensor offsets, int rows, int cols) -> Tensor");
  m.def("cache_stats() -> int[]", &cache_stats);  // [entries, entries of 2:4 weights, re-layouts done]
}

TORCH_LIBRARY_IMPL(salr_sparse24, CUDA, m) {
  m.impl("detect", &detect_op);
  m.impl("relayout", &relayout_op);
}

}  // namespace salr::cuda

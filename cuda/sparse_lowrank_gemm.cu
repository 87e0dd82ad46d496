// salr.sparse_lowrank_gemm on CUDA: y = x·W_sᵀ + (x·Aᵀ)·Bᵀ + bias, y in x's dtype.
//
// Paths (chosen per call):
//   * bf16 / fp16, M < kCudaDenseCrossoverRows: the mma.sync kernel (sparse_mma_kernel.cuh) that
//     streams the compressed weight once and decodes it into tensor-core registers; split-K when
//     the band blocks alone cannot fill the GPU. T = x·Aᵀ comes from cuBLAS in fp32 (one small
//     GEMM) and the kernel's epilogue adds T·Bᵀ and the bias before the one rounding.
//   * M >= the crossover (compute-bound), every fp32 call and every int8 call (issue 21, dequantized
//     into x's dtype: correct, not fast): decode the weight into a dense
//     scratch (bitmap_decode's kernel) and let cuBLAS multiply (at::mm / at::addmm). fp32 has no
//     sparse kernel on CUDA: it always takes this path (simple, and fp32 inference is rare).
#include <ATen/ATen.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>

#include "cuda_common.cuh"
#include "sparse24_gemm.h"
#include "sparse_mma_kernel.cuh"
#include "stream_gemm.h"

namespace salr::cuda {
namespace {

constexpr const char* kOp = "sparse_lowrank_gemm";

// Rows of x from which decode + cuBLAS beats the mma kernel. The kernel re-reads the compressed
// weight once per 16 tokens (grid.y), so its time grows in steps of 16 rows while decode + cuBLAS
// stays flat. Measured with `python bench/bench_cuda.py --crossover` (both paths forced through
// SALR_CUDA_DENSE_CROSSOVER, CUDA graphs, 50% sparsity) on an H100: 11008x4096 kernel 96 µs vs
// dense path 112 µs at M = 32, 134 vs 109 at M = 48; 4096x4096 42 vs 42 at 32, 60 vs 41 at 48.
// SALR_CUDA_DENSE_CROSSOVER overrides it.
constexpr int64_t kCudaDenseCrossoverRows = 48;

// The split-K target: two waves of resident mma blocks (4 per SM, shared-memory bound). Measured
// on an H100 with `bench_cuda.py --splits` (11008x4096 and 4096x4096, M = 1 and 16): one wave left
// SMs idle behind the slowest blocks, 2-3 waves were ~10% faster, more splits cost partial sums.
int64_t target_blocks(int device) {
  static std::array<std::atomic<int>, 64> sm_counts{};
  int sms = device < 64 ? sm_counts[device].load() : 0;
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    if (device < 64) sm_counts[device].store(sms);
  }
  return 2 * static_cast<int64_t>(sms) * mma::kMinBlocksPerSm;
}

using Adapter = CheckedAdapter;  // op_checks.h: a, b (contiguous), rank

// Decode + cuBLAS: the large-M path, the fp32 path and every int8 call (dequantized, issue 21).
at::Tensor dense_path(const at::Tensor& x2d, const at::Tensor& bitmap, const at::Tensor& values,
                      const at::Tensor& offsets, int64_t rows, int64_t cols, const Adapter& adapter,
                      const at::Tensor& t, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& scales) {
  const at::Tensor weight = dense_weight(bitmap, values, offsets, rows, cols, scales, x2d.scalar_type());
  if (adapter.rank == 0) {
    return bias.has_value() ? at::addmm(*bias, x2d, weight.t()) : at::mm(x2d, weight.t());
  }
  // With an adapter, sum the three terms in fp32 and round once (as the CPU dense path does).
  at::Tensor acc = at::mm(x2d, weight.t()).to(at::kFloat);
  acc.addmm_(t, adapter.b.to(at::kFloat).t());
  if (bias.has_value()) acc.add_(bias->to(at::kFloat));
  return acc.to(x2d.scalar_type());
}

template <typename Scalar>
void launch_mma(const mma::ForwardParams& params, dim3 grid) {
  mma::sparse_mma_forward_kernel<Scalar>
      <<<grid, mma::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The mma path: x rows must be 16-byte aligned with a multiple-of-8 width (else padded here),
// values 16-byte aligned (else copied: a view at an odd offset).
at::Tensor sparse_path(const at::Tensor& x2d_in, const at::Tensor& bitmap, const at::Tensor& values_in,
                       const at::Tensor& offsets, int64_t rows, int64_t cols, const Adapter& adapter,
                       const at::Tensor& t, const std::optional<at::Tensor>& bias) {
  const int64_t m = x2d_in.size(0);
  const int64_t cols8 = format::tiles_per_band(cols) * format::kTileEdge;
  at::Tensor x2d = x2d_in.contiguous();
  if (cols8 != cols || reinterpret_cast<uintptr_t>(x2d.const_data_ptr()) % 16 != 0) {
    at::Tensor padded = at::zeros({m, cols8}, x2d.options());
    padded.narrow(1, 0, cols).copy_(x2d);
    x2d = padded;
  }
  at::Tensor values = values_in;
  if (values.numel() > 0 && reinterpret_cast<uintptr_t>(values.const_data_ptr()) % 16 != 0) values = values.clone();
  at::Tensor y = at::empty({m, rows}, x2d.options());

  const int64_t bands = format::num_bands(rows), groups = format::groups_per_band(cols);
  const int64_t band_blocks = (bands + mma::kBandsPerBlock - 1) / mma::kBandsPerBlock;
  const int64_t token_blocks = (m + mma::kTokensPerBlock - 1) / mma::kTokensPerBlock;
  // Split K until the grid fills the GPU, at most kMaxGroupsPerSplit groups per split and at least
  // 4 per split (each split pays a pipeline fill and a partial-tile round trip).
  const int64_t min_splits = (groups + mma::kMaxGroupsPerSplit - 1) / mma::kMaxGroupsPerSplit;
  const int64_t wanted = (target_blocks(values.get_device()) + band_blocks * token_blocks - 1) /
                         (band_blocks * token_blocks);
  const SplitK plan = plan_split_k(wanted, min_splits, groups / 4, groups, m, rows, band_blocks * token_blocks, x2d);
  const int64_t splits = plan.splits, groups_per_split = plan.steps_per_split;
  const at::Tensor &workspace = plan.workspace, &counters = plan.counters;
  TORCH_CHECK(band_blocks < (int64_t{1} << 31) && token_blocks < 65536 && splits < 65536, "salr.", kOp,
              ": the weight or batch is too large for one launch (", band_blocks, " x ", token_blocks, " x ",
              splits, " blocks)");

  mma::ForwardParams p{};
  p.bitmap = reinterpret_cast<const uint64_t*>(bitmap.const_data_ptr<int64_t>());
  p.values = static_cast<const uint16_t*>(values.const_data_ptr());
  p.offsets = offsets.const_data_ptr<int32_t>();
  p.nnz = values.size(0);
  p.rows = rows;
  p.bands = bands;
  p.tiles = format::tiles_per_band(cols);
  p.groups = groups;
  p.x = static_cast<const uint16_t*>(x2d.const_data_ptr());
  p.ldx = x2d.stride(0);
  p.cols8 = cols8;
  p.m = m;
  p.y = static_cast<uint16_t*>(y.data_ptr());
  p.t = adapter.rank > 0 ? t.const_data_ptr<float>() : nullptr;
  p.adapter_b = adapter.rank > 0 ? static_cast<const uint16_t*>(adapter.b.const_data_ptr()) : nullptr;
  p.rank = adapter.rank;
  p.bias = bias.has_value() ? static_cast<const uint16_t*>(bias->const_data_ptr()) : nullptr;
  p.workspace = splits > 1 ? workspace.data_ptr<float>() : nullptr;
  p.counters = splits > 1 ? counters.data_ptr<int>() : nullptr;
  p.splits = static_cast<int>(splits);
  p.groups_per_split = static_cast<int>(groups_per_split);
  const dim3 grid(static_cast<unsigned>(band_blocks), static_cast<unsigned>(token_blocks),
                  static_cast<unsigned>(splits));
  if (values.scalar_type() == at::kBFloat16) {
    launch_mma<__nv_bfloat16>(p, grid);
  } else {
    launch_mma<__half>(p, grid);
  }
  return y;
}

at::Tensor sparse_lowrank_gemm_cuda(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& values,
                                    const at::Tensor& offsets, int64_t out_features, int64_t in_features,
                                    const std::optional<at::Tensor>& adapter_a,
                                    const std::optional<at::Tensor>& adapter_b,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& scales,
                                    const std::optional<at::Tensor>& adapter_scales) {
  const int64_t rows = out_features, cols = in_features;
  check_cuda(kOp, "values", values);
  // An int8 adapter is dequantized into x's dtype: the epilogues read B as they read a float one.
  const Adapter adapter = dequantized_adapter(
      check_sparse_lowrank_gemm_args(kOp, x, bitmap, values, offsets, rows, cols, adapter_a, adapter_b, bias, scales,
                                     adapter_scales),
      x.scalar_type());
  const std::optional<at::Tensor> bias_c =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const c10::cuda::CUDAGuard guard(values.device());

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = rows;
  const int64_t m = c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor x2d = x.reshape({m, cols});
  if (m == 0 || rows == 0) return at::empty(out_shape, x.options());
  if (cols == 0) {  // no K: only the bias survives (x·Aᵀ is zero too)
    at::Tensor y = at::zeros({m, rows}, x.options());
    if (bias_c.has_value()) y.add_(*bias_c);
    return y.view(out_shape);
  }
  // T = x·Aᵀ once, in fp32: the rank-R intermediate every output tile's epilogue reads.
  at::Tensor t;
  if (adapter.rank > 0) t = at::mm(x2d.to(at::kFloat), adapter.a.to(at::kFloat).t()).contiguous();

  const bool mma_dtype = values.scalar_type() == at::kBFloat16 || values.scalar_type() == at::kHalf;
  if (mma_dtype && sparse24_enabled()) {  // 2:4 weights on the sparse tensor cores (sparse24_gemm.cu)
    auto y24 = sparse24_forward(x2d, bitmap, values, offsets, rows, cols, adapter.b, t, bias_c);
    if (y24.has_value()) return y24->view(out_shape);  // nullopt: W is not 2:4
  }
  if (mma_dtype && m <= stream::kMaxStreamRows && stream::selected()) {  // opt-in: SALR_CUDA_KERNEL=stream
    return stream::forward(x2d, bitmap, values, offsets, rows, cols, adapter.b, adapter.rank, t, bias_c).view(out_shape);
  }
  at::Tensor y = mma_dtype && m < cuda_dense_crossover_rows(kCudaDenseCrossoverRows)
                     ? sparse_path(x2d, bitmap, values, offsets, rows, cols, adapter, t, bias_c)
                     : dense_path(x2d, bitmap, values, offsets, rows, cols, adapter, t, bias_c, scales);
  return y.view(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(salr, CUDA, m) { m.impl("sparse_lowrank_gemm", &sparse_lowrank_gemm_cuda); }

}  // namespace salr::cuda

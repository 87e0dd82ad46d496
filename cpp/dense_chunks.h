// Decode a BM8x8 weight a few bands at a time into a reused, cache-sized dense scratch: the
// large-M paths hand each chunk to ATen's GEMM without ever holding the whole N×K weight.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <optional>

#include "checks.h"
#include "op_checks.h"

namespace salr {

// Weights decoded per chunk: 2 MB in bf16 (4 MB fp32). Measured on 11008x4096, M = 64 and 128:
// 1M elements decodes ~2x faster than 4M (the chunk stays near L2) and ATen's GEMM on 256-row
// chunks is within ~5% of one GEMM on the whole matrix.
constexpr int64_t kDenseChunkElements = int64_t{1} << 20;

// The decode scratch, kept per calling thread: a fresh multi-MB allocation per call would be
// mmap'ed and page-faulted every time (~0.5 ms at 2 MB), on every call of a large-M GEMM. Slot 0
// holds the decoded chunk, slot 1 its fp32 copy when the GEMM runs in fp32.
inline at::Tensor chunk_scratch(int64_t rows, int64_t cols, at::ScalarType dtype, int slot = 0) {
  thread_local at::Tensor buffers[2];
  at::Tensor& buffer = buffers[slot];
  const int64_t bytes = rows * cols * static_cast<int64_t>(c10::elementSize(dtype));
  if (!buffer.defined() || buffer.numel() < bytes) {
    buffer = at::empty({std::max<int64_t>(bytes, 1)}, at::TensorOptions().dtype(at::kByte));
  }
  return buffer.narrow(0, 0, bytes).view(dtype).view({rows, cols});
}

// The dtype the large-M path hands to ATen's GEMM for a weight of `dtype` (fp32 for a bf16 weight
// on a CPU without a fast bf16 GEMM; kernels::selected_dense_gemm_dtype has the rule).
inline at::ScalarType dense_gemm_dtype(const char* op, at::ScalarType dtype) {
  kernels::DType gemm_dtype;
  const char* error = nullptr;
  SALR_CHECK(kernels::selected_dense_gemm_dtype(kernel_dtype(dtype), &gemm_dtype, &error), op, error);
  return gemm_dtype == kernel_dtype(dtype) ? dtype : at::kFloat;
}

// Rows of x (or of dy) from which decode + dense GEMM beats the sparse kernels. Measured with
// `python bench/bench_gemm.py --crossover` (bench/RESULTS.md): below it the kernels are
// memory-bound and win by the compression ratio; above it ATen's blocked GEMM wins on FLOPs.
// SALR_CPU_DENSE_CROSSOVER overrides it (the benchmark forces each path with it; tune per machine).
constexpr int64_t kDenseCrossoverRows = 64;
// fp32 forward: the FMA-form kernel still beat decode + oneDNN's fp32 GEMM by ~20% at M = 128,
// the largest M measured, so the switch sits above it.
constexpr int64_t kDenseCrossoverRowsFp32Forward = 256;

inline int64_t dense_crossover_rows(int64_t default_rows = kDenseCrossoverRows) {
  const char* forced = std::getenv("SALR_CPU_DENSE_CROSSOVER");
  if (forced == nullptr || forced[0] == '\0') return default_rows;
  char* end = nullptr;
  const long long value = std::strtoll(forced, &end, 10);
  TORCH_CHECK(end != forced && *end == '\0' && value > 0,
              "salr: SALR_CPU_DENSE_CROSSOVER must be a positive integer, got '", forced, "'");
  return value;
}

// Calls fn(band_begin, band_end, row_begin, row_end) for consecutive chunks of whole bands sized
// so that a dense [rows, cols] chunk holds about kDenseChunkElements.
template <typename Fn>
void for_each_band_chunk(int64_t rows, int64_t cols, Fn&& fn) {
  const int64_t bands = format::num_bands(rows);
  const int64_t chunk_bands = std::max<int64_t>(1, kDenseChunkElements / std::max<int64_t>(1, 8 * cols));
  for (int64_t b0 = 0; b0 < bands; b0 += chunk_bands) {
    const int64_t b1 = std::min(bands, b0 + chunk_bands);
    fn(b0, b1, 8 * b0, std::min(rows, 8 * b1));
  }
}

// Calls fn(row_begin, row_end, dense_rows) for each band chunk of a [rows, cols] weight, written into
// one reused scratch of `dtype` by decode(base, band_begin, band_end) (-1 or the first bad group; it
// writes band b's rows at base + 8*b*cols elements).
template <typename DecodeFn, typename Fn>
void for_each_chunk_decoded_by(const char* op, int64_t rows, int64_t cols, at::ScalarType dtype,
                               DecodeFn&& decode, Fn&& fn) {
  at::Tensor scratch;
  FirstBadGroup bad;
  const int64_t element_size = static_cast<int64_t>(c10::elementSize(dtype));
  for_each_band_chunk(rows, cols, [&](int64_t b0, int64_t b1, int64_t r0, int64_t r1) {
    if (!scratch.defined()) scratch = chunk_scratch(r1 - r0, cols, dtype);
    // decode writes a band at its row in the full matrix: shift the base so b0 lands at row 0.
    char* base = static_cast<char*>(scratch.data_ptr()) - r0 * cols * element_size;
    at::parallel_for(b0, b1, 1, [&](int64_t c0, int64_t c1) { bad.note(decode(base, c0, c1)); });
    if (bad.index >= 0) fail_inconsistent(op, bad.index, cols);
    fn(r0, r1, scratch.narrow(0, 0, r1 - r0));
  });
}

// Calls fn(row_begin, row_end, dense_rows) for each band chunk, decoded into one reused scratch and,
// when `gemm_dtype` differs from the weight's, copied into a second one in that dtype.
template <typename Fn>
void for_each_decoded_chunk(const char* op, const kernels::SparseWeightView& view,
                            const at::Tensor& values, at::ScalarType gemm_dtype, Fn&& fn) {
  const kernels::DecodeBandsFn decode = selected_kernels(op).decode;
  at::Tensor widened;
  for_each_chunk_decoded_by(
      op, view.rows, view.cols, values.scalar_type(),
      [&](char* base, int64_t c0, int64_t c1) { return decode(view, base, c0, c1); },
      [&](int64_t r0, int64_t r1, const at::Tensor& chunk) {
        if (gemm_dtype == values.scalar_type()) return fn(r0, r1, chunk);
        if (!widened.defined()) widened = chunk_scratch(chunk.size(0), view.cols, gemm_dtype, 1);
        fn(r0, r1, widened.narrow(0, 0, r1 - r0).copy_(chunk));
      });
}

// Folding the adapter into an fp32 chunk (W_c += B_c·A: chunk rows × R × K multiply-adds, N·R·K for
// the call) costs less than applying it to the activations (M·R·(K + N): x·Aᵀ then ·Bᵀ, or dy·B then
// ·A) once M·(K + N) > N·K: a training batch (M = 1024 at 576×576: 3.6× fewer). Only fp32 chunks: in
// a 16-bit chunk W + B·A would be rounded to 8 or 11 bits before the GEMM.
// (Never with K = 0: there x·Aᵀ·Bᵀ still reads B, and 0·NaN in B must reach y as in the reference.)
inline bool adapter_fold_pays(const CheckedAdapter& adapter, int64_t m, int64_t rows, int64_t cols) {
  return adapter.rank > 0 && cols > 0 && m * (cols + rows) > rows * cols;
}

// w_chunk (rows [r0, r1) of the weight, this call's scratch, decoded afresh for every chunk) += B_c·A;
// `a_f32` caches A in fp32 across the chunks of one call.
inline void fold_adapter(const at::Tensor& w_chunk, const CheckedAdapter& adapter, int64_t r0, int64_t r1,
                         at::Tensor& a_f32) {
  if (!a_f32.defined()) a_f32 = adapter.a.to(at::kFloat);
  at::Tensor w = w_chunk;
  w.addmm_(adapter.b.narrow(0, r0, r1 - r0).to(at::kFloat), a_f32);
}

// y[:, chunk rows] = x · W_chunkᵀ (+ T · B_chunkᵀ + bias) for every chunk that for_each_chunk(fn)
// hands to fn(row_begin, row_end, w_chunk): the large-M path of sparse_lowrank_gemm, float or int8.
// The GEMM runs in the chunks' dtype (fp32 where dense_gemm_dtype widened them).
template <typename ForEachChunk>
void chunked_lowrank_gemm(ForEachChunk&& for_each_chunk, const at::Tensor& x2d, const CheckedAdapter& adapter,
                          const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const bool fold_pays = adapter_fold_pays(adapter, x2d.size(0), y.size(1), x2d.size(1));
  at::Tensor t, a_f32, x_gemm;
  for_each_chunk([&](int64_t r0, int64_t r1, const at::Tensor& w_chunk) {
    if (!x_gemm.defined()) x_gemm = x2d.to(w_chunk.scalar_type());
    at::Tensor y_chunk = y.narrow(1, r0, r1 - r0);
    const bool fold = fold_pays && w_chunk.scalar_type() == at::kFloat;
    if (fold) fold_adapter(w_chunk, adapter, r0, r1, a_f32);
    const bool adapter_in_epilogue = adapter.rank > 0 && !fold;
    if (!adapter_in_epilogue && w_chunk.scalar_type() == y.scalar_type()) {
      // Straight into y's columns (BLAS writes a row-major block with y's row stride): no temporary
      // of M×chunk rows to allocate, fault in and copy.
      if (bias.has_value()) {
        at::addmm_out(y_chunk, bias->narrow(0, r0, r1 - r0), x_gemm, w_chunk.t());
      } else {
        at::mm_out(y_chunk, x_gemm, w_chunk.t());
      }
      return;
    }
    // Sum the terms in fp32 and round once (a 16-bit GEMM's own output is rounded).
    at::Tensor acc = at::mm(x_gemm, w_chunk.t()).to(at::kFloat);
    if (adapter_in_epilogue) {
      // T = x·Aᵀ once, in fp32: the rank-R intermediate every chunk's epilogue reads.
      if (!t.defined()) t = at::mm(x2d.to(at::kFloat), adapter.a.to(at::kFloat).t()).contiguous();
      acc.addmm_(t, adapter.b.narrow(0, r0, r1 - r0).to(at::kFloat).t());
    }
    if (bias.has_value()) acc.add_(bias->narrow(0, r0, r1 - r0).to(at::kFloat));
    y_chunk.copy_(acc);
  });
}

// dx = dy · (W + B·A) in fp32 over the fp32 chunks for_each_chunk(fn) hands to fn(row_begin,
// row_end, w_chunk): the large-M path of sparse_gemm_transposed, float or int8.
template <typename ForEachChunk>
at::Tensor chunked_transposed_gemm(ForEachChunk&& for_each_chunk, const at::Tensor& dy2d, int64_t cols,
                                   const CheckedAdapter& adapter) {
  const int64_t m = dy2d.size(0), rows = dy2d.size(1);
  const bool fold = adapter_fold_pays(adapter, m, rows, cols);
  at::Tensor acc = at::zeros({m, cols}, dy2d.options().dtype(at::kFloat));
  const at::Tensor dy32 = dy2d.to(at::kFloat);
  at::Tensor a_f32;
  for_each_chunk([&](int64_t r0, int64_t r1, const at::Tensor& w_chunk) {
    if (fold) fold_adapter(w_chunk, adapter, r0, r1, a_f32);
    acc.addmm_(dy32.narrow(1, r0, r1 - r0), w_chunk);
  });
  if (adapter.rank > 0 && !fold) acc.addmm_(at::mm(dy32, adapter.b.to(at::kFloat)), adapter.a.to(at::kFloat));
  return acc;
}

// dx += (dy·B)·A, summed in fp32 and rounded once more into dx's dtype: the adapter term of the
// small-M transposed product, whose sparse part the kernels wrote into dx.
inline void add_adapter_x_gradient(const at::Tensor& dy2d, const CheckedAdapter& adapter, at::Tensor& dx) {
  if (adapter.rank == 0) return;
  const at::Tensor t = at::mm(dy2d.to(at::kFloat), adapter.b.to(at::kFloat));
  dx.copy_(at::addmm(dx.to(at::kFloat), t, adapter.a.to(at::kFloat)));
}

}  // namespace salr

// Every salr op schema, once (design.md §2). Backends only add implementations
// (TORCH_LIBRARY_IMPL in cpu/<op>.cpp / cuda/<op>.cu); fake kernels and autograd live in
// python/salr/_meta.py.
#include <torch/library.h>

TORCH_LIBRARY(salr, m) {
  // dense [rows, cols] -> (bitmap int64 [bands, tiles], values [nnz], offsets int32 [bands*groups+1]);
  // dense and values: float32, bfloat16, float16 or int8 (the quantized values of issue 21)
  m.def("bitmap_encode(Tensor dense) -> (Tensor bitmap, Tensor values, Tensor offsets)");
  m.def("bitmap_decode(Tensor bitmap, Tensor values, Tensor offsets, SymInt rows, SymInt cols) -> Tensor");
  // y = x·W_sᵀ + (x·adapter_aᵀ)·adapter_bᵀ + bias; x [..., in_features] -> y [..., out_features].
  // int8 values (issue 21) need fp32 `scales`, [out_features] or [out_features, ceil(in_features/64)]:
  // W[n, k] = scales[n] · q[n, k] (resp. scales[n, k // 64] · q[n, k]); refused with float values.
  // An int8 adapter: adapter_a, adapter_b int8 with fp32 adapter_scales [out_features], so that
  // adapter_b·adapter_a reads diag(adapter_scales)·q_b·q_a (any base, float or int8).
  m.def(
      "sparse_lowrank_gemm(Tensor x, Tensor bitmap, Tensor values, Tensor offsets, "
      "SymInt out_features, SymInt in_features, Tensor? adapter_a=None, Tensor? adapter_b=None, "
      "Tensor? bias=None, Tensor? scales=None, Tensor? adapter_scales=None) -> Tensor");
  // dx = dy·(W_s + adapter_b·adapter_a): dy [..., out_features] -> dx [..., in_features], the x-gradient
  // of sparse_lowrank_gemm with the same adapters (optional, shapes as there); scales as above
  m.def(
      "sparse_gemm_transposed(Tensor grad_out, Tensor bitmap, Tensor values, Tensor offsets, "
      "SymInt out_features, SymInt in_features, Tensor? scales=None, Tensor? adapter_a=None, "
      "Tensor? adapter_b=None) -> Tensor");
  // (leftᵀ·right) at the bitmap's nonzeros, shaped and typed like values: left [T, out_features],
  // right [T, in_features]. The values-gradient (left=dy, right=x) and LoSA's masked B·A.
  m.def(
      "sampled_gemm(Tensor left, Tensor right, Tensor bitmap, Tensor values, Tensor offsets, "
      "SymInt out_features, SymInt in_features) -> Tensor");
}

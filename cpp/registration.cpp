// Every salr op schema, once (design.md §2). Backends only add implementations
// (TORCH_LIBRARY_IMPL in cpu/<op>.cpp / cuda/<op>.cu); fake kernels and autograd live in
// python/salr/_meta.py.
#include <torch/library.h>

TORCH_LIBRARY(salr, m) {
  // dense [rows, cols] -> (bitmap int64 [bands, tiles], values [nnz], offsets int32 [bands*groups+1])
  m.def("bitmap_encode(Tensor dense) -> (Tensor bitmap, Tensor values, Tensor offsets)");
  m.def("bitmap_decode(Tensor bitmap, Tensor values, Tensor offsets, SymInt rows, SymInt cols) -> Tensor");
  // y = x·W_sᵀ + (x·adapter_aᵀ)·adapter_bᵀ + bias; x [..., in_features] -> y [..., out_features]
  m.def(
      "sparse_lowrank_gemm(Tensor x, Tensor bitmap, Tensor values, Tensor offsets, "
      "SymInt out_features, SymInt in_features, Tensor? adapter_a=None, Tensor? adapter_b=None, "
      "Tensor? bias=None) -> Tensor");
  // dx = dy·W_s: dy [..., out_features] -> dx [..., in_features] (the x-gradient)
  m.def(
      "sparse_gemm_transposed(Tensor grad_out, Tensor bitmap, Tensor values, Tensor offsets, "
      "SymInt out_features, SymInt in_features) -> Tensor");
  // (leftᵀ·right) at the bitmap's nonzeros, shaped and typed like values: left [T, out_features],
  // right [T, in_features]. The values-gradient (left=dy, right=x) and LoSA's masked B·A.
  m.def(
      "sampled_gemm(Tensor left, Tensor right, Tensor bitmap, Tensor values, Tensor offsets, "
      "SymInt out_features, SymInt in_features) -> Tensor");
}

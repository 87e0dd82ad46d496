"""The ops layer: typed entry points of ``torch.ops.salr.*`` (:mod:`.wrappers`, re-exported here),
their fake kernels and autograd formulas (:mod:`._meta`, registered on import), the pure-PyTorch
definitions (:mod:`.reference`) and the BM8x8 weight container (:mod:`.format`)."""

from salr.ops import _meta  # noqa: F401 (registers the fake kernels and autograd formulas)
from salr.ops.wrappers import (bitmap_decode, bitmap_encode, sampled_gemm, sparse_gemm_transposed,
                               sparse_lowrank_gemm)

__all__ = ["bitmap_decode", "bitmap_encode", "sampled_gemm", "sparse_gemm_transposed", "sparse_lowrank_gemm"]

"""Typed entry points for the salr ops (``torch.ops.salr.*``).

Every function dispatches to the native kernel for the tensors' device (the dispatcher chooses:
CPU AVX-512 / AVX2 / scalar by cpuid or ``SALR_CPU_ISA``; CUDA when built) and falls back to
:mod:`salr.ops.reference` when the native library is not loaded. Shapes use N = out_features,
K = in_features; a BM8x8 weight is ``(bitmap int64 [ceil(N/8), ceil(K/8)], values [nnz],
offsets int32 [ceil(N/8)*ceil(K/64) + 1])``. Dtypes: float32, bfloat16, float16; x, adapters, bias
and values share one dtype; accumulation is fp32.

int8 values (a quantized, frozen base): the two products then take ``scales``, float32 [N] (one per
output row) or [N, ceil(K/64)] (one per row and 64-column group, the offsets' groups), finite and
> 0, with W[n, k] = scales[n] · q[n, k] (resp. scales[n, k // 64] · q[n, k]); x, adapters and bias
share any one float dtype. ``scales`` is refused with float values, ``sampled_gemm`` refuses int8
values (no values-gradient), and encode / decode move int8 values as they are (no scales).

Non-finite inputs: NaN/inf in ``values``, adapters or bias propagate as in the dense product. NaN/inf
in ``x`` propagate through stored nonzeros; whether they also reach outputs through pruned zeros
(IEEE 0·inf = NaN) depends on the kernel path (SIMD paths multiply whole 8x8 tiles). bf16 inputs
below the smallest normal (|v| < 2^-126) are read as zero by the AVX-512 BF16 kernel (vdpbf16ps) and
by the large-M dense path (oneDNN), not by the scalar / AVX2 kernels. tests/fuzz states the contract.
"""

from __future__ import annotations

import torch

from salr.ops import _meta, reference
from salr._native import native_available

Tensor = torch.Tensor
_below_autograd = torch._C._AutoDispatchBelowAutograd


def _needs_autograd(x: Tensor, values: Tensor, adapter_a: Tensor | None, adapter_b: Tensor | None,
                    bias: Tensor | None) -> bool:
    """Whether a sparse_lowrank_gemm call must pass through the op's autograd kernel: some input needs
    a gradient, or a compiler is tracing (it must see the op whole). Plain attribute tests: a
    generator over the tensors costs more than the small layers' kernels save."""
    if torch.compiler.is_compiling():
        return True
    if not torch.is_grad_enabled():
        return False
    return (x.requires_grad or values.requires_grad or (adapter_a is not None and adapter_a.requires_grad)
            or (adapter_b is not None and adapter_b.requires_grad) or (bias is not None and bias.requires_grad))


def bitmap_encode(dense: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Encode a dense [N, K] float or int8 weight as BM8x8 ``(bitmap, values, offsets)``. -0.0 counts as zero."""
    if native_available():
        return torch.ops.salr.bitmap_encode(dense)
    return reference.bitmap_encode(dense)


def bitmap_decode(bitmap: Tensor, values: Tensor, offsets: Tensor, rows: int, cols: int) -> Tensor:
    """Decode a BM8x8 weight to a dense [rows, cols] tensor of ``values.dtype`` (int8 stays int8)."""
    if native_available():
        return torch.ops.salr.bitmap_decode(bitmap, values, offsets, rows, cols)
    return reference.bitmap_decode(bitmap, values, offsets, rows, cols)


def sparse_lowrank_gemm(x: Tensor, bitmap: Tensor, values: Tensor, offsets: Tensor,
                        out_features: int, in_features: int, adapter_a: Tensor | None = None,
                        adapter_b: Tensor | None = None, bias: Tensor | None = None, *,
                        scales: Tensor | None = None, frozen_adapter: tuple[Tensor, Tensor] | None = None,
                        adapter_scales: Tensor | None = None) -> Tensor:
    """``y = x·W_sᵀ + (x·adapter_aᵀ)·adapter_bᵀ + bias``.

    x: [..., K]; adapter_a: [R, K] (stacked adapters [A1; A2; ...]); adapter_b: [N, R]
    ([s1·B1, s2·B2, ...], scales folded in); bias: [N]; scales: with int8 values only (module doc).
    frozen_adapter: (A_f [R_f, K], B_f [N, R_f]) that never train (SALR's SVD residual under a
    LoRA): stacked before adapter_a / adapter_b into the same single GEMM, and the backward forms no
    gradient products for them; refused if either requires a gradient.
    adapter_scales: float32 [N], finite, > 0, for an int8 adapter (adapter_a = q_a, adapter_b = q_b,
    both int8): B·A = diag(adapter_scales)·q_b·q_a (:func:`salr.prune.quantize.quantize_adapter_int8`),
    with a float or an int8 base; an inference form (frozen, no frozen_adapter beside it).
    Returns [..., N] in x's dtype. Differentiable in x, values (float values), adapter_a, adapter_b
    (float adapters) and bias.
    """
    if adapter_scales is not None and (frozen_adapter is not None or adapter_scales.requires_grad):
        raise ValueError("salr.ops.sparse_lowrank_gemm: adapter_scales: an int8 adapter is frozen and whole "
                         "(no frozen_adapter beside it, no gradient for its scales)")
    if frozen_adapter is not None:
        frozen_a, frozen_b = frozen_adapter
        if frozen_a.requires_grad or frozen_b.requires_grad:
            raise ValueError("salr.ops.sparse_lowrank_gemm: frozen_adapter tensors must not require a gradient "
                             "(pass a trainable adapter as adapter_a / adapter_b)")
        if (adapter_a is None) != (adapter_b is None):
            raise ValueError("salr.ops.sparse_lowrank_gemm: adapter_a and adapter_b must be given together")
        if adapter_a is None:
            adapter_a, adapter_b = frozen_a, frozen_b
        elif (native_available() and not torch.compiler.is_compiling()
              and _needs_autograd(x, values, adapter_a, adapter_b, bias)):
            return _meta.FrozenPrefixGemm.apply(x, bitmap, values, offsets, out_features, in_features, frozen_a,
                                                frozen_b, adapter_a, adapter_b, bias, scales)
        else:
            adapter_a, adapter_b = torch.cat((frozen_a, adapter_a), 0), torch.cat((frozen_b, adapter_b), 1)
    if native_available():
        op = torch.ops.salr.sparse_lowrank_gemm.default
        if _needs_autograd(x, values, adapter_a, adapter_b, bias):
            return op(x, bitmap, values, offsets, out_features, in_features, adapter_a, adapter_b, bias, scales,
                      adapter_scales)
        # Nothing to differentiate: go straight to the backend kernel. The autograd kernel that
        # torch.library.register_autograd installs is Python and runs on every call, even under
        # no_grad (~3 µs, as much as a small layer's whole GEMV); skipping it is what torch.library's
        # own no-grad branch does, without the round trip through Python.
        with _below_autograd():
            return op(x, bitmap, values, offsets, out_features, in_features, adapter_a, adapter_b, bias, scales,
                      adapter_scales)
    return reference.sparse_lowrank_gemm(x, bitmap, values, offsets, out_features, in_features,
                                         adapter_a, adapter_b, bias, scales, adapter_scales)


def sparse_gemm_transposed(grad_out: Tensor, bitmap: Tensor, values: Tensor, offsets: Tensor,
                           out_features: int, in_features: int, *, scales: Tensor | None = None,
                           adapter_a: Tensor | None = None, adapter_b: Tensor | None = None) -> Tensor:
    """``dx = dy·(W_s + adapter_b·adapter_a)``: grad_out [..., N] -> [..., K], the x-gradient of
    sparse_lowrank_gemm with the same (optional) adapters."""
    if native_available():
        return torch.ops.salr.sparse_gemm_transposed(grad_out, bitmap, values, offsets, out_features, in_features,
                                                     scales, adapter_a, adapter_b)
    return reference.sparse_gemm_transposed(grad_out, bitmap, values, offsets, out_features, in_features, scales,
                                            adapter_a, adapter_b)


def sampled_gemm(left: Tensor, right: Tensor, bitmap: Tensor, values: Tensor, offsets: Tensor,
                 out_features: int, in_features: int) -> Tensor:
    """``(leftᵀ·right)`` at the bitmap's nonzeros, shaped and typed like ``values`` (float values only).

    left: [T, N], right: [T, K]. With left = dy and right = x this is the values-gradient; with
    left = Bᵀ and right = A it is LoSA's mask-sampled low-rank update.
    """
    if native_available():
        return torch.ops.salr.sampled_gemm(left, right, bitmap, values, offsets, out_features, in_features)
    return reference.sampled_gemm(left, right, bitmap, values, offsets, out_features, in_features)

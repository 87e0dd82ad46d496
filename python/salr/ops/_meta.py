"""Fake (meta) kernels and autograd formulas for every ``torch.ops.salr`` op, in one place
(design.md §2). Nothing here runs a kernel: the backward is written with the ops themselves, so the
x-gradient is a transposed sparse product and the values-gradient a sampled product over the same
bitmap, never a decoded dense weight.
"""

from __future__ import annotations

import torch

from salr._native import native_available
from salr.ops import reference


def _check_one_device(op: str, **tensors) -> None:
    """The fake kernels' device check: a meta tensor among real ones must not yield a fake result."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise RuntimeError(f"salr.{op}: all tensors must be on one device, got {devices}")


def _check_scales_given(op: str, values, scales) -> None:
    """The fake kernels' scales check: required with int8 values, refused otherwise (the kernels
    check their dtype, shape and values)."""
    if (values.dtype == torch.int8) != (scales is not None):
        raise RuntimeError(f"salr.{op}: scales must be given exactly when values are int8, got "
                           f"{values.dtype} values and scales={'a tensor' if scales is not None else None}")


def _register() -> None:
    @torch.library.register_fake("salr::bitmap_encode")
    def _encode_fake(dense):
        rows, cols = dense.shape
        bands, tiles = (rows + 7) // 8, (cols + 7) // 8
        groups = (tiles + 7) // 8
        nnz = torch.library.get_ctx().new_dynamic_size()
        return (dense.new_empty((bands, tiles), dtype=torch.int64), dense.new_empty((nnz,)),
                dense.new_empty((bands * groups + 1,), dtype=torch.int32))

    @torch.library.register_fake("salr::bitmap_decode")
    def _decode_fake(bitmap, values, offsets, rows, cols):
        _check_one_device("bitmap_decode", bitmap=bitmap, values=values, offsets=offsets)
        return values.new_empty((rows, cols))

    @torch.library.register_fake("salr::sparse_lowrank_gemm")
    def _gemm_fake(x, bitmap, values, offsets, out_features, in_features, adapter_a=None,
                   adapter_b=None, bias=None, scales=None, adapter_scales=None):
        _check_one_device("sparse_lowrank_gemm", x=x, bitmap=bitmap, values=values, offsets=offsets,
                          adapter_a=adapter_a, adapter_b=adapter_b, bias=bias, scales=scales,
                          adapter_scales=adapter_scales)
        if (adapter_a is not None and adapter_a.dtype == torch.int8) != (adapter_scales is not None):
            raise RuntimeError("salr.sparse_lowrank_gemm: adapter_scales must be given exactly when the adapter "
                               "is int8")
        _check_scales_given("sparse_lowrank_gemm", values, scales)
        torch._check(x.shape[-1] == in_features, lambda: "salr.sparse_lowrank_gemm: x must end in in_features")
        return x.new_empty((*x.shape[:-1], out_features))

    @torch.library.register_fake("salr::sparse_gemm_transposed")
    def _gemm_t_fake(grad_out, bitmap, values, offsets, out_features, in_features, scales=None, adapter_a=None,
                     adapter_b=None):
        _check_one_device("sparse_gemm_transposed", grad_out=grad_out, bitmap=bitmap, values=values,
                          offsets=offsets, scales=scales, adapter_a=adapter_a, adapter_b=adapter_b)
        _check_scales_given("sparse_gemm_transposed", values, scales)
        return grad_out.new_empty((*grad_out.shape[:-1], in_features))

    @torch.library.register_fake("salr::sampled_gemm")
    def _sampled_fake(left, right, bitmap, values, offsets, out_features, in_features):
        _check_one_device("sampled_gemm", left=left, right=right, bitmap=bitmap, values=values, offsets=offsets)
        return torch.empty_like(values)

    torch.library.register_autograd("salr::sparse_lowrank_gemm", _gemm_backward,
                                    setup_context=_gemm_setup_context)


def _gemm_setup_context(ctx, inputs, output):
    x, bitmap, values, offsets, out_features, in_features, adapter_a, adapter_b, bias, scales, adapter_scales = (
        tuple(inputs) + (None,) * (11 - len(inputs)))
    ctx.shape = (out_features, in_features)
    ctx.has_adapter = adapter_a is not None
    ctx.has_bias = bias is not None
    if adapter_scales is not None:  # an int8 adapter is frozen: the backward needs B·A only, in x's dtype
        adapter_a, adapter_b = reference.scaled_adapter(adapter_a, adapter_b, adapter_scales, x.dtype)
    ctx.save_for_backward(x, bitmap, values, offsets, adapter_a, adapter_b, scales)


def _gemm_backward(ctx, grad):
    x, bitmap, values, offsets, adapter_a, adapter_b, scales = ctx.saved_tensors
    grads = gemm_backward_products(torch.ops.salr, grad, x, bitmap, values, offsets, *ctx.shape,
                                   adapter_a, adapter_b, ctx.has_bias, ctx.needs_input_grad, scales)
    grad_x, grad_values, grad_a, grad_b, grad_bias = grads
    return (grad_x, None, grad_values, None, None, None, grad_a, grad_b, grad_bias, None,
            None)[:len(ctx.needs_input_grad)]


def gemm_backward_products(impl, grad, x, bitmap, values, offsets, out_features, in_features,
                           adapter_a, adapter_b, has_bias, needs_input_grad, scales=None, frozen_rank=0):
    """The gradients of sparse_lowrank_gemm for (x, values, adapter_a, adapter_b, bias).

    `impl` provides sparse_gemm_transposed and sampled_gemm: torch.ops.salr in training, and
    salr.ops.reference in the float64 gradcheck that validates these formulas. int8 values (with
    their scales) are a frozen base: the x-gradient goes through the quantized transposed product and
    there is no values-gradient (int8 tensors cannot require one). The first `frozen_rank` adapter
    ranks (rows of adapter_a, columns of adapter_b) get no gradient: grad_a and grad_b cover the
    ranks after them only, and their products are never formed (SALR's frozen SVD adapter).
    """
    # Autograd drops trailing defaulted arguments (None adapters/bias/scales) from needs_input_grad.
    needs = tuple(needs_input_grad) + (False,) * (11 - len(needs_input_grad))
    need_x, _, need_values, _, _, _, need_a, need_b, need_bias = needs[:9]
    grad_2d = grad.reshape(-1, out_features)
    x_2d = x.reshape(-1, in_features)
    grad_x = grad_values = grad_a = grad_b = grad_bias = None
    if need_x:  # dy·(W + B·A): the op folds the adapter into its decoded chunks when that is cheaper
        grad_x = impl.sparse_gemm_transposed(grad, bitmap, values, offsets, out_features, in_features, scales,
                                             adapter_a, adapter_b)
    if need_values and values.dtype != torch.int8:
        grad_values = impl.sampled_gemm(grad_2d, x_2d, bitmap, values, offsets, out_features, in_features)
    if need_a:
        grad_a = (grad_2d @ adapter_b[:, frozen_rank:]).T @ x_2d
    if need_b:
        grad_b = grad_2d.T @ (x_2d @ adapter_a[frozen_rank:].T)
    if need_bias and has_bias:
        grad_bias = grad_2d.sum(0)
    return grad_x, grad_values, grad_a, grad_b, grad_bias


class FrozenPrefixGemm(torch.autograd.Function):
    """sparse_lowrank_gemm with adapters [frozen_a; adapter_a], [frozen_b, adapter_b]: one concatenated
    GEMM forward, and a backward that forms no weight-gradient products for the frozen ranks. Through
    the op's own autograd the concatenation would make every rank trainable: with SALR's SVD r = 64
    under a LoRA r = 16 that is 5x the adapter gradient work, all of it thrown away."""

    @staticmethod
    def forward(ctx, x, bitmap, values, offsets, out_features, in_features, frozen_a, frozen_b, adapter_a,
                adapter_b, bias, scales):
        a = torch.cat((frozen_a, adapter_a), 0)
        b = torch.cat((frozen_b, adapter_b), 1)
        ctx.shape = (out_features, in_features)
        ctx.frozen_rank = frozen_a.shape[0]
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, bitmap, values, offsets, a, b, scales)
        return torch.ops.salr.sparse_lowrank_gemm.default(x, bitmap, values, offsets, out_features, in_features, a,
                                                          b, bias, scales)

    @staticmethod
    def backward(ctx, grad):
        x, bitmap, values, offsets, a, b, scales = ctx.saved_tensors
        need_x, _, need_values, _, _, _, _, _, need_a, need_b, need_bias, _ = ctx.needs_input_grad
        needs = (need_x, False, need_values, False, False, False, need_a, need_b, need_bias)
        grad_x, grad_values, grad_a, grad_b, grad_bias = gemm_backward_products(
            torch.ops.salr, grad, x, bitmap, values, offsets, *ctx.shape, a, b, ctx.has_bias, needs, scales,
            frozen_rank=ctx.frozen_rank)
        return grad_x, None, grad_values, None, None, None, None, None, grad_a, grad_b, grad_bias, None


if native_available():
    _register()

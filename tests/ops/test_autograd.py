"""Gradients of sparse_lowrank_gemm: the formulas (float64 gradcheck through the reference ops) and
the native backward (every ISA path) against autograd of the dense reference."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import ops, reference
from salr.ops._meta import gemm_backward_products
from conftest import DTYPES, TOLERANCE, make_generator, random_sparse


class ReferenceGemm(torch.autograd.Function):
    """sparse_lowrank_gemm with salr's backward formulas, run on the float64 reference ops."""

    @staticmethod
    def forward(ctx, x, values, a, b, bias, bitmap, offsets, rows, cols):
        ctx.save_for_backward(x, values, a, b, bitmap, offsets)
        ctx.shape = (rows, cols)
        return reference.sparse_lowrank_gemm(x, bitmap, values, offsets, rows, cols, a, b, bias)

    @staticmethod
    def backward(ctx, grad):
        x, values, a, b, bitmap, offsets = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], False, ctx.needs_input_grad[1], False, False, False,
                 *ctx.needs_input_grad[2:5])
        gx, gv, ga, gb, gbias = gemm_backward_products(reference, grad, x, bitmap, values, offsets,
                                                       *ctx.shape, a, b, True, needs)
        return gx, gv, ga, gb, gbias, None, None, None, None


@pytest.mark.parametrize("shape", [(5, 3), (13, 70), (16, 9)])
def test_backward_formulas_pass_gradcheck_in_float64(shape):
    rows, cols = shape
    gen = make_generator("gc", shape)
    dense = random_sparse(rows, cols, 0.5, torch.float64, gen)
    bitmap, values, offsets = reference.bitmap_encode(dense)
    leaf = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, a, b, bias = leaf(2, 3, cols), leaf(4, cols), leaf(rows, 4), leaf(rows)
    values = values.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, v, a, b, bias: ReferenceGemm.apply(x, v, a, b, bias, bitmap, offsets, rows, cols),
        (x, values, a, b, bias))


@pytest.mark.skipif(not salr.native_available(), reason=salr.native_error() or "")
@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_backward_matches_dense_autograd(isa, dtype, m):
    rows, cols, rank = 40, 75, 6
    gen = make_generator("bw", dtype, m)
    dense = random_sparse(rows, cols, 0.5, dtype, gen)
    bitmap, values, offsets = ops.bitmap_encode(dense)
    x = torch.randn(m, cols, generator=gen).to(dtype)
    a = (torch.randn(rank, cols, generator=gen) / 4).to(dtype)
    b = (torch.randn(rows, rank, generator=gen) / 4).to(dtype)
    bias = torch.randn(rows, generator=gen).to(dtype)
    grad = torch.randn(m, rows, generator=gen).to(dtype)

    leaves = [t.clone().requires_grad_() for t in (x, values, a, b, bias)]
    ops.sparse_lowrank_gemm(leaves[0], bitmap, leaves[1], offsets, rows, cols, *leaves[2:]).backward(grad)

    ref_leaves = [t.double().requires_grad_() for t in (x, dense, a, b, bias)]
    xr, wr, ar, br, biasr = ref_leaves
    (xr @ wr.T + (xr @ ar.T) @ br.T + biasr).backward(grad.double())
    tile_order_grad = reference.to_tiles(wr.grad)[reference.unpack_bitmap(bitmap)]  # values' order
    expected = [xr.grad, tile_order_grad, ar.grad, br.grad, biasr.grad]
    for name, leaf, want in zip(["x", "values", "adapter_a", "adapter_b", "bias"], leaves, expected):
        scale = want.abs().max().item() + 1.0
        err = (leaf.grad.double() - want).abs().max().item()
        # The dtype's tolerance on the largest gradient entry, with a sqrt(m) margin for sums over rows.
        assert err <= 4 * TOLERANCE[dtype] * scale * max(1.0, m**0.5), f"{name}: error {err:.3g}"


def test_only_requested_gradients_are_computed():
    dense = random_sparse(8, 16, 0.5, torch.float32, make_generator("req"))
    bitmap, values, offsets = ops.bitmap_encode(dense)
    x = torch.randn(3, 16, requires_grad=True)
    ops.sparse_lowrank_gemm(x, bitmap, values, offsets, 8, 16).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 8) @ dense)
    assert values.grad is None

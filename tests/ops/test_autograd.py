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


class ReferenceFrozenGemm(torch.autograd.Function):
    """ReferenceGemm with the adapters [a_frozen; a], [b_frozen, b] and the frozen ranks skipped."""

    @staticmethod
    def forward(ctx, x, a, b, bias, a_frozen, b_frozen, bitmap, values, offsets, rows, cols):
        a_all, b_all = torch.cat((a_frozen, a)), torch.cat((b_frozen, b), 1)
        ctx.save_for_backward(x, values, a_all, b_all, bitmap, offsets)
        ctx.shape, ctx.frozen_rank = (rows, cols), a_frozen.shape[0]
        return reference.sparse_lowrank_gemm(x, bitmap, values, offsets, rows, cols, a_all, b_all, bias)

    @staticmethod
    def backward(ctx, grad):
        x, values, a_all, b_all, bitmap, offsets = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], False, False, False, False, False, *ctx.needs_input_grad[1:4])
        gx, _, ga, gb, gbias = gemm_backward_products(reference, grad, x, bitmap, values, offsets, *ctx.shape,
                                                      a_all, b_all, True, needs, frozen_rank=ctx.frozen_rank)
        return gx, ga, gb, gbias, None, None, None, None, None, None, None


def test_frozen_adapter_formulas_pass_gradcheck_in_float64():
    rows, cols = 13, 70
    gen = make_generator("gc-frozen")
    bitmap, values, offsets = reference.bitmap_encode(random_sparse(rows, cols, 0.5, torch.float64, gen))
    leaf = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, a, b, bias = leaf(2, 3, cols), leaf(2, cols), leaf(rows, 2), leaf(rows)
    a_frozen, b_frozen = leaf(5, cols).detach(), leaf(rows, 5).detach()
    assert torch.autograd.gradcheck(
        lambda x, a, b, bias: ReferenceFrozenGemm.apply(x, a, b, bias, a_frozen, b_frozen, bitmap, values,
                                                        offsets, rows, cols),
        (x, a, b, bias))


def _frozen_case(dtype, m, gen):
    rows, cols, frozen_rank, rank = 40, 75, 7, 3
    dense = random_sparse(rows, cols, 0.5, dtype, gen)
    rand = lambda *s: (torch.randn(*s, generator=gen) / 4).to(dtype)  # noqa: E731
    frozen = (rand(frozen_rank, cols), rand(rows, frozen_rank))
    return dense, rand(m, cols), frozen, rand(rank, cols), rand(rows, rank), rand(rows), rand(m, rows)


@pytest.mark.skipif(not salr.native_available(), reason=salr.native_error() or "")
@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_frozen_adapter_backward_matches_dense_autograd(isa, dtype, m):
    dense, x, (a_f, b_f), a, b, bias, grad = _frozen_case(dtype, m, make_generator("bw-frozen", dtype, m))
    bitmap, values, offsets = ops.bitmap_encode(dense)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    y = ops.sparse_lowrank_gemm(leaves[0], bitmap, values, offsets, *dense.shape, *leaves[1:],
                                frozen_adapter=(a_f, b_f))
    y.backward(grad)

    xr, ar, br, biasr = [t.double().requires_grad_() for t in (x, a, b, bias)]
    a_all, b_all = torch.cat((a_f.double(), ar)), torch.cat((b_f.double(), br), 1)
    y_ref = xr @ dense.double().T + (xr @ a_all.T) @ b_all.T + biasr
    y_ref.backward(grad.double())
    got = [y, *(leaf.grad for leaf in leaves)]
    for name, value, want in zip(["y", "x", "adapter_a", "adapter_b", "bias"], got,
                                 [y_ref, xr.grad, ar.grad, br.grad, biasr.grad]):
        err = (value.detach().double() - want.detach()).abs().max().item()
        bound = 4 * TOLERANCE[dtype] * (want.abs().max().item() + 1.0) * max(1.0, m**0.5)
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"


@pytest.mark.skipif(not salr.native_available(), reason=salr.native_error() or "")
def test_frozen_adapter_backward_skips_exactly_the_frozen_products():
    from torch.utils.flop_counter import FlopCounterMode

    dense, x, (a_f, b_f), a, b, bias, grad = _frozen_case(torch.float32, 64, make_generator("flops"))
    bitmap, values, offsets = ops.bitmap_encode(dense)
    (n, k), m, frozen_rank = dense.shape, x.shape[0], a_f.shape[0]

    def backward_flops(frozen: bool) -> int:
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        if frozen:
            y = ops.sparse_lowrank_gemm(leaves[0], bitmap, values, offsets, n, k, *leaves[1:],
                                        frozen_adapter=(a_f, b_f))
        else:  # the same product with every rank in one trainable adapter
            y = ops.sparse_lowrank_gemm(leaves[0], bitmap, values, offsets, n, k, torch.cat((a_f, leaves[1])),
                                        torch.cat((b_f, leaves[2]), 1))
        with FlopCounterMode(display=False) as counter:
            y.backward(grad)
        return counter.get_total_flops()

    # Skipped (outside the op, which forms dy·(W + B·A) for the x-gradient either way): dy·B_f for dL/dA
    # (2·m·n·R_f), the frozen rows of dL/dA (2·m·R_f·k), x·A_fᵀ for dL/dB (2·m·k·R_f) and the frozen
    # columns of dL/dB (2·m·n·R_f).
    assert backward_flops(False) - backward_flops(True) == 4 * m * frozen_rank * (k + n)


def test_frozen_adapter_misuse_is_refused():
    dense, x, (a_f, b_f), a, b, _, _ = _frozen_case(torch.float32, 2, make_generator("refuse"))
    bitmap, values, offsets = ops.bitmap_encode(dense)
    with pytest.raises(ValueError, match="sparse_lowrank_gemm: adapter_a and adapter_b must be given together"):
        ops.sparse_lowrank_gemm(x, bitmap, values, offsets, *dense.shape, a, None, frozen_adapter=(a_f, b_f))
    with pytest.raises(ValueError, match="sparse_lowrank_gemm: frozen_adapter"):
        ops.sparse_lowrank_gemm(x, bitmap, values, offsets, *dense.shape, a, b,
                                frozen_adapter=(a_f.requires_grad_(), b_f))

"""The ops as torch sees them: opcheck (schema, fake kernels, autograd registration) and
torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import ops
from conftest import make_generator, random_sparse
from salr_helpers import gemm_operands

pytestmark = pytest.mark.skipif(not salr.native_available(), reason=salr.native_error() or "")


def sample_weight(rows=19, cols=70, dtype=torch.float32):
    dense = random_sparse(rows, cols, 0.5, dtype, make_generator("op", rows, cols, dtype))
    return dense, ops.bitmap_encode(dense)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_every_op(dtype):
    dense, (bitmap, values, offsets) = sample_weight(dtype=dtype)
    rows, cols = dense.shape
    x, a, b, bias, grad = gemm_operands(rows, cols, dtype, make_generator("opcheck", dtype)).values()
    salr_ops = torch.ops.salr
    cases = [
        (salr_ops.bitmap_decode.default, (bitmap, values, offsets, rows, cols)),
        (salr_ops.sparse_lowrank_gemm.default, (x, bitmap, values, offsets, rows, cols, a, b, bias)),
        (salr_ops.sparse_lowrank_gemm.default,
         (x.requires_grad_(), bitmap, values.clone().requires_grad_(), offsets, rows, cols,
          a.requires_grad_(), b.requires_grad_(), bias.requires_grad_())),
        (salr_ops.sparse_lowrank_gemm.default, (x[0, 0:1].detach(), bitmap, values, offsets, rows, cols, None, None, None)),
        (salr_ops.sparse_gemm_transposed.default, (grad, bitmap, values, offsets, rows, cols)),
        (salr_ops.sparse_gemm_transposed.default,
         (grad, bitmap, values, offsets, rows, cols, None, a.detach(), b.detach())),
        (salr_ops.sampled_gemm.default, (grad, torch.randn(5, cols).to(dtype), bitmap, values, offsets, rows, cols)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_opcheck_encode():
    # The value count is data-dependent: the fake kernel returns an unbacked size, which the
    # dynamic AOT check cannot run (it needs a concrete backward graph); the others must pass.
    dense, _ = sample_weight()
    torch.library.opcheck(torch.ops.salr.bitmap_encode.default, (dense,),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compile_fullgraph_matches_eager():
    dense, (bitmap, values, offsets) = sample_weight(24, 40)
    a, b = torch.randn(3, 40), torch.randn(24, 3)

    def layer(x):
        y = ops.sparse_lowrank_gemm(x, bitmap, values, offsets, 24, 40, a, b, None)
        return torch.nn.functional.gelu(y).sum(-1)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 40)
    torch.testing.assert_close(compiled(x), layer(x))
    x_grad = x.clone().requires_grad_()
    compiled(x_grad).sum().backward()
    x_ref = x.clone().requires_grad_()
    layer(x_ref).sum().backward()
    torch.testing.assert_close(x_grad.grad, x_ref.grad)


def test_compile_inductor_fullgraph():
    dense, (bitmap, values, offsets) = sample_weight(16, 24)
    compiled = torch.compile(lambda x: ops.sparse_lowrank_gemm(x, bitmap, values, offsets, 16, 24) * 2,
                             fullgraph=True)
    x = torch.randn(3, 24)
    torch.testing.assert_close(compiled(x), 2 * (x @ dense.T))

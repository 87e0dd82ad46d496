"""int8 values (issue 21) as torch and the user see them: every bad-scales case refused with the op
and the argument named, opcheck of both products, and autograd on a frozen int8 base."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import ops, reference
from salr.ops._meta import gemm_backward_products
from conftest import DTYPES, TOLERANCE, make_generator
from salr_helpers import gemm_operands

pytestmark = pytest.mark.skipif(not salr.native_available(), reason=salr.native_error() or "")

ROWS, COLS = 20, 150  # 3 column groups
GROUPS = reference.groups_per_band(COLS)


def int8_weight(rows=ROWS, cols=COLS, key="w"):
    gen = make_generator("int8c", key, rows, cols)
    q = torch.randint(-127, 128, (rows, cols), generator=gen, dtype=torch.int8)
    q[torch.rand(rows, cols, generator=gen) < 0.5] = 0
    return q, ops.bitmap_encode(q), torch.rand(rows, generator=gen) * 0.02 + 1e-3


def both_ops(weight, scales, x_dtype=torch.float32):
    """Calls each product with `scales`, yielding (op name, thunk)."""
    bitmap, values, offsets = weight
    yield "sparse_lowrank_gemm", lambda: torch.ops.salr.sparse_lowrank_gemm(
        torch.randn(2, COLS, dtype=x_dtype), bitmap, values, offsets, ROWS, COLS, None, None, None, scales)
    yield "sparse_gemm_transposed", lambda: torch.ops.salr.sparse_gemm_transposed(
        torch.randn(2, ROWS, dtype=x_dtype), bitmap, values, offsets, ROWS, COLS, scales)


BAD_SCALES = {
    "missing": (lambda s: None, r"scales is required with int8 values"),
    "float64": (lambda s: s.double(), r"scales must have dtype Float, got Double"),
    "bf16": (lambda s: s.bfloat16(), r"scales must have dtype Float, got BFloat16"),
    "wrong length": (lambda s: s[:-1], r"scales must have shape \[20\] \(per row\) or \[20, 3\]"),
    "wrong groups": (lambda s: s.unsqueeze(1).expand(ROWS, 2).contiguous(), r"scales must have shape \[20\]"),
    "3-D": (lambda s: s.view(ROWS, 1, 1), r"scales must have shape"),
    "non-contiguous": (lambda s: s.unsqueeze(1).expand(ROWS, GROUPS), r"scales must be contiguous"),
    "zero": (lambda s: s.index_fill(0, torch.tensor([3]), 0.0), r"scales must be finite and > 0, got 0 at flat index 3"),
    "negative": (lambda s: -s, r"scales must be finite and > 0, got -"),
    "nan": (lambda s: s.index_fill(0, torch.tensor([5]), float("nan")), r"scales must be finite and > 0, got nan"),
    "inf": (lambda s: s.index_fill(0, torch.tensor([0]), float("inf")), r"scales must be finite and > 0, got inf"),
}


@pytest.mark.parametrize("case", list(BAD_SCALES))
def test_bad_scales_are_refused_naming_op_and_argument(case):
    _, weight, scales = int8_weight()
    make, message = BAD_SCALES[case]
    for op, call in both_ops(weight, make(scales)):
        with pytest.raises(RuntimeError, match=rf"^salr\.{op}: {message}"):
            call()


def test_scales_with_float_values_are_refused():
    dense = torch.randn(ROWS, COLS)
    weight = ops.bitmap_encode(dense)
    for op, call in both_ops(weight, torch.ones(ROWS)):
        with pytest.raises(RuntimeError, match=rf"^salr\.{op}: scales must be None with Float values"):
            call()


def test_activation_dtypes_with_int8_values():
    _, (bitmap, values, offsets), scales = int8_weight()
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: x must be float32, bfloat16 or float16 with int8"):
        ops.sparse_lowrank_gemm(torch.ones(2, COLS, dtype=torch.int8), bitmap, values, offsets, ROWS, COLS,
                                scales=scales)
    with pytest.raises(RuntimeError, match=r"sparse_gemm_transposed: grad_out must be float32, bfloat16 or float16"):
        ops.sparse_gemm_transposed(torch.ones(2, ROWS, dtype=torch.float64), bitmap, values, offsets, ROWS, COLS,
                                   scales=scales)
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: bias must have dtype BFloat16, got Float"):
        ops.sparse_lowrank_gemm(torch.ones(2, COLS, dtype=torch.bfloat16), bitmap, values, offsets, ROWS, COLS,
                                bias=torch.zeros(ROWS), scales=scales)
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: adapter_a must have dtype Half, got Float"):
        ops.sparse_lowrank_gemm(torch.ones(2, COLS, dtype=torch.half), bitmap, values, offsets, ROWS, COLS,
                                torch.zeros(3, COLS), torch.zeros(ROWS, 3, dtype=torch.half), scales=scales)


def test_sampled_gemm_refuses_int8_values():
    _, (bitmap, values, offsets), _ = int8_weight()
    with pytest.raises(RuntimeError, match=r"^salr\.sampled_gemm: values must be a float dtype, got int8"):
        ops.sampled_gemm(torch.randn(3, ROWS), torch.randn(3, COLS), bitmap, values, offsets, ROWS, COLS)
    with pytest.raises(ValueError, match=r"salr\.sampled_gemm: values must be a float dtype, got int8"):
        reference.sampled_gemm(torch.randn(3, ROWS), torch.randn(3, COLS), bitmap, values, offsets, ROWS, COLS)


def test_reference_refuses_bad_scales_with_value_error():
    q, (bitmap, values, offsets), scales = int8_weight()
    x = torch.randn(2, COLS, dtype=torch.float64)
    for bad in [None, scales[:-1], -scales, scales.double()]:
        with pytest.raises(ValueError, match=r"salr\.sparse_lowrank_gemm: scales must"):
            reference.sparse_lowrank_gemm(x, bitmap, values, offsets, ROWS, COLS, scales=bad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_group", [False, True])
def test_opcheck_int8(dtype, per_group):
    q, (bitmap, values, offsets), scales = int8_weight(key=("opcheck", dtype))
    if per_group:
        scales = scales.unsqueeze(1).repeat(1, GROUPS).contiguous()
    x, a, b, bias, grad = gemm_operands(ROWS, COLS, dtype, make_generator("opcheck-int8", dtype)).values()
    salr_ops = torch.ops.salr
    cases = [
        (salr_ops.bitmap_decode.default, (bitmap, values, offsets, ROWS, COLS)),
        (salr_ops.sparse_lowrank_gemm.default, (x, bitmap, values, offsets, ROWS, COLS, a, b, bias, scales)),
        (salr_ops.sparse_lowrank_gemm.default,
         (x.clone().requires_grad_(), bitmap, values, offsets, ROWS, COLS, a.clone().requires_grad_(),
          b.clone().requires_grad_(), bias.clone().requires_grad_(), scales)),
        (salr_ops.sparse_gemm_transposed.default, (grad, bitmap, values, offsets, ROWS, COLS, scales)),
        (salr_ops.sparse_gemm_transposed.default, (grad, bitmap, values, offsets, ROWS, COLS, scales, a, b)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
    torch.library.opcheck(salr_ops.bitmap_encode.default, (q,),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("per_group", [False, True])
def test_backward_formulas_gradcheck_on_int8_base(per_group):
    # float64 x, adapters and bias over an int8 base through the reference ops and salr's formulas.
    q, (bitmap, values, offsets), scales = int8_weight(16, 70, key="gc")
    if per_group:
        scales = scales[:16].unsqueeze(1).repeat(1, 2).contiguous() * torch.tensor([1.0, 2.0])
    else:
        scales = scales[:16].contiguous()
    gen = make_generator("gc-int8", per_group)
    leaf = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).requires_grad_()  # noqa: E731
    x, a, b, bias = leaf(2, 3, 70), leaf(4, 70), leaf(16, 4), leaf(16)

    class Gemm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, a, b, bias):
            ctx.save_for_backward(x, a, b)
            return reference.sparse_lowrank_gemm(x, bitmap, values, offsets, 16, 70, a, b, bias, scales)

        @staticmethod
        def backward(ctx, grad):
            x, a, b = ctx.saved_tensors
            needs = (True, False, False, False, False, False, True, True, True, False)
            gx, gv, ga, gb, gbias = gemm_backward_products(reference, grad, x, bitmap, values, offsets, 16, 70,
                                                           a, b, True, needs, scales)
            assert gv is None
            return gx, ga, gb, gbias

    assert torch.autograd.gradcheck(Gemm.apply, (x, a, b, bias))


@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_backward_on_int8_base(isa, dtype, m):
    q, (bitmap, values, offsets), scales = int8_weight(40, 75, key=("bw", m))
    gen = make_generator("bw-int8", dtype, m)
    x = torch.randn(m, 75, generator=gen).to(dtype)
    a = (torch.randn(6, 75, generator=gen) / 4).to(dtype)
    b = (torch.randn(40, 6, generator=gen) / 4).to(dtype)
    bias = torch.randn(40, generator=gen).to(dtype)
    grad = torch.randn(m, 40, generator=gen).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, a, b, bias)]
    y = ops.sparse_lowrank_gemm(leaves[0], bitmap, values, offsets, 40, 75, *leaves[1:], scales=scales)
    y.backward(grad)
    w = reference.dequantize(q, scales, torch.float64)
    xr, ar, br, biasr = [t.double().requires_grad_() for t in (x, a, b, bias)]
    (xr @ w.T + (xr @ ar.T) @ br.T + biasr).backward(grad.double())
    for name, leaf, want in zip(["x", "adapter_a", "adapter_b", "bias"], leaves, [xr, ar, br, biasr]):
        scale = want.grad.abs().max().item() + 1.0
        err = (leaf.grad.double() - want.grad).abs().max().item()
        assert err <= 4 * TOLERANCE[dtype] * scale * max(1.0, m**0.5), f"{name}: error {err:.3g}"
    assert not values.requires_grad and values.grad is None


@pytest.mark.parametrize("m", [3, 70])  # the kernel and the dequantized-chunk path
@pytest.mark.parametrize("op", ["gemm", "transposed", "decode"])
def test_inconsistent_index_is_caught_with_int8_values(isa, op, m):
    # The int8 kernels run the float kernels' group checks (group_check.h): never trust the index.
    _, (bitmap, values, offsets), scales = int8_weight(key="corrupt")
    flipped = bitmap.clone()
    flipped[1, 2] ^= 1 << 5  # popcount of band 1, group 0 no longer matches offsets
    padded = bitmap.clone()
    padded[2, 18] |= 1 << 7  # column 151 is padding in a 150-column weight
    run = {
        "gemm": lambda b: ops.sparse_lowrank_gemm(torch.randn(m, COLS), b, values, offsets, ROWS, COLS, scales=scales),
        "transposed": lambda b: ops.sparse_gemm_transposed(torch.randn(m, ROWS), b, values, offsets, ROWS, COLS,
                                                           scales=scales),
        "decode": lambda b: ops.bitmap_decode(b, values, offsets, ROWS, COLS),
    }[op]
    for b, where in [(flipped, "band 1, column group 0"), (padded, "band 2, column group 2")]:
        with pytest.raises(RuntimeError, match=f"bitmap, values and offsets are inconsistent at {where}"):
            run(b)
    run(bitmap)

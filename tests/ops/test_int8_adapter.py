"""int8 adapters (issue 21): sparse_lowrank_gemm with adapter_a / adapter_b int8 and adapter_scales
[N], on float and int8 bases, every CPU ISA path and both M paths, against the dequantize-then-float64
reference; the quantizer's grid; bad input named; opcheck; the x-gradient through a frozen int8 adapter."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import ops, reference
from salr.prune.quantize import quantize_adapter_int8
from conftest import DTYPES, SHAPES, assert_matches_reference, make_generator, random_sparse

pytestmark = pytest.mark.skipif(not salr.native_available(), reason=salr.native_error() or "")

RANKS = [1, 5, 19, 80]  # one lane, a tail only, two 8-lane steps + a tail, SALR's r = 64 + 16


def int8_adapter(rows, cols, rank, gen):
    a = torch.randn(rank, cols, generator=gen)
    b = torch.randn(rows, rank, generator=gen) / 4
    b[0] = 0.0  # an all-zero row of B: scale 1, q 0
    return quantize_adapter_int8(a, b)


def base(rows, cols, density, dtype, int8, gen):
    """(bitmap, values, offsets, scales, dense float64) of a float base in `dtype` or an int8 one."""
    if int8:
        q = random_sparse(rows, cols, density, torch.float32, gen).mul(40).round().clamp(-127, 127).to(torch.int8)
        scales = torch.rand(rows, generator=gen) * 0.02 + 1e-3
        return (*ops.bitmap_encode(q), scales, reference.dequantize(q, scales, torch.float64))
    dense = random_sparse(rows, cols, density, dtype, gen)
    return (*ops.bitmap_encode(dense), None, dense.double())


def check(x, weight, adapter, bias, dtype):
    bitmap, values, offsets, scales, dense = weight
    q_a, q_b, b_scales = adapter
    rows, cols = dense.shape
    out = ops.sparse_lowrank_gemm(x, bitmap, values, offsets, rows, cols, q_a, q_b, bias, scales=scales,
                                  adapter_scales=b_scales)
    ref = reference.sparse_lowrank_gemm(x.double(), bitmap, values, offsets, rows, cols, q_a, q_b,
                                        None if bias is None else bias.double(), scales, b_scales)
    b_dense = q_b.double().abs() * b_scales.double()[:, None]
    magnitude = x.double().abs() @ dense.abs().T + (x.double().abs() @ q_a.double().abs().T) @ b_dense.T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    assert_matches_reference(out, ref, magnitude, dtype)


@pytest.mark.parametrize("int8_base", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_every_path(isa, dtype, shape, int8_base, monkeypatch):
    rows, cols = shape
    gen = make_generator("int8-adapter", dtype, shape, int8_base)
    for density in (0.0, 0.5, 1.0):
        weight = base(rows, cols, density, dtype, int8_base, gen)
        for rank in RANKS:
            if rank > min(rows, cols) and rank != 80:
                continue
            adapter = int8_adapter(rows, cols, rank, gen)
            bias = torch.randn(rows, generator=gen).to(dtype) if rank % 2 else None
            for m in (0, 1, 3, 17):
                check(torch.randn(m, cols, generator=gen).to(dtype), weight, adapter, bias, dtype)
    # The large-M path (decode + ATen GEMM) dequantizes the adapter: forced at M = 70 with batch dims.
    monkeypatch.setenv("SALR_CPU_DENSE_CROSSOVER", "64")
    weight = base(rows, cols, 0.5, dtype, int8_base, gen)
    check(torch.randn(2, 35, cols, generator=gen).to(dtype), weight, int8_adapter(rows, cols, 5, gen), None, dtype)


def test_strided_x(isa):
    gen = make_generator("int8-adapter-strided")
    weight = base(100, 130, 0.5, torch.bfloat16, False, gen)
    x = torch.randn(4, 260, generator=gen).to(torch.bfloat16)[:, ::2]
    check(x, weight, int8_adapter(100, 130, 19, gen), None, torch.bfloat16)


def test_strided_adapter_tensors(isa):
    gen = make_generator("int8-adapter-strided-adapter")
    weight = base(100, 130, 0.5, torch.float32, True, gen)
    q_a, q_b, b_scales = int8_adapter(100, 130, 19, gen)
    strided = (q_a.T.contiguous().T, q_b.T.contiguous().T, torch.stack((b_scales, b_scales), 1)[:, 0])
    assert not any(t.is_contiguous() for t in strided)
    check(torch.randn(3, 130, generator=gen), weight, strided, None, torch.float32)


def test_quantizer_grid_and_product():
    gen = make_generator("quantize-adapter")
    a, b = torch.randn(16, 70, generator=gen), torch.randn(40, 16, generator=gen)
    b[3] = 0.0
    q_a, q_b, b_scales = quantize_adapter_int8(a, b)
    assert q_a.dtype == q_b.dtype == torch.int8 and b_scales.dtype == torch.float32
    assert q_a.abs().amax(1).eq(127).all() and q_b[3].eq(0).all() and b_scales[3] == 1.0
    assert (q_b.abs().amax(1)[b.abs().amax(1) > 0] == 127).all()  # every nonzero row uses the full grid
    a_scales = a.abs().amax(1) / 127
    assert torch.equal(q_a, torch.round(a / a_scales[:, None]).to(torch.int8))  # round to nearest
    product = (q_b.double() * b_scales.double()[:, None]) @ q_a.double()
    # B·A = B'·(A / s_a), B' = B·diag(s_a): each factor within half a step of its grid (s_a / s_a = 1 for
    # A's rows, b_scales for B's), so |error| <= ½·Σ_r |B'[n, r]| + ½·b_scales[n]·Σ_r (|q_a[r, k]| + ½).
    folded = b.double() * a_scales.double()[None, :]
    bound = 0.5 * folded.abs().sum(1, keepdim=True) + 0.5 * b_scales.double()[:, None] * (
        q_a.double().abs().sum(0, keepdim=True) + 0.5 * q_a.shape[0])
    error = (product - b.double() @ a.double()).abs()
    assert (error <= bound + 1e-9).all() and error.max() > 0
    with pytest.raises(ValueError, match="quantize_adapter_int8: a and b must be finite"):
        quantize_adapter_int8(a, torch.full_like(b, float("nan")))
    with pytest.raises(ValueError, match=r"quantize_adapter_int8: b must have shape \[N, 16\]"):
        quantize_adapter_int8(a, b[:, :3])


def operands(dtype=torch.float32, key="errors"):
    gen = make_generator("int8-adapter", key)
    bitmap, values, offsets, _, _ = base(24, 70, 0.5, dtype, False, gen)
    q_a, q_b, b_scales = int8_adapter(24, 70, 5, gen)
    return torch.randn(3, 70, generator=gen).to(dtype), bitmap, values, offsets, q_a, q_b, b_scales


@pytest.mark.parametrize("change, native, ref", [
    (lambda o: {**o, "adapter_scales": None}, "adapter_scales is required with an int8 adapter_a",
     "adapter_scales is required with an int8 adapter_a"),
    (lambda o: {**o, "adapter_a": o["adapter_a"].float()}, "adapter_a must have dtype Char",
     "adapter_scales needs int8 adapter_a and adapter_b"),
    (lambda o: {**o, "adapter_b": o["adapter_b"].float()}, "adapter_b must have dtype Char",
     "adapter_scales needs int8 adapter_a and adapter_b"),
    (lambda o: {**o, "adapter_scales": o["adapter_scales"][:-1]}, r"adapter_scales must have shape \[24\]",
     r"adapter_scales must be float32 \[24\]"),
    (lambda o: {**o, "adapter_scales": o["adapter_scales"].double()}, "adapter_scales must have dtype Float",
     r"adapter_scales must be float32 \[24\]"),
    (lambda o: {**o, "adapter_scales": o["adapter_scales"].clone().index_fill_(0, torch.tensor([2]), 0.0)},
     "adapter_scales must be finite and > 0", "adapter_scales must be finite and > 0"),
    (lambda o: {**o, "adapter_scales": o["adapter_scales"].clone().index_fill_(0, torch.tensor([5]), float("nan"))},
     "adapter_scales must be finite and > 0", "adapter_scales must be finite and > 0"),
    (lambda o: {**o, "adapter_a": None, "adapter_b": None}, "adapter_scales must be None without adapter_a",
     "adapter_scales must be None without adapter_a"),
])
def test_bad_adapter_input_names_op_and_argument(isa, change, native, ref):
    x, bitmap, values, offsets, q_a, q_b, b_scales = operands()
    args = change({"adapter_a": q_a, "adapter_b": q_b, "adapter_scales": b_scales})
    with pytest.raises(RuntimeError, match=f"sparse_lowrank_gemm: {native}"):
        torch.ops.salr.sparse_lowrank_gemm(x, bitmap, values, offsets, 24, 70, args["adapter_a"], args["adapter_b"],
                                           None, None, args["adapter_scales"])
    with pytest.raises(ValueError, match=f"sparse_lowrank_gemm: {ref}"):
        reference.sparse_lowrank_gemm(x, bitmap, values, offsets, 24, 70, args["adapter_a"], args["adapter_b"],
                                      None, None, args["adapter_scales"])


def test_wrapper_refuses_a_trainable_or_split_int8_adapter():
    x, bitmap, values, offsets, q_a, q_b, b_scales = operands()
    with pytest.raises(ValueError, match="sparse_lowrank_gemm: adapter_scales: an int8 adapter is frozen"):
        ops.sparse_lowrank_gemm(x, bitmap, values, offsets, 24, 70, q_a, q_b, adapter_scales=b_scales,
                                frozen_adapter=(torch.zeros(2, 70), torch.zeros(24, 2)))
    with pytest.raises(ValueError, match="sparse_lowrank_gemm: adapter_scales: an int8 adapter is frozen"):
        ops.sparse_lowrank_gemm(x, bitmap, values, offsets, 24, 70, q_a, q_b,
                                adapter_scales=b_scales.clone().requires_grad_())


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    x, bitmap, values, offsets, q_a, q_b, b_scales = operands(dtype, ("opcheck", dtype))
    bias = torch.randn(24, generator=make_generator("opcheck-bias", dtype)).to(dtype)
    op = torch.ops.salr.sparse_lowrank_gemm.default
    torch.library.opcheck(op, (x, bitmap, values, offsets, 24, 70, q_a, q_b, bias, None, b_scales))
    torch.library.opcheck(op, (x.clone().requires_grad_(), bitmap, values, offsets, 24, 70, q_a, q_b,
                               bias.clone().requires_grad_(), None, b_scales))
    q = torch.randint(-127, 128, (24, 70), generator=make_generator("opcheck-q")).to(torch.int8)
    torch.library.opcheck(op, (x, *ops.bitmap_encode(q), 24, 70, q_a, q_b, None, torch.full((24,), 0.01),
                               b_scales))


@pytest.mark.parametrize("m", [1, 100])
def test_x_gradient_through_a_frozen_int8_adapter(isa, m):
    x, bitmap, values, offsets, q_a, q_b, b_scales = operands(key=("grad", m))
    x = torch.randn(m, 70, generator=make_generator("grad-x", m), requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    y = ops.sparse_lowrank_gemm(x, bitmap, values, offsets, 24, 70, q_a, q_b, bias, adapter_scales=b_scales)
    grad = torch.randn_like(y)
    y.backward(grad)
    w = ops.bitmap_decode(bitmap, values, offsets, 24, 70).double()
    a, b = reference.dequantized_adapter(q_a, q_b, b_scales, torch.float64)
    expected = grad.double() @ (w + b @ a)
    assert torch.allclose(x.grad.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.allclose(bias.grad, grad.sum(0))

"""int8 values in BM8x8 (issue 21): encode/decode, both products on every CPU ISA path against the
dequantize-then-float64 reference, per-row and per-group scales, and every bad-scales case."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import ops, reference
from conftest import DENSITIES, DTYPES, SHAPES, assert_matches_reference, make_generator

pytestmark = pytest.mark.skipif(not salr.native_available(), reason=salr.native_error() or "")

KERNEL_ROWS = [0, 1, 3, 17]
DENSE_PATH_ROWS = [64, 100]
SCALE_KINDS = ["row", "group"]


def random_int8(rows, cols, density, gen):
    """int8 [rows, cols] with exact zeros at a random (1 - density) fraction, nonzeros in ±[1, 127]."""
    magnitude = torch.randint(1, 128, (rows, cols), generator=gen)
    sign = torch.randint(0, 2, (rows, cols), generator=gen) * 2 - 1
    q = (magnitude * sign).to(torch.int8)
    q[torch.rand(rows, cols, generator=gen) >= density] = 0
    return q


def random_scales(rows, cols, kind, gen):
    shape = (rows,) if kind == "row" else (rows, reference.groups_per_band(cols))
    return torch.rand(shape, generator=gen) * 0.02 + 1e-3


def quantized_weight(rows, cols, density, kind, key):
    gen = make_generator("int8", *key)
    q = random_int8(rows, cols, density, gen)
    return q, random_scales(rows, cols, kind, gen), gen


def dequantized(q, scales):
    return reference.dequantize(q, scales, torch.float64)


def check_forward(q, scales, x, a, b, bias, dtype):
    rows, cols = q.shape
    bitmap, values, offsets = ops.bitmap_encode(q)
    out = ops.sparse_lowrank_gemm(x, bitmap, values, offsets, rows, cols, a, b, bias, scales=scales)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = reference.sparse_lowrank_gemm(x.double(), bitmap, values, offsets, rows, cols, d(a), d(b), d(bias), scales)
    magnitude = x.double().abs() @ dequantized(q, scales).abs().T
    if a is not None:
        magnitude = magnitude + (x.double().abs() @ a.double().abs().T) @ b.double().abs().T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    assert_matches_reference(out, ref, magnitude, dtype)


def forward_cases(q, gen, dtype, m, x_shape=None):
    rows, cols = q.shape
    x = torch.randn(*(x_shape or (m,)), cols, generator=gen).to(dtype)
    for rank, with_bias in [(0, False), (5, True), (19, False)]:  # 19: two full 8-lane steps + a tail
        a = torch.randn(rank, cols, generator=gen).to(dtype) if rank else None
        b = (torch.randn(rows, rank, generator=gen) / 4).to(dtype) if rank else None
        bias = torch.randn(rows, generator=gen).to(dtype) if with_bias else None
        yield x, a, b, bias


def test_encode_decode_round_trip_exact():
    for shape in SHAPES:
        for density in DENSITIES:
            q, _, _ = quantized_weight(*shape, density, "row", ("rt", shape, density))
            bitmap, values, offsets = ops.bitmap_encode(q)
            assert values.dtype == torch.int8
            assert values.numel() == int((q != 0).sum())
            assert torch.equal(ops.bitmap_decode(bitmap, values, offsets, *shape), q)
            for mine, ref in zip((bitmap, values, offsets), reference.bitmap_encode(q)):
                assert torch.equal(mine, ref)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_kernel_path(isa, dtype, shape, density):
    for kind in SCALE_KINDS:
        q, scales, gen = quantized_weight(*shape, density, kind, (shape, density, dtype, kind))
        for m in KERNEL_ROWS:
            for case in forward_cases(q, gen, dtype, m):
                check_forward(q, scales, *case, dtype)


@pytest.mark.parametrize("kind", SCALE_KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_dense_path(isa, dtype, kind, monkeypatch):
    monkeypatch.setenv("SALR_CPU_DENSE_CROSSOVER", str(min(DENSE_PATH_ROWS)))
    for shape in [(13, 70), (100, 130)]:
        q, scales, gen = quantized_weight(*shape, 0.5, kind, ("dense", shape, dtype, kind))
        for m in DENSE_PATH_ROWS:
            for case in forward_cases(q, gen, dtype, m):
                check_forward(q, scales, *case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_default_crossover_and_batch_dims(isa, dtype):
    # M = 2·50 = 100 rows: bf16/fp16 take the dequantized-chunk path by default, fp32 the kernel.
    q, scales, gen = quantized_weight(100, 130, 0.5, "group", ("batch", dtype))
    for case in forward_cases(q, gen, dtype, 0, x_shape=(2, 50)):
        check_forward(q, scales, *case, dtype)


def test_strided_x_and_leading_dims(isa):
    q, scales, gen = quantized_weight(24, 80, 0.5, "row", ("strided",))
    bitmap, values, offsets = ops.bitmap_encode(q)
    w = dequantized(q, scales)
    for x in [torch.randn(80, 5, generator=gen).T,             # row stride 1: non-contiguous rows
              torch.randn(4, 160, generator=gen)[:, ::2],      # inner stride 2
              torch.randn(2, 3, 80, generator=gen)]:           # batch dims
        out = ops.sparse_lowrank_gemm(x, bitmap, values, offsets, 24, 80, scales=scales)
        assert out.shape == (*x.shape[:-1], 24)
        assert_matches_reference(out, x.double() @ w.T, x.double().abs() @ w.abs().T, torch.float32)


def test_stored_zero_values_are_exact(isa):
    # The quantizer stores survivors as ±1, but a stored 0 must still multiply as 0 on every path.
    q, scales, gen = quantized_weight(40, 150, 0.6, "group", ("zeros",))
    bitmap, values, offsets = ops.bitmap_encode(q)
    values = values.clone()
    values[::3] = 0
    q_zeroed = ops.bitmap_decode(bitmap, values, offsets, 40, 150)
    w = dequantized(q_zeroed, scales)
    for m in [1, 5, 70]:
        x = torch.randn(m, 150, generator=gen)
        out = ops.sparse_lowrank_gemm(x, bitmap, values, offsets, 40, 150, scales=scales)
        assert_matches_reference(out, x.double() @ w.T, x.double().abs() @ w.abs().T, torch.float32)
        dy = torch.randn(m, 40, generator=gen)
        dx = ops.sparse_gemm_transposed(dy, bitmap, values, offsets, 40, 150, scales=scales)
        assert_matches_reference(dx, dy.double() @ w, dy.double().abs() @ w.abs(), torch.float32)


@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_product(isa, dtype, shape, density):
    rows, cols = shape
    for kind in SCALE_KINDS:
        q, scales, gen = quantized_weight(rows, cols, density, kind, ("t", shape, density, dtype, kind))
        bitmap, values, offsets = ops.bitmap_encode(q)
        for m in KERNEL_ROWS + DENSE_PATH_ROWS[:1]:
            dy = torch.randn(m, rows, generator=gen).to(dtype)
            out = ops.sparse_gemm_transposed(dy, bitmap, values, offsets, rows, cols, scales=scales)
            ref = reference.sparse_gemm_transposed(dy.double(), bitmap, values, offsets, rows, cols, scales)
            assert_matches_reference(out, ref, dy.double().abs() @ dequantized(q, scales).abs(), dtype)
            # With the adapters of the forward: dy·(W + B·A), the kernel path and the (folded) chunk path.
            a, b = torch.randn(3, cols, generator=gen).to(dtype), (torch.randn(rows, 3, generator=gen) / 4).to(dtype)
            out = ops.sparse_gemm_transposed(dy, bitmap, values, offsets, rows, cols, scales=scales, adapter_a=a,
                                             adapter_b=b)
            ref = reference.sparse_gemm_transposed(dy.double(), bitmap, values, offsets, rows, cols, scales, a.double(),
                                                   b.double())
            magnitude = dy.double().abs() @ (dequantized(q, scales).abs() + b.double().abs() @ a.double().abs())
            assert_matches_reference(out, ref, magnitude, dtype)


def test_zero_sized_weights(isa):
    for rows, cols in [(0, 5), (5, 0), (0, 0)]:
        bitmap, values, offsets = ops.bitmap_encode(torch.zeros(rows, cols, dtype=torch.int8))
        scales = torch.ones(rows)
        bias = torch.randn(rows)
        out = ops.sparse_lowrank_gemm(torch.randn(3, cols), bitmap, values, offsets, rows, cols, bias=bias,
                                      scales=scales)
        torch.testing.assert_close(out, bias.expand(3, rows))
        dx = ops.sparse_gemm_transposed(torch.randn(3, rows), bitmap, values, offsets, rows, cols, scales=scales)
        torch.testing.assert_close(dx, torch.zeros(3, cols))

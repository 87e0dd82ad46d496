"""The fuzz profile of int8 values (issue 21): encode/decode and both products on every CPU ISA path,
with per-row or per-group scales, against the dequantize-then-float64 reference. The same agreement
rules as test_fuzz_ops.py (its docstring), the weight being scales · q: q is finite by construction,
so specials come from x / grad_out, adapters, bias and the scales' magnitude (2^-50 to 2^40).

One more overflow right: the kernels accumulate q · x in fp32 and scale a row's (or a group's) sum
once, so where Σ|x|·|q| itself nears fp32's largest finite, a non-finite result is admissible even
if the scaled result is finite."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import salr
from salr import reference
from fuzz_cases import (DTYPES, FUZZ_SETTINGS, LAYOUTS, densities, env, extents, fills, finite_abs, int8_adapters,
                        lay_out, lead_dims, materialize, sparse_product)
from test_fuzz_ops import (DEFAULT_DENSE_CROSSOVER, adapter_and_bias_allowance, adapter_operands, assert_admissible,
                           flat, folded_readings, gemm_readings, overflow_limit, torch_gemm_readings)

pytestmark = pytest.mark.skipif(not salr.native_available(), reason=salr.native_error() or "")
ISAS = salr.available_cpu_isas()


@st.composite
def int8_weights(draw):
    """(q [N, K] int8 with exact zeros at about 1 - density, fp32 scales [N] or [N, groups])."""
    rows, cols = draw(extents), draw(extents)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randint(-128, 128, (rows, cols), generator=gen, dtype=torch.int8)
    q[torch.rand(rows, cols, generator=gen) >= draw(densities)] = 0
    shape = (rows,) if draw(st.booleans()) else (rows, reference.groups_per_band(cols))
    log2 = draw(st.sampled_from([-7, -7, -50, 40]))
    scales = (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5) * 2.0**log2
    return q, scales.float()


@pytest.mark.parametrize("isa", ISAS)
@FUZZ_SETTINGS
@given(weight=int8_weights())
def test_encode_decode_int8(isa, weight):
    q, _ = weight
    with env(SALR_CPU_ISA=isa):
        bitmap, values, offsets = torch.ops.salr.bitmap_encode(q)
        decoded = torch.ops.salr.bitmap_decode(bitmap, values, offsets, *q.shape)
    for mine, ref in zip((bitmap, values, offsets), reference.bitmap_encode(q)):
        assert torch.equal(mine, ref)
    assert torch.equal(decoded, q)


@st.composite
def int8_gemm_cases(draw):
    q, scales = draw(int8_weights())
    dtype = draw(st.sampled_from(DTYPES))
    rows, cols = q.shape
    x = lay_out(materialize(draw(fills(dtype)), (*draw(lead_dims), cols), dtype), draw(st.sampled_from(LAYOUTS)))
    a = b = bias = adapter_scales = None
    kind = draw(st.sampled_from(["none", "float", "int8"]))
    if kind == "float":
        rank = draw(st.integers(0, 40))
        a = materialize(draw(fills(dtype)), (rank, cols), dtype)
        b = materialize(draw(fills(dtype)), (rows, rank), dtype)
    elif kind == "int8":
        a, b, adapter_scales = draw(int8_adapters(rows, cols))
    if draw(st.booleans()):
        bias = materialize(draw(fills(dtype)), (rows,), dtype)
    return dtype, q, scales, x, (a, b, adapter_scales), bias, draw(st.booleans())


@pytest.mark.parametrize("isa", ISAS)
@FUZZ_SETTINGS
@given(case=int8_gemm_cases())
def test_sparse_lowrank_gemm_int8(isa, case):
    dtype, q, scales, x, adapter, bias, dense_path = case
    rows, cols = q.shape
    bitmap, values, offsets = torch.ops.salr.bitmap_encode(q)
    with env(SALR_CPU_ISA=isa, SALR_CPU_DENSE_CROSSOVER="1" if dense_path else None):
        out = torch.ops.salr.sparse_lowrank_gemm(x, bitmap, values, offsets, rows, cols, adapter[0], adapter[1], bias,
                                                 scales, adapter[2])
    assert out.shape == (*x.shape[:-1], rows) and out.dtype == dtype
    out, x2 = flat(out), flat(x).double()
    a, b, unscaled_overflow = adapter_operands(adapter)
    w = reference.dequantize(q, scales, torch.float64)
    readings = [gemm_readings(x2, w, a, b, bias, bitmap, offsets)]
    if dense_path or x2.shape[0] >= DEFAULT_DENSE_CROSSOVER[dtype]:
        readings += torch_gemm_readings(flat(x), w, a, b, bias) + folded_readings(flat(x), w, a, b, bias)
    magnitude, absolute, may_overflow = adapter_and_bias_allowance(x2, a, b, bias, finite_abs(x2) @ w.abs().T)
    unscaled = finite_abs(x2) @ q.double().abs().T
    may_overflow |= (magnitude > overflow_limit(dtype)) | (unscaled > overflow_limit(torch.float32))
    may_overflow |= unscaled_overflow(x2)
    assert_admissible(out, readings, magnitude, may_overflow, dtype, absolute)


@st.composite
def int8_transposed_cases(draw):
    q, scales = draw(int8_weights())
    dtype = draw(st.sampled_from(DTYPES))
    dy = materialize(draw(fills(dtype)), (*draw(lead_dims), q.shape[0]), dtype)
    return dtype, q, scales, lay_out(dy, draw(st.sampled_from(LAYOUTS))), draw(st.booleans())


@pytest.mark.parametrize("isa", ISAS)
@FUZZ_SETTINGS
@given(case=int8_transposed_cases())
def test_sparse_gemm_transposed_int8(isa, case):
    dtype, q, scales, dy, dense_path = case
    rows, cols = q.shape
    bitmap, values, offsets = torch.ops.salr.bitmap_encode(q)
    with env(SALR_CPU_ISA=isa, SALR_CPU_DENSE_CROSSOVER="1" if dense_path else None):
        out = torch.ops.salr.sparse_gemm_transposed(dy, bitmap, values, offsets, rows, cols, scales)
    assert out.shape == (*dy.shape[:-1], cols) and out.dtype == dtype
    out, dy2 = flat(out), flat(dy).double()
    w = reference.dequantize(q, scales, torch.float64)
    ref = reference.sparse_gemm_transposed(dy2, bitmap, values, offsets, rows, cols, scales)
    magnitude = finite_abs(dy2) @ w.abs()
    assert_admissible(out, [(ref, sparse_product(dy2, w.T))], magnitude, magnitude > overflow_limit(dtype), dtype)

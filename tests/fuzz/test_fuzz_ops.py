"""Property fuzzing of every ``torch.ops.salr`` op on every CPU ISA path against the float64 reference.

Each test draws shapes (N, K from 0 to 140, M = 0, 1, ... through 0-3 leading batch dims), a dtype
(fp32 / bf16 / fp16), a density in [0, 1], memory layouts (transposed, inner stride 2, stride-0
expand), adapter ranks 0..64 (or no adapter), an optional bias, the kernel path (sparse kernel or
decode + dense GEMM, forced with SALR_CPU_DENSE_CROSSOVER) and values: normal, scaled by 2^±50
(2^±5 in fp16), and NaN, ±inf, subnormals, ±max and max/2 at drawn places.

What "agrees with the reference" means (fuzz_cases.admissible implements it, per output element):

* The reference is ``salr.reference`` in float64 on the same inputs (exactly upcast).
* NaN where the reference is NaN, the same infinity where it is infinite, and finite results within
  ``TOLERANCE[dtype] · Σ|terms|`` (+ the dtype's smallest normal): the tests' tolerance table.
* A pruned weight is absent, not a stored zero: a NaN/inf in x (or grad_out) that meets only pruned
  weights of an output may either give NaN there (IEEE 0·inf, what the reference's dense product
  and the SIMD / dense-GEMM paths do) or be skipped (the scalar kernel). A NaN or inf *weight* is
  always stored (encode keeps every value != 0) and propagates like in a dense product.
* bf16 only: an input below the smallest normal may be read as zero (vdpbf16ps and oneDNN's bf16
  GEMM have DAZ); the reference with those inputs flushed is admissible too.
* Overflow: where Σ|terms| (or the fp32 adapter intermediate t = x·Aᵀ) exceeds half the largest
  finite of fp32 or of the output dtype, the fp32 accumulation may overflow: a non-finite result is
  admissible there (a finite one must still be within tolerance).
* Underflow of t = x·Aᵀ (fp32 by design): below fp32's smallest normal t keeps only an absolute
  accuracy, which B scales (added to the bound); where such a t meets an infinite B, any non-finite
  result is admissible (the sign and zero-ness of t are not determined).
* bitmap_encode and bitmap_decode are exact: bit-identical to the reference (NaN payloads included).

Profiles (hypothesis settings, fuzz_cases.py): ``ci`` (default; 100 cases per op and ISA path, ~30 s)
and ``long`` (10,000 per op and path)::

    SALR_FUZZ_PROFILE=long OMP_NUM_THREADS=1 python -m pytest tests/fuzz -q --hypothesis-show-statistics
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

import salr
from salr import reference
from conftest import TOLERANCE
from fuzz_cases import (DTYPES, FP32_MAX, FP32_TINY, FUZZ_SETTINGS, LAYOUTS, admissible, densities, describe_mismatch, env,
                        extents, fills, finite_abs, flush_subnormals, int8_adapters, lay_out, lead_dims, materialize,
                        sparse_dense, sparse_product)

pytestmark = pytest.mark.skipif(not salr.native_available(), reason=salr.native_error() or "")
ISAS = salr.available_cpu_isas()


@st.composite
def weights(draw):
    dtype = draw(st.sampled_from(DTYPES))
    rows, cols = draw(extents), draw(extents)
    dense = sparse_dense(draw(fills(dtype)), rows, cols, draw(densities), dtype)
    return dtype, dense


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so NaN payloads and signed zeros compare exactly."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def flat(t: torch.Tensor) -> torch.Tensor:
    """[..., n] -> [M, n] (M may be 0 even when n is 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def overflow_limit(dtype: torch.dtype) -> float:
    return min(FP32_MAX, torch.finfo(dtype).max) / 2


def assert_admissible(out, readings, magnitude, may_overflow, dtype, absolute=0.0):
    bound = TOLERANCE[dtype] * magnitude + torch.finfo(dtype).tiny + absolute
    ok = admissible(out, readings, bound, may_overflow)
    assert bool(ok.all()), describe_mismatch(out, ok, readings[0][0], bound)


# ---- codec -----------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ISAS)
@FUZZ_SETTINGS
@given(weight=weights(), layout=st.sampled_from(LAYOUTS))
def test_encode_decode(isa, weight, layout):
    dtype, dense = weight
    dense = lay_out(dense, layout)
    rows, cols = dense.shape
    with env(SALR_CPU_ISA=isa):
        bitmap, values, offsets = torch.ops.salr.bitmap_encode(dense)
        decoded = torch.ops.salr.bitmap_decode(bitmap, values, offsets, rows, cols)
    ref_bitmap, ref_values, ref_offsets = reference.bitmap_encode(dense)
    assert torch.equal(bitmap, ref_bitmap) and torch.equal(offsets, ref_offsets)
    assert values.dtype == dtype and torch.equal(bits(values), bits(ref_values))
    assert torch.equal(bits(decoded), bits(reference.bitmap_decode(bitmap, values, offsets, rows, cols)))
    # decode(encode(w)) is w, with -0.0 read as the zero it is.
    assert torch.equal(bits(decoded), bits(torch.where(dense == 0, torch.zeros((), dtype=dtype), dense)))


# ---- sparse_lowrank_gemm ---------------------------------------------------------------------

@st.composite
def gemm_cases(draw):
    dtype, dense = draw(weights())
    rows, cols = dense.shape
    x = lay_out(materialize(draw(fills(dtype)), (*draw(lead_dims), cols), dtype), draw(st.sampled_from(LAYOUTS)))
    a = b = bias = adapter_scales = None
    kind = draw(st.sampled_from(["none", "float", "int8"]))
    if kind == "float":
        rank = draw(st.one_of(st.integers(0, 8), st.integers(9, 64)))
        a = lay_out(materialize(draw(fills(dtype)), (rank, cols), dtype), draw(st.sampled_from(LAYOUTS[:3])))
        b = lay_out(materialize(draw(fills(dtype)), (rows, rank), dtype), draw(st.sampled_from(LAYOUTS[:3])))
    elif kind == "int8":
        a, b, adapter_scales = draw(int8_adapters(rows, cols))
    if draw(st.booleans()):
        bias = materialize(draw(fills(dtype)), (rows,), dtype)
    return dtype, dense, x, (a, b, adapter_scales), bias, draw(st.booleans())


def adapter_operands(adapter):
    """(a, b) as the readings take them (an int8 adapter dequantized to float64) and the extra overflow
    right of an int8 one: the kernels sum t·q_b unscaled in fp32 before applying its scale."""
    a, b, adapter_scales = adapter
    if adapter_scales is None:
        return a, b, lambda x2: False
    a64, b64 = reference.dequantized_adapter(a, b, adapter_scales, torch.float64)
    return a64, b64, lambda x2: (finite_abs(x2) @ a64.abs().T) @ b.double().abs().T > FP32_MAX / 2


def gemm_readings(x2, w, a, b, bias, bitmap, offsets):
    """(dense, sparse) float64 results: the reference op, and the product skipping pruned weights."""
    rows, cols = w.shape
    d = lambda t: None if t is None else t.double()  # noqa: E731
    dense = reference.sparse_lowrank_gemm(x2, bitmap, reference.to_tiles(w)[reference.unpack_bitmap(bitmap)],
                                          offsets, rows, cols, d(a), d(b), d(bias))
    sparse = sparse_product(x2, w)
    if a is not None:
        sparse = sparse + (x2 @ d(a).T) @ d(b).T
    if bias is not None:
        sparse = sparse + d(bias)
    return dense, sparse


# Rows of x from which the CPU op decodes and calls torch's GEMM (cpp/dense_chunks.h).
DEFAULT_DENSE_CROSSOVER = {torch.float32: 256, torch.bfloat16: 64, torch.float16: 64}


def torch_gemm_readings(x, w, a, b, bias):
    """The decode + dense-GEMM path returns what torch's GEMM gives on the decoded weight, and that
    GEMM (oneDNN / MKL here) does not keep a NaN to its own output: on this Sapphire Rapids a NaN in
    x row 8 also turns row 7 NaN in bf16, and a NaN weight W[0, 0] turns out[30:32, 1] NaN (fp32 and
    bf16). Those NaNs are admissible on that path: the readings are torch's product, in x's dtype
    and in fp32."""
    readings = []
    for compute in {x.dtype, torch.float32}:
        y = torch.nn.functional.linear(x.to(compute), w.to(compute)).double()
        if a is not None:
            y = y + (x.double() @ a.double().T) @ b.double().T
        if bias is not None:
            y = y + bias.double()
        readings.append((y, y))
    return readings


def folded_readings(lhs, w, a, b, bias):
    """The decode + dense-GEMM paths fold the adapter into an fp32 weight chunk when that is cheaper
    (cpp/dense_chunks.h): lhs·(W + B·A)ᵀ with W + B·A formed in fp32 as the op forms it, so where B·A
    overflows fp32, or meets a non-finite weight, that association's result is what comes out (in
    float64 and through torch's fp32 GEMM, as torch_gemm_readings)."""
    if a is None or w.shape[1] == 0:
        return []
    w_eff = torch.addmm(w.float(), b.float(), a.float())
    readings = []
    for y in (lhs.double() @ w_eff.double().T, torch.nn.functional.linear(lhs.float(), w_eff).double()):
        if bias is not None:
            y = y + bias.double()
        readings.append((y, y))
    return readings


@pytest.mark.parametrize("isa", ISAS)
@FUZZ_SETTINGS
@given(case=gemm_cases())
def test_sparse_lowrank_gemm(isa, case):
    dtype, dense, x, adapter, bias, dense_path = case
    rows, cols = dense.shape
    bitmap, values, offsets = torch.ops.salr.bitmap_encode(dense)
    with env(SALR_CPU_ISA=isa, SALR_CPU_DENSE_CROSSOVER="1" if dense_path else None):
        out = torch.ops.salr.sparse_lowrank_gemm(x, bitmap, values, offsets, rows, cols, adapter[0], adapter[1], bias,
                                                 None, adapter[2])
    assert out.shape == (*x.shape[:-1], rows) and out.dtype == dtype
    out, x2, w = flat(out), flat(x).double(), dense.double()
    a, b, unscaled_overflow = adapter_operands(adapter)
    readings = [gemm_readings(x2, w, a, b, bias, bitmap, offsets)]
    if dtype == torch.bfloat16:
        readings.append(gemm_readings(flush_subnormals(x2.to(dtype)).double(), flush_subnormals(dense).double(),
                                      a, b, bias, bitmap, offsets))
    if dense_path or x2.shape[0] >= DEFAULT_DENSE_CROSSOVER[dtype]:
        readings += torch_gemm_readings(flat(x), dense, a, b, bias) + folded_readings(flat(x), dense, a, b, bias)
    magnitude, absolute, may_overflow = adapter_and_bias_allowance(x2, a, b, bias, finite_abs(x2) @ finite_abs(w).T)
    may_overflow |= (magnitude > overflow_limit(dtype)) | unscaled_overflow(x2)
    assert_admissible(out, readings, magnitude, may_overflow, dtype, absolute)


def adapter_and_bias_allowance(x2, a, b, bias, magnitude):
    """(magnitude, absolute, may_overflow) of the product term's `magnitude` plus the adapter and bias
    terms, with the rights of the fp32 adapter intermediate t = x·Aᵀ."""
    may_overflow = torch.zeros(magnitude.shape, dtype=torch.bool)
    absolute = torch.zeros(magnitude.shape[-1], dtype=torch.float64)
    if a is not None:
        t_magnitude = finite_abs(x2) @ finite_abs(a).T
        magnitude = magnitude + t_magnitude @ finite_abs(b).T
        # t = x·Aᵀ is an fp32 intermediate: below fp32's smallest normal it keeps only an absolute
        # accuracy, which B scales.
        absolute = absolute + FP32_TINY * finite_abs(b).sum(1)
        may_overflow |= (t_magnitude > FP32_MAX / 2).any(1, keepdim=True)
        # Where t underflows (|t| within fp32's accuracy of 0) its sign and zero-ness are not
        # determined; times an infinite B that is any infinity or NaN (0·inf).
        t_exact = x2 @ a.double().T
        t_undetermined = t_exact.abs() <= TOLERANCE[torch.float32] * t_magnitude + FP32_TINY
        may_overflow |= (t_undetermined.double() @ (~torch.isfinite(b)).double().T) > 0
    if bias is not None:
        magnitude = magnitude + finite_abs(bias)
    return magnitude, absolute, may_overflow


# ---- sparse_gemm_transposed ------------------------------------------------------------------

@st.composite
def transposed_cases(draw):
    dtype, dense = draw(weights())
    rows, cols = dense.shape
    dy = materialize(draw(fills(dtype)), (*draw(lead_dims), rows), dtype)
    a = b = None
    if draw(st.booleans()):  # the forward's adapters: dx = dy·(W + B·A)
        rank = draw(st.one_of(st.integers(0, 8), st.integers(9, 64)))
        a = lay_out(materialize(draw(fills(dtype)), (rank, cols), dtype), draw(st.sampled_from(LAYOUTS[:3])))
        b = lay_out(materialize(draw(fills(dtype)), (rows, rank), dtype), draw(st.sampled_from(LAYOUTS[:3])))
    return dtype, dense, lay_out(dy, draw(st.sampled_from(LAYOUTS))), a, b, draw(st.booleans())


def transposed_readings(dy2, w, a, b, bitmap, offsets):
    """(dense, sparse) float64 results of dy·(W + B·A): the reference op, and the product skipping
    pruned weights (the adapter term (dy·B)·A in both)."""
    rows, cols = w.shape
    d = lambda t: None if t is None else t.double()  # noqa: E731
    dense = reference.sparse_gemm_transposed(dy2, bitmap, reference.to_tiles(w)[reference.unpack_bitmap(bitmap)],
                                             offsets, rows, cols, None, d(a), d(b))
    sparse = sparse_product(dy2, w.T)
    if a is not None:
        sparse = sparse + (dy2 @ d(b)) @ d(a)
    return dense, sparse


@pytest.mark.parametrize("isa", ISAS)
@FUZZ_SETTINGS
@given(case=transposed_cases())
def test_sparse_gemm_transposed(isa, case):
    dtype, dense, dy, a, b, dense_path = case
    rows, cols = dense.shape
    bitmap, values, offsets = torch.ops.salr.bitmap_encode(dense)
    with env(SALR_CPU_ISA=isa, SALR_CPU_DENSE_CROSSOVER="1" if dense_path else None):
        out = torch.ops.salr.sparse_gemm_transposed(dy, bitmap, values, offsets, rows, cols, None, a, b)
    assert out.shape == (*dy.shape[:-1], cols) and out.dtype == dtype
    out, dy2, w = flat(out), flat(dy).double(), dense.double()
    cases = [transposed_readings(dy2, w, a, b, bitmap, offsets)]
    if dtype == torch.bfloat16:
        cases.append(transposed_readings(flush_subnormals(dy2.to(dtype)).double(), flush_subnormals(dense).double(),
                                         a, b, bitmap, offsets))
    if dense_path or dy2.shape[0] >= DEFAULT_DENSE_CROSSOVER[torch.bfloat16]:  # 64 for every dtype here
        cases += folded_readings(flat(dy), w.T, None if a is None else b.T, None if a is None else a.T, None)
    # The adapter term's fp32 intermediate is t = dy·B: the forward's rights with (Bᵀ, Aᵀ) for (A, B).
    magnitude, absolute, may_overflow = adapter_and_bias_allowance(
        dy2, None if a is None else b.T, None if a is None else a.T, None, finite_abs(dy2) @ finite_abs(w))
    may_overflow |= magnitude > overflow_limit(dtype)
    assert_admissible(out, cases, magnitude, may_overflow, dtype, absolute)


# ---- sampled_gemm ----------------------------------------------------------------------------

@st.composite
def sampled_cases(draw):
    dtype, dense = draw(weights())
    inner = draw(st.one_of(st.integers(0, 3), st.integers(4, 40)))
    left = materialize(draw(fills(dtype)), (inner, dense.shape[0]), dtype)
    right = materialize(draw(fills(dtype)), (inner, dense.shape[1]), dtype)
    return dtype, dense, lay_out(left, draw(st.sampled_from(LAYOUTS[:3]))), lay_out(right, draw(st.sampled_from(LAYOUTS[:3])))


@pytest.mark.parametrize("isa", ISAS)
@FUZZ_SETTINGS
@given(case=sampled_cases())
def test_sampled_gemm(isa, case):
    dtype, dense, left, right = case
    rows, cols = dense.shape
    bitmap, values, offsets = torch.ops.salr.bitmap_encode(dense)
    with env(SALR_CPU_ISA=isa):
        out = torch.ops.salr.sampled_gemm(left, right, bitmap, values, offsets, rows, cols)
    assert out.shape == values.shape and out.dtype == dtype
    ref = reference.sampled_gemm(left.double(), right.double(), bitmap, values.double(), offsets, rows, cols)
    magnitude = reference.sampled_gemm(finite_abs(left), finite_abs(right), bitmap, values.double(), offsets,
                                       rows, cols)
    assert_admissible(out, [(ref, ref)], magnitude, magnitude > overflow_limit(dtype), dtype)

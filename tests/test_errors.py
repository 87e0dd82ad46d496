"""Bad input gets a clear error naming the op and the argument, never a crash or garbage."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import ops
from conftest import make_generator, random_sparse

pytestmark = pytest.mark.skipif(not salr.native_available(), reason=salr.native_error() or "")

ROWS, COLS = 20, 70


@pytest.fixture
def weight():
    dense = random_sparse(ROWS, COLS, 0.5, torch.float32, make_generator("err"))
    return ops.bitmap_encode(dense)


def gemm(x, bitmap, values, offsets, rows=ROWS, cols=COLS, a=None, b=None, bias=None):
    return torch.ops.salr.sparse_lowrank_gemm(x, bitmap, values, offsets, rows, cols, a, b, bias)


def test_wrong_dtypes(weight):
    bitmap, values, offsets = weight
    with pytest.raises(RuntimeError, match=r"salr.sparse_lowrank_gemm: x must have dtype Float, got BFloat16"):
        gemm(torch.randn(2, COLS, dtype=torch.bfloat16), *weight)
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: bitmap must have dtype Long"):
        gemm(torch.randn(2, COLS), bitmap.int(), values, offsets)
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: offsets must have dtype Int"):
        gemm(torch.randn(2, COLS), bitmap, values, offsets.long())
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: values must be float32, bfloat16 or float16"):
        gemm(torch.randn(2, COLS).double(), bitmap, values.double(), offsets)
    with pytest.raises(RuntimeError, match=r"bitmap_encode: dense must be float32"):
        torch.ops.salr.bitmap_encode(torch.ones(3, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: bias must have dtype Float"):
        gemm(torch.randn(2, COLS), *weight, bias=torch.zeros(ROWS, dtype=torch.float16))


def test_mismatched_shapes(weight):
    x = torch.randn(2, COLS)
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: x must have shape \[\.\.\., 70\]"):
        gemm(torch.randn(2, COLS + 1), *weight)
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: bitmap must have shape \[3, 10\] for a \[20, 78\] weight, got \[3, 9\]"):
        gemm(torch.randn(2, COLS + 8), *weight, cols=COLS + 8)
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: adapter_a must have shape \[rank, 70\]"):
        gemm(x, *weight, a=torch.randn(4, COLS - 1), b=torch.randn(ROWS, 4))
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: adapter_b must have shape \[20, 4\]"):
        gemm(x, *weight, a=torch.randn(4, COLS), b=torch.randn(ROWS, 5))
    with pytest.raises(RuntimeError, match=r"adapter_a and adapter_b must be given together"):
        gemm(x, *weight, a=torch.randn(4, COLS))
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: bias must have shape \[20\]"):
        gemm(x, *weight, bias=torch.zeros(ROWS + 1))
    with pytest.raises(RuntimeError, match=r"sparse_gemm_transposed: grad_out must have shape \[\.\.\., 20\]"):
        torch.ops.salr.sparse_gemm_transposed(torch.randn(2, ROWS + 1), *weight, ROWS, COLS)
    with pytest.raises(RuntimeError, match=r"sampled_gemm: right must have shape \[3, 70\]"):
        torch.ops.salr.sampled_gemm(torch.randn(3, ROWS), torch.randn(4, COLS), *weight, ROWS, COLS)
    with pytest.raises(RuntimeError, match=r"bitmap_decode: offsets must have 7 entries"):
        torch.ops.salr.bitmap_decode(weight[0], weight[1], weight[2][:-1], ROWS, COLS)


def test_values_length_must_match_popcounts(weight):
    bitmap, values, offsets = weight
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: offsets\[-1\] must equal the number of values"):
        gemm(torch.randn(2, COLS), bitmap, values[:-1].contiguous(), offsets)


@pytest.mark.parametrize("op", ["gemm", "transposed", "decode", "sampled"])
def test_inconsistent_bitmap_is_caught_before_reading(isa, weight, op):
    bitmap, values, offsets = weight
    flipped = bitmap.clone()
    flipped[1, 2] ^= 1 << 5  # popcount of band 1, group 0 no longer matches offsets
    padded = bitmap.clone()
    padded[2, 8] |= 1 << 7   # column 71 is padding in a 70-column weight
    bad_offsets = offsets.clone()
    bad_offsets[2] += 1      # the end of (band 0, group 1) and the start of (band 1, group 0)
    run = {
        "gemm": lambda b, o: gemm(torch.randn(3, COLS), b, values, o),
        "transposed": lambda b, o: torch.ops.salr.sparse_gemm_transposed(torch.randn(3, ROWS), b, values, o, ROWS, COLS),
        "decode": lambda b, o: torch.ops.salr.bitmap_decode(b, values, o, ROWS, COLS),
        "sampled": lambda b, o: torch.ops.salr.sampled_gemm(torch.randn(3, ROWS), torch.randn(3, COLS), b, values, o, ROWS, COLS),
    }[op]
    for b, o, where in [(flipped, offsets, "band 1, column group 0"), (padded, offsets, "band 2, column group 1"),
                        (bitmap, bad_offsets, "band (0, column group 1|1, column group 0)")]:
        with pytest.raises(RuntimeError, match=f"bitmap, values and offsets are inconsistent at {where}"):
            run(b, o)
    run(bitmap, offsets)  # the library stays usable after the errors


def test_non_contiguous_bitmap_and_wrong_device(weight):
    bitmap, values, offsets = weight
    wide = torch.stack([bitmap, bitmap], -1)[..., 0]  # same values, stride 2
    assert not wide.is_contiguous()
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: bitmap must be contiguous"):
        gemm(torch.randn(2, COLS), wide, values, offsets)
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: all tensors must be on one device"):
        gemm(torch.randn(2, COLS), bitmap.to("meta"), values, offsets)  # fake kernel runs: it must check


def test_bad_isa_variable_is_an_error(monkeypatch, weight):
    monkeypatch.setenv("SALR_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: SALR_CPU_ISA must be one of"):
        gemm(torch.randn(1, COLS), *weight)
    with pytest.raises(ValueError, match="SALR_CPU_ISA"):
        salr.cpu_isa()

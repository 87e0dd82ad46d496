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
    with pytest.raises(RuntimeError, match=r"sparse_lowrank_gemm: values must be float32, bfloat16, float16 or int8"):
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
    dy = torch.randn(2, ROWS)
    with pytest.raises(RuntimeError, match=r"sparse_gemm_transposed: adapter_b must have shape \[20, 4\]"):
        torch.ops.salr.sparse_gemm_transposed(dy, *weight, ROWS, COLS, None, torch.randn(4, COLS), torch.randn(ROWS, 5))
    with pytest.raises(RuntimeError, match=r"sparse_gemm_transposed: adapter_a and adapter_b must be given together"):
        torch.ops.salr.sparse_gemm_transposed(dy, *weight, ROWS, COLS, None, torch.randn(4, COLS), None)
    with pytest.raises(RuntimeError, match=r"sparse_gemm_transposed: adapter_a must have dtype Float, got Double"):
        torch.ops.salr.sparse_gemm_transposed(dy, *weight, ROWS, COLS, None, torch.randn(4, COLS).double(),
                                              torch.randn(ROWS, 4))
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


# ---- malformed sparse weights, every op that takes one, every ISA path ------------------------
# Weight [20, 70]: 3 bands x 9 tiles, 2 column groups per band, offsets has 7 entries.
# Where a cut makes several groups inconsistent, the kernels check groups in parallel and the
# first thread to fail names its group, so the expected location lists every bad group.

def _malformed_weight():
    """A [20, 70] weight with a nonzero in the last row and in the last column (so shrinking the
    logical shape puts set bits into the padding)."""
    dense = random_sparse(ROWS, COLS, 0.5, torch.float32, make_generator("malformed"))
    dense[ROWS - 1, 0] = dense[0, COLS - 1] = 1.0
    return ops.bitmap_encode(dense)


def _with(tensor, **edits):
    out = tensor.clone()
    for index, value in edits.items():
        out[int(index.removeprefix("i"))] = value
    return out


INCONSISTENT = r"bitmap, values and offsets are inconsistent at band"
# name -> (bitmap, values, offsets, rows, cols) edit, expected message after "salr.<op>: ".
MALFORMED = {
    "offsets not monotone": (lambda b, v, o: (b, v, _with(o, i2=o[3], i3=o[2]), ROWS, COLS), INCONSISTENT),
    "offset negative": (lambda b, v, o: (b, v, _with(o, i1=-5), ROWS, COLS), INCONSISTENT),
    "offset past the values": (lambda b, v, o: (b, v, _with(o, i5=v.numel() + 1000), ROWS, COLS), INCONSISTENT),
    "offset int32 max": (lambda b, v, o: (b, v, _with(o, i3=2**31 - 1), ROWS, COLS), INCONSISTENT),
    "offsets[0] not 0": (lambda b, v, o: (b, v, _with(o, i0=1), ROWS, COLS), r"offsets\[0\] must be 0, got 1"),
    "values longer than offsets say": (lambda b, v, o: (b, torch.cat([v, v[:3]]), o, ROWS, COLS),
                                       r"offsets\[-1\] must equal the number of values"),
    "values empty": (lambda b, v, o: (b, v[:0], o, ROWS, COLS), r"offsets\[-1\] must equal the number of values \(0\)"),
    "values 2-D": (lambda b, v, o: (b, v.view(1, -1), o, ROWS, COLS), r"values must be 1-D"),
    "values float64": (lambda b, v, o: (b, v.double(), o, ROWS, COLS), r"values must be float32, bfloat16, float16 or int8"),
    "values int32": (lambda b, v, o: (b, v.int(), o, ROWS, COLS), r"values must be float32, bfloat16, float16 or int8"),
    "bitmap int32": (lambda b, v, o: (b.int(), v, o, ROWS, COLS), r"bitmap must have dtype Long"),
    "bitmap 1-D": (lambda b, v, o: (b.view(-1), v, o, ROWS, COLS), r"bitmap must be 2-D"),
    "offsets int64": (lambda b, v, o: (b, v, o.long(), ROWS, COLS), r"offsets must have dtype Int"),
    "offsets 2-D": (lambda b, v, o: (b, v, o.view(1, -1), ROWS, COLS), r"offsets must be 1-D"),
    "offsets too short": (lambda b, v, o: (b, v, o[:-2].contiguous(), ROWS, COLS), r"offsets must have 7 entries"),
    "rows larger than the bitmap": (lambda b, v, o: (b, v, o, 40, COLS), r"bitmap must have shape \[5, 9\] for a \[40, 70\]"),
    "cols smaller than the bitmap": (lambda b, v, o: (b, v, o, ROWS, 60), r"bitmap must have shape \[3, 8\] for a \[20, 60\]"),
    "rows cut into the last band": (lambda b, v, o: (b, v, o, 17, COLS), INCONSISTENT + " 2, column group [01]"),
    "cols cut into the last tile": (lambda b, v, o: (b, v, o, ROWS, 65), INCONSISTENT + " [012], column group 1"),
    "row padding bit (the sign bit)": (lambda b, v, o: (_with(b.view(-1), i26=b.view(-1)[26] | (-2**63)).view(b.shape),
                                                        v, o, ROWS, COLS), INCONSISTENT + " 2, column group 1"),
    "negative out_features": (lambda b, v, o: (b, v, o, -8, COLS), r"out_features and in_features must be >= 0"),
}
WEIGHT_OPS = {
    "bitmap_decode": lambda b, v, o, n, k: torch.ops.salr.bitmap_decode(b, v, o, n, k),
    "sparse_lowrank_gemm": lambda b, v, o, n, k: torch.ops.salr.sparse_lowrank_gemm(torch.randn(3, k), b, v, o, n, k),
    "sparse_gemm_transposed": lambda b, v, o, n, k: torch.ops.salr.sparse_gemm_transposed(torch.randn(3, max(n, 0)), b, v, o, n, k),
    "sampled_gemm": lambda b, v, o, n, k: torch.ops.salr.sampled_gemm(torch.randn(3, max(n, 0)), torch.randn(3, k), b, v, o, n, k),
}


@pytest.mark.parametrize("op", WEIGHT_OPS)
def test_malformed_weights_raise_before_reading(isa, op):
    """Every malformed weight is refused with the op's name and what is wrong, on every kernel
    path (the per-group checks live in the ISA kernels); afterwards the op still works."""
    good = _malformed_weight()
    for name, (edit, message) in MALFORMED.items():
        with pytest.raises(RuntimeError, match=rf"salr\.{op}: ({message})") as caught:
            WEIGHT_OPS[op](*edit(*good))
        assert "salr." + op in str(caught.value), name
    dense = ops.bitmap_decode(*good, ROWS, COLS)
    x = torch.randn(3, COLS, dtype=torch.float64)
    torch.testing.assert_close(ops.sparse_lowrank_gemm(x.float(), *good, ROWS, COLS), (x @ dense.double().T).float())


@pytest.mark.parametrize("name", [n for n in MALFORMED if n != "values float64"])  # the oracle computes in float64
def test_reference_refuses_malformed_weights(name):
    """The pure-PyTorch fallback refuses the same weights with a ValueError naming the op."""
    edit, _ = MALFORMED[name]
    b, v, o, n, k = edit(*_malformed_weight())
    with pytest.raises(ValueError, match=r"salr\.bitmap_decode: "):
        salr.reference.bitmap_decode(b, v, o, n, k)

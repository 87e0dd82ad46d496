"""sparse_lowrank_gemm, sparse_gemm_transposed and sampled_gemm against the float64 reference, on
every CPU ISA path, dtype, awkward shape and density."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import _native, ops, reference
from conftest import DENSITIES, DTYPES, SHAPES, assert_matches_reference, make_generator, random_sparse

# Rows of x exercised on the sparse-kernel path; 64 and above take the decode + dense GEMM path.
KERNEL_ROWS = [0, 1, 3, 12, 17]  # 12 and 17: staged 8-row blocks with R = 4 and R = 1 tails
DENSE_PATH_ROWS = [64, 100]


def make_case(rows, cols, density, dtype, m, rank, with_bias, key):
    gen = make_generator(*key)
    dense = random_sparse(rows, cols, density, dtype, gen)
    x = torch.randn(m, cols, generator=gen).to(dtype)
    a = torch.randn(rank, cols, generator=gen).to(dtype) if rank else None
    b = (torch.randn(rows, rank, generator=gen) / 4).to(dtype) if rank else None
    bias = torch.randn(rows, generator=gen).to(dtype) if with_bias else None
    return dense, x, a, b, bias


def check_forward(dense, x, a, b, bias, dtype):
    rows, cols = dense.shape
    bitmap, values, offsets = ops.bitmap_encode(dense)
    out = ops.sparse_lowrank_gemm(x, bitmap, values, offsets, rows, cols, a, b, bias)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = reference.sparse_lowrank_gemm(x.double(), bitmap, values.double(), offsets, rows, cols, d(a), d(b), d(bias))
    magnitude = x.double().abs() @ dense.double().abs().T
    if a is not None:
        magnitude = magnitude + (x.double().abs() @ a.double().abs().T) @ b.double().abs().T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    assert_matches_reference(out, ref, magnitude, dtype)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_kernel_path(isa, dtype, shape, density):
    for m in KERNEL_ROWS:
        for rank, with_bias in [(0, False), (5, True), (32, False)]:
            case = make_case(*shape, density, dtype, m, rank, with_bias, (shape, density, dtype, m, rank))
            check_forward(*case, dtype)


def structured_sparse(rows: int, cols: int, pattern: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Sparsity the M = 1 row walk treats specially (its fast loop takes whole 64-column groups,
    its bf16 form tile rows in pairs that share one load): empty and full tile rows side by side,
    all-empty tiles inside full groups, a first group with fewer than 8 values (the fast loop starts
    later), and a last band dense to the end of the values array."""
    dense = torch.randn(rows, cols, generator=gen)
    r = torch.arange(rows)[:, None]
    c = torch.arange(cols)[None, :]
    if pattern == "rows":  # per band: rows empty, full, or random; pairs of every kind
        keep = (r % 3 == 1) | ((r % 3 == 2) & (torch.rand(rows, cols, generator=gen) < 0.5))
    elif pattern == "tiles":  # every other tile of a band empty, the rest 70% sparse
        keep = ((c // 8 + r // 8) % 2 == 0) & (torch.rand(rows, cols, generator=gen) < 0.3)
    else:  # "ends": a near-empty first group, sparse middle, dense last band
        keep = torch.rand(rows, cols, generator=gen) < 0.3
        keep[:8, :64] = (r[:8] == 0) & (c[:, :64] < 3)
        keep[(rows - 1) // 8 * 8:] = True
    dense[~keep] = 0.0
    dense = dense.to(dtype)
    dense[dense == 0] = 0.0
    return dense


@pytest.mark.parametrize("pattern", ["rows", "tiles", "ends"])
@pytest.mark.parametrize("shape", [(24, 575), (40, 577), (16, 1024), (27, 520)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_row_walk_special_cases(isa, dtype, shape, pattern):
    # Several full 64-column groups per band (the fast loop), ragged K on both sides of a group edge.
    gen = make_generator("walk", shape, pattern, dtype)
    dense = structured_sparse(*shape, pattern, dtype, gen)
    x = torch.randn(1, shape[1], generator=gen).to(dtype)
    check_forward(dense, x, None, None, None, dtype)
    a = torch.randn(5, shape[1], generator=gen).to(dtype)
    b = (torch.randn(shape[0], 5, generator=gen) / 4).to(dtype)
    check_forward(dense, x, a, b, torch.randn(shape[0], generator=gen).to(dtype), dtype)


@pytest.mark.parametrize("gemm", ["native", "fp32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 70), (100, 130), (576, 192)])
def test_forward_dense_path(dtype, shape, gemm, monkeypatch):
    # Force the decode + dense GEMM path for every dtype (fp32 only takes it from M = 256 by default),
    # with the GEMM in the weight's dtype and widened to fp32 (what a CPU without AVX512_BF16 gets).
    # With fp32 chunks, (13, 70) and (100, 130) fold the adapter into the chunk (M·(K + N) > N·K,
    # cpp/dense_chunks.h) and (576, 192) applies it after the GEMM.
    monkeypatch.setenv("SALR_CPU_DENSE_CROSSOVER", str(min(DENSE_PATH_ROWS)))
    monkeypatch.setenv("SALR_CPU_DENSE_GEMM", gemm)
    for m in DENSE_PATH_ROWS:
        for rank, with_bias in [(0, False), (0, True), (7, True)]:
            case = make_case(*shape, 0.5, dtype, m, rank, with_bias, ("dense", shape, dtype, m, rank))
            check_forward(*case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_path_over_several_chunks(dtype, monkeypatch):
    # 520×4100: chunks of 31 bands (1M elements, cpp/dense_chunks.h), so three chunks, the last of 3
    # bands with a ragged end; each writes its own columns of y (straight into y without an adapter).
    # M = 470 folds the adapter into fp32 chunks (470·4620 > 520·4100), M = 64 does not.
    monkeypatch.setenv("SALR_CPU_DENSE_CROSSOVER", "64")
    rows, cols = 520, 4100
    for m, rank, with_bias in [(64, 0, True), (64, 7, False), (470, 7, True)]:
        check_forward(*make_case(rows, cols, 0.5, dtype, m, rank, with_bias, ("chunks", dtype, m)), dtype)
    dense = random_sparse(rows, cols, 0.5, dtype, make_generator("chunks-t", dtype))
    gen = make_generator("chunks-dy")
    a, b = torch.randn(7, cols, generator=gen).to(dtype), (torch.randn(rows, 7, generator=gen) / 4).to(dtype)
    for m, adapter in [(64, (None, None)), (64, (a, b)), (470, (a, b))]:  # the adapter folded at M = 470
        check_transposed(dense, torch.randn(m, rows, generator=gen).to(dtype), *adapter, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_default_large_m_dispatch(isa, dtype):
    # M = 100 with the default crossover: bf16/fp16 take the dense path, fp32 the kernel.
    case = make_case(100, 130, 0.5, dtype, 100, 7, True, ("default-dispatch", dtype))
    check_forward(*case, dtype)


@pytest.mark.skipif(not salr.native_available(), reason=salr.native_error() or "")
def test_dense_gemm_dtype_choice(monkeypatch):
    gemm_dtype = _native._C.cpu_dense_gemm_dtype
    monkeypatch.delenv("SALR_CPU_DENSE_GEMM", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert gemm_dtype("float32") == "float32"
    assert gemm_dtype("float16") == "float32"  # no fast fp16 GEMM in torch on a CPU
    assert gemm_dtype("bfloat16") == ("bfloat16" if "avx512_bf16" in cpu_flags() else "float32")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # oneDNN without bf16 instructions: widen
    assert gemm_dtype("bfloat16") == "float32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert gemm_dtype("bfloat16") == ("bfloat16" if "avx512_bf16" in cpu_flags() else "float32")
    monkeypatch.setenv("SALR_CPU_DENSE_GEMM", "native")
    assert [gemm_dtype(d) for d in ("float32", "bfloat16", "float16")] == ["float32", "bfloat16", "float16"]
    monkeypatch.setenv("SALR_CPU_DENSE_GEMM", "fp32")
    assert gemm_dtype("bfloat16") == "float32"
    monkeypatch.setenv("SALR_CPU_DENSE_GEMM", "bf16")
    with pytest.raises(ValueError, match="SALR_CPU_DENSE_GEMM"):
        gemm_dtype("bfloat16")
    dense = random_sparse(8, 8, 0.5, torch.bfloat16, make_generator("env"))
    with pytest.raises(RuntimeError, match="sparse_lowrank_gemm.*SALR_CPU_DENSE_GEMM"):
        ops.sparse_lowrank_gemm(torch.ones(100, 8, dtype=torch.bfloat16), *ops.bitmap_encode(dense), 8, 8)


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


def test_leading_dims_and_non_contiguous_x(isa):
    dense = random_sparse(24, 40, 0.5, torch.float32, make_generator("lead"))
    bitmap, values, offsets = ops.bitmap_encode(dense)
    x = torch.randn(2, 3, 40, generator=make_generator("x"))
    out = ops.sparse_lowrank_gemm(x, bitmap, values, offsets, 24, 40)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, x @ dense.T)
    x_t = torch.randn(40, 5, generator=make_generator("xt")).T  # stride (1, 5): non-contiguous rows
    torch.testing.assert_close(ops.sparse_lowrank_gemm(x_t, bitmap, values, offsets, 24, 40), x_t @ dense.T)
    x_strided = torch.randn(4, 80, generator=make_generator("xs"))[:, ::2]  # inner stride 2
    torch.testing.assert_close(ops.sparse_lowrank_gemm(x_strided, bitmap, values, offsets, 24, 40),
                               x_strided @ dense.T)
    empty = ops.sparse_lowrank_gemm(torch.empty(0, 7, 40), bitmap, values, offsets, 24, 40)
    assert empty.shape == (0, 7, 24)


def test_zero_sized_weights(isa):
    for rows, cols in [(0, 5), (5, 0), (0, 0)]:
        bitmap, values, offsets = ops.bitmap_encode(torch.zeros(rows, cols))
        x = torch.randn(3, cols)
        bias = torch.randn(rows)
        out = ops.sparse_lowrank_gemm(x, bitmap, values, offsets, rows, cols, bias=bias)
        torch.testing.assert_close(out, bias.expand(3, rows))
        dx = ops.sparse_gemm_transposed(torch.randn(3, rows), bitmap, values, offsets, rows, cols)
        torch.testing.assert_close(dx, torch.zeros(3, cols))


@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_product(isa, dtype, shape, density):
    rows, cols = shape
    dense = random_sparse(rows, cols, density, dtype, make_generator("t", shape, density, dtype))
    bitmap, values, offsets = ops.bitmap_encode(dense)
    for m in KERNEL_ROWS + DENSE_PATH_ROWS[:1]:
        dy = torch.randn(m, rows, generator=make_generator("dy", m)).to(dtype)
        check_transposed(dense, dy, None, None, dtype)
        # With the forward's adapters, dy·(W + B·A): kernel path, and at M = 64 the chunk path (the
        # adapter folded into fp32 chunks where M·(K + N) > N·K, else added after the GEMM).
        a = torch.randn(5, cols, generator=make_generator("ta", m)).to(dtype)
        b = (torch.randn(rows, 5, generator=make_generator("tb", m)) / 4).to(dtype)
        check_transposed(dense, dy, a, b, dtype)


def check_transposed(dense, dy, a, b, dtype):
    rows, cols = dense.shape
    bitmap, values, offsets = ops.bitmap_encode(dense)
    out = ops.sparse_gemm_transposed(dy, bitmap, values, offsets, rows, cols, adapter_a=a, adapter_b=b)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref = reference.sparse_gemm_transposed(dy.double(), bitmap, values.double(), offsets, rows, cols, None, d(a), d(b))
    weight_magnitude = dense.double().abs() + (0 if a is None else b.double().abs() @ a.double().abs())
    assert_matches_reference(out, ref, dy.double().abs() @ weight_magnitude, dtype)


@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_product(dtype, shape, density):
    rows, cols = shape
    dense = random_sparse(rows, cols, density, dtype, make_generator("s", shape, density, dtype))
    bitmap, values, offsets = ops.bitmap_encode(dense)
    for inner in [1, 6, 33]:
        left = torch.randn(inner, rows, generator=make_generator("l", inner)).to(dtype)
        right = torch.randn(inner, cols, generator=make_generator("r", inner)).to(dtype)
        out = ops.sampled_gemm(left, right, bitmap, values, offsets, rows, cols)
        ref = reference.sampled_gemm(left.double(), right.double(), bitmap, values.double(), offsets, rows, cols)
        magnitude = reference.sampled_gemm(left.double().abs(), right.double().abs(), bitmap, values.double(),
                                           offsets, rows, cols)
        assert out.shape == values.shape
        assert_matches_reference(out, ref.to(torch.float64), magnitude, dtype)

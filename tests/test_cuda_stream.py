"""The opt-in stream kernel (SALR_CUDA_KERNEL=stream) of sparse_lowrank_gemm on CUDA against the
float64 reference: awkward shapes, densities 0-100%, every token tile (M = 1..128), forced split-K,
adapters and bias, and the re-layout cache (rebuilt when the weight changes in place). Skipped
without a GPU; the host simulation of the same decode is tests/test_cuda_stream_layout.py."""

from __future__ import annotations

import pytest
import torch

from salr import ops
from conftest import make_generator
from test_cuda import DEV, HALF_DTYPES, SHAPES, check_gemm, encode_on, gemm_case, pytestmark  # noqa: F401

STREAM_ROWS = [1, 5, 8, 9, 16, 17, 32, 33, 64, 65, 127, 128]  # every token tile (1, 2, 4, 8) and its edges


@pytest.fixture(autouse=True)
def stream_kernel(monkeypatch):
    monkeypatch.setenv("SALR_CUDA_KERNEL", "stream")


@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_stream_kernel_matches_reference(dtype, shape, density):
    for m in STREAM_ROWS:
        for rank, with_bias in [(0, False), (5, True)]:
            key = ("stream", shape, density, dtype, m, rank)
            check_gemm(*gemm_case(*shape, density, dtype, m, rank, with_bias, key), dtype)


@pytest.mark.parametrize("splits", ["1", "2", "3", "1000"])
def test_forced_split_k(splits, monkeypatch):
    monkeypatch.setenv("SALR_CUDA_SPLIT_K", splits)
    for m in [1, 16, 40, 128]:
        check_gemm(*gemm_case(72, 4104, 0.5, torch.bfloat16, m, 32, True, ("split", splits, m)), torch.bfloat16)


def test_relayout_cache_follows_in_place_changes_and_new_weights():
    dtype = torch.bfloat16
    gen = make_generator("stream-cache")
    dense = torch.where(torch.rand(40, 200, generator=gen) < 0.5, torch.randn(40, 200, generator=gen),
                        torch.zeros(40, 200)).to(dtype)
    x = torch.randn(3, 200, generator=gen).to(dtype)
    bitmap, values, offsets = encode_on(dense)
    first = ops.sparse_lowrank_gemm(x.to(DEV), bitmap, values, offsets, 40, 200)
    values.mul_(2)  # same storage, new version: the cached re-layout must be rebuilt
    second = ops.sparse_lowrank_gemm(x.to(DEV), bitmap, values, offsets, 40, 200)
    torch.testing.assert_close(second.float(), 2 * first.float(), rtol=1e-2, atol=1e-2)
    other = encode_on(-dense)
    third = ops.sparse_lowrank_gemm(x.to(DEV), *other, 40, 200)
    torch.testing.assert_close(third.float(), -first.float(), rtol=1e-2, atol=1e-2)


def test_above_the_stream_rows_the_default_paths_serve():
    check_gemm(*gemm_case(100, 130, 0.5, torch.bfloat16, 129, 7, True, ("stream-129",)), torch.bfloat16)


def test_bad_kernel_name_is_refused(monkeypatch):
    monkeypatch.setenv("SALR_CUDA_KERNEL", "fast")
    dense, x, *_ = gemm_case(16, 64, 0.5, torch.bfloat16, 2, 0, False, ("stream-bad",))
    with pytest.raises(RuntimeError, match="SALR_CUDA_KERNEL must be 'mma' .* or 'stream', got 'fast'"):
        ops.sparse_lowrank_gemm(x.to(DEV), *encode_on(dense), 16, 64)

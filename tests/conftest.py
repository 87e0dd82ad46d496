"""Shared fixtures: seeded generators, every CPU ISA path, the per-dtype tolerance table, one torch
thread for the model-level tests (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""

from __future__ import annotations

import pytest
import torch

import salr

# Relative error allowed against a float64 reference, scaled by the magnitude bound |x|·|W|ᵀ (+ the
# adapter and bias magnitudes): fp32 accumulation of K terms plus one rounding to the output dtype.
TOLERANCE = {
    torch.float32: 2e-5,
    torch.bfloat16: 1.6e-2,  # 2 ulp of bf16 (2^-8 each): one output rounding + one on the dense path
    torch.float16: 2e-3,     # 2 ulp of fp16
}
DTYPES = list(TOLERANCE)

# Awkward shapes: tiny, not multiples of 8 or 64, exact tiles, SmolLM2-like.
SHAPES = [(1, 1), (7, 9), (8, 8), (13, 70), (64, 64), (100, 130), (576, 192)]
DENSITIES = [0.0, 0.1, 0.5, 0.9, 1.0]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is as fast, and far faster on a machine shared with other jobs. Not
    for the kernel tests, whose threaded paths must run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cpu_isas() -> list[str]:
    return salr.available_cpu_isas() or ["reference"]


@pytest.fixture(params=cpu_isas())
def isa(request, monkeypatch):
    """Runs the test once per CPU kernel path this machine has, forced through SALR_CPU_ISA."""
    if request.param != "reference":
        monkeypatch.setenv("SALR_CPU_ISA", request.param)
        assert salr.cpu_isa() == request.param
    return request.param


def make_generator(*key) -> torch.Generator:
    """A generator seeded from the test's parameters, so every case is reproducible alone."""
    return torch.Generator().manual_seed(hash(tuple(str(k) for k in key)) % (2**31))


def random_sparse(rows: int, cols: int, density: float, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A dense [rows, cols] matrix with exact zeros at a random (1 - density) fraction."""
    dense = torch.randn(rows, cols, generator=gen)
    dense[torch.rand(rows, cols, generator=gen) >= density] = 0.0
    dense = dense.to(dtype)
    dense[dense == 0] = 0.0  # a value that rounded to zero is a zero
    return dense


def assert_matches_reference(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor,
                             dtype: torch.dtype) -> None:
    """|out - ref| <= tol[dtype] * magnitude (+ the dtype's smallest normal) elementwise."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == dtype
    err = (out.double() - ref).abs()
    bound = TOLERANCE[dtype] * magnitude + torch.finfo(dtype).tiny
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds the {dtype} bound by {worst:.3g}"

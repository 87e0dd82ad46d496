"""The native library's facts and the pure-PyTorch fallback."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import ops
from conftest import make_generator, random_sparse


def test_native_library_loads_here():
    # CI builds the extension first: a missing library there is a packaging bug, not a skip.
    assert salr.native_available(), salr.native_error()
    assert "scalar" in salr.available_cpu_isas()


def test_isa_is_forced_by_the_environment(monkeypatch):
    for isa in salr.available_cpu_isas():
        monkeypatch.setenv("SALR_CPU_ISA", isa)
        assert salr.cpu_isa() == isa
    monkeypatch.setenv("SALR_CPU_ISA", "auto")
    assert salr.cpu_isa() == salr.available_cpu_isas()[-1]


def test_reference_fallback_serves_when_native_is_missing(monkeypatch):
    dense = random_sparse(20, 30, 0.5, torch.float32, make_generator("fallback"))
    x = torch.randn(4, 30, requires_grad=True)
    native = ops.bitmap_encode(dense)
    monkeypatch.setattr(ops.wrappers, "native_available", lambda: False)
    encoded = ops.bitmap_encode(dense)
    for got, want in zip(encoded, native):
        assert torch.equal(got, want)
    y = ops.sparse_lowrank_gemm(x, *encoded, 20, 30)
    torch.testing.assert_close(y, x @ dense.T)
    y.sum().backward()  # the reference path is plain PyTorch: autograd works too
    torch.testing.assert_close(x.grad, torch.ones(4, 20) @ dense)


def test_ops_library_is_built_with_openmp():
    # at::parallel_for is inlined into our code; built without OpenMP flags it silently runs every
    # op on one thread (this happened once). The library must import the GOMP runtime.
    import glob
    import os

    (library,) = glob.glob(os.path.join(os.path.dirname(salr.__file__), "lib", "libsalr_ops*.so"))
    with open(library, "rb") as f:
        assert b"GOMP_parallel" in f.read()

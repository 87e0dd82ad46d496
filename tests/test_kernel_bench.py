"""scripts/kernel_bench.sh builds and runs (it once stopped linking unnoticed): every dtype on a small
ragged weight, each SIMD contender's output checked against the scalar kernels by the harness itself,
and a dtype it cannot bench refused with a message."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("g++") is None or os.uname().machine != "x86_64",
                                reason="kernel_bench.sh needs g++ on x86_64")


@pytest.fixture(scope="module")
def bench_binary(tmp_path_factory):
    """Built once by the script (which also runs it once); the cases then call the binary."""
    out = tmp_path_factory.mktemp("kernel_bench")
    env = {**os.environ, "KERNEL_BENCH_DIR": str(out), "KERNEL_BENCH_MB": "1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "kernel_bench.sh"), "64", "64", "0.5", "bf16"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out / "kernel_bench"


def run_bench(binary, *args):
    return subprocess.run([str(binary), *args], env={**os.environ, "KERNEL_BENCH_MB": "1"}, capture_output=True,
                          text=True, timeout=300)


def test_every_dtype_runs_and_agrees_with_scalar(bench_binary):
    for dtype, m in [("bf16", "1"), ("fp16", "3"), ("fp32", "1"), ("int8", "1"), ("int8", "5")]:
        done = run_bench(bench_binary, "83", "203", "0.6", dtype, m)
        assert done.returncode == 0, done.stderr
        assert "differ" not in done.stdout, done.stdout
        rows = [line for line in done.stdout.splitlines() if re.match(r"^avx(2|512) ", line)]
        assert rows, done.stdout  # this CPU runs at least the AVX2 contender
        for line in rows:
            assert f"83x203 60% {dtype} m={m}:" in line and "ns per 8x8 tile" in line, line


def test_unknown_dtype_is_refused(bench_binary):
    done = run_bench(bench_binary, "64", "64", "0.5", "int4")
    assert done.returncode == 2
    assert "kernel_bench: dtype must be bf16, fp16, fp32 or int8, got 'int4'" in done.stderr

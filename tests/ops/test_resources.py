"""Resources and robustness of the ops over many calls: resident memory stays flat, several Python
threads may call them at once, and a call that fails leaves the library working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import salr
from salr import ops
from conftest import make_generator, random_sparse

pytestmark = pytest.mark.skipif(not salr.native_available(), reason=salr.native_error() or "")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_resident_memory_is_flat_over_repeated_calls():
    """bench/rss_soak.py (10,000 calls per op for RESULTS.md) at 1,000 calls per op, in a fresh
    process: a leaked 1 KB per call would add ~1 MB."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the salr this test imports (installed, or on PYTHONPATH)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "rss_soak.py"), "--calls", "1000", "--warmup", "100",
                           "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == 8
    grown = {r["op"]: round(r["growth_mb"], 2) for r in rows if r["growth_mb"] > 1.5}
    assert not grown, f"resident memory grew over 1,000 calls (MB): {grown}"


def weight_and_inputs(dtype, seed):
    dense = random_sparse(45, 150, 0.4, dtype, make_generator("threads", seed, dtype))
    gen = make_generator("threads-x", seed)
    x = torch.randn(5, 150, generator=gen).to(dtype)
    a, b = torch.randn(8, 150, generator=gen).to(dtype), torch.randn(45, 8, generator=gen).to(dtype)
    x_large = torch.randn(70, 150, generator=gen).to(dtype)
    dy = torch.randn(5, 45, generator=gen).to(dtype)
    return dense, x, a, b, x_large, dy


def run_all(dense, x, a, b, x_large, dy):
    """Every op once (both gemm paths, and one call that must fail); returns the outputs."""
    bitmap, values, offsets = ops.bitmap_encode(dense)
    n, k = dense.shape
    bad = offsets.clone()
    bad[2] += 1
    with pytest.raises(RuntimeError, match="inconsistent"):
        ops.sparse_gemm_transposed(dy, bitmap, values, bad, n, k)
    return [bitmap, values, offsets, ops.bitmap_decode(bitmap, values, offsets, n, k),
            ops.sparse_lowrank_gemm(x, bitmap, values, offsets, n, k, a, b),
            ops.sparse_lowrank_gemm(x_large, bitmap, values, offsets, n, k),
            ops.sparse_gemm_transposed(dy, bitmap, values, offsets, n, k),
            ops.sampled_gemm(dy, x, bitmap, values, offsets, n, k)]


def test_ops_from_several_threads_match_a_single_thread_run(isa):
    """Six Python threads, each with its own weights and dtype, call every op 15 times at once; each
    result must be bit-identical to the same call made alone (the kernels are deterministic)."""
    cases = [weight_and_inputs(dtype, seed) for seed in range(2) for dtype in (torch.float32, torch.bfloat16,
                                                                               torch.float16)]
    expected = [run_all(*case) for case in cases]
    errors: list[str] = []
    barrier = threading.Barrier(len(cases))

    def worker(i):
        barrier.wait()
        for repeat in range(15):
            try:
                got = run_all(*cases[i])
            except BaseException as exc:  # noqa: BLE001  (reported below)
                errors.append(f"thread {i}, repeat {repeat}: {type(exc).__name__}: {exc}")
                return
            for j, (g, e) in enumerate(zip(got, expected[i])):
                if not torch.equal(g, e):
                    errors.append(f"thread {i}, repeat {repeat}: output {j} differs from the single-threaded run")
                    return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, "\n".join(errors)


def test_library_is_usable_after_every_kind_of_error(isa):
    """After each failed call (bad dtype, shape, inconsistent bitmap, bad ISA variable), the next
    good call returns the exact result of a call made before any error."""
    dense, x, a, b, _, dy = weight_and_inputs(torch.float32, 7)
    bitmap, values, offsets = ops.bitmap_encode(dense)
    n, k = dense.shape
    good = lambda: ops.sparse_lowrank_gemm(x, bitmap, values, offsets, n, k, a, b)  # noqa: E731
    before = good()
    reference = x.double() @ dense.double().T + (x.double() @ a.double().T) @ b.double().T
    torch.testing.assert_close(before.double(), reference, rtol=1e-4, atol=1e-4)
    flipped = bitmap.clone()
    flipped[0, 0] ^= 1
    failures = [
        lambda: ops.sparse_lowrank_gemm(x.half(), bitmap, values, offsets, n, k),
        lambda: ops.sparse_lowrank_gemm(x[:, :-1], bitmap, values, offsets, n, k),
        lambda: ops.sparse_lowrank_gemm(x, flipped, values, offsets, n, k),
        lambda: ops.bitmap_decode(flipped, values, offsets, n, k),
        lambda: ops.sampled_gemm(dy, x, flipped, values, offsets, n, k),
        lambda: ops.bitmap_encode(torch.zeros(3, 3, 3)),
    ]
    for fail in failures:
        with pytest.raises(RuntimeError, match=r"salr\."):
            fail()
        assert torch.equal(good(), before)
    os.environ["SALR_CPU_ISA"] = "no-such-isa"
    try:
        with pytest.raises(RuntimeError, match="SALR_CPU_ISA must be one of"):
            good()
    finally:
        os.environ["SALR_CPU_ISA"] = isa  # the isa fixture restores the original afterwards
    assert torch.equal(good(), before)

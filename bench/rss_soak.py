"""Resident memory under repeated calls: every salr op (and its backward, and a call that fails on a
malformed weight) called N times; RSS is read after a warm-up and at the end.

    OMP_NUM_THREADS=1 python bench/rss_soak.py --calls 10000        # the RESULTS.md numbers
    python bench/rss_soak.py --calls 1000 --json                     # what tests/test_resources.py runs

A leak of one small output per call (1 KB) would show as ~10 MB over 10,000 calls; the test allows
growth of a few MB (allocator noise: glibc keeps freed pages for reuse, so RSS moves in steps).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import salr
from salr import ops

ROWS, COLS, RANK = 256, 320, 16


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; the peak from getrusage elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def workloads(dtype: torch.dtype = torch.bfloat16) -> dict:
    """name -> a zero-argument call; each allocates and drops its outputs like a training step."""
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(ROWS, COLS, generator=gen)
    dense[torch.rand(ROWS, COLS, generator=gen) < 0.5] = 0
    dense = dense.to(dtype)
    bitmap, values, offsets = ops.bitmap_encode(dense)
    x_small = torch.randn(4, COLS, generator=gen).to(dtype)
    x_large = torch.randn(96, COLS, generator=gen).to(dtype)  # above the crossover: decode + dense GEMM
    a = torch.randn(RANK, COLS, generator=gen).to(dtype)
    b = torch.randn(ROWS, RANK, generator=gen).to(dtype)
    bias = torch.randn(ROWS, generator=gen).to(dtype)
    dy = torch.randn(4, ROWS, generator=gen).to(dtype)
    bad_offsets = offsets.clone()
    bad_offsets[1] += 1

    def backward():
        v = values.clone().requires_grad_(True)
        x = x_small.clone().requires_grad_(True)
        ops.sparse_lowrank_gemm(x, bitmap, v, offsets, ROWS, COLS, a, b, bias).sum().backward()

    def failing_call():
        try:
            ops.sparse_lowrank_gemm(x_small, bitmap, values, bad_offsets, ROWS, COLS)
        except RuntimeError:
            return
        raise AssertionError("the malformed weight was accepted")

    return {
        "bitmap_encode": lambda: ops.bitmap_encode(dense),
        "bitmap_decode": lambda: ops.bitmap_decode(bitmap, values, offsets, ROWS, COLS),
        "sparse_lowrank_gemm (M=4, adapter, bias)": lambda: ops.sparse_lowrank_gemm(
            x_small, bitmap, values, offsets, ROWS, COLS, a, b, bias),
        "sparse_lowrank_gemm (M=96, dense path)": lambda: ops.sparse_lowrank_gemm(
            x_large, bitmap, values, offsets, ROWS, COLS, a, b, bias),
        "sparse_gemm_transposed": lambda: ops.sparse_gemm_transposed(dy, bitmap, values, offsets, ROWS, COLS),
        "sampled_gemm": lambda: ops.sampled_gemm(dy, x_small, bitmap, values, offsets, ROWS, COLS),
        "forward + backward": backward,
        "malformed weight (raises)": failing_call,
    }


def soak(calls: int, warmup: int) -> list[dict]:
    rows = []
    for name, call in workloads().items():
        for _ in range(warmup):
            call()
        before = rss_bytes()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        rows.append({"op": name, "calls": calls, "rss_after_warmup_mb": before / 2**20,
                     "growth_mb": (rss_bytes() - before) / 2**20,
                     "us_per_call": (time.perf_counter() - start) / calls * 1e6})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10_000, help="calls per op after the warm-up")
    parser.add_argument("--warmup", type=int, default=200, help="calls per op before RSS is read")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = parser.parse_args()
    if args.calls < 1 or args.warmup < 0:
        parser.error("--calls must be >= 1 and --warmup >= 0")
    if not salr.native_available():
        parser.error(salr.native_error())
    rows = soak(args.calls, args.warmup)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"torch {torch.__version__}, salr ISA {salr.cpu_isa()}, {torch.get_num_threads()} threads, "
          f"[{ROWS}, {COLS}] bf16 50%, rank {RANK}")
    print(f"{'op':45s} {'calls':>7s} {'RSS after warm-up':>18s} {'growth':>10s} {'us/call':>9s}")
    for r in rows:
        print(f"{r['op']:45s} {r['calls']:7d} {r['rss_after_warmup_mb']:15.1f} MB {r['growth_mb']:7.2f} MB "
              f"{r['us_per_call']:9.1f}")


if __name__ == "__main__":
    main()

"""GPU benchmark of the 2:4 path of salr.sparse_lowrank_gemm (SALR_CUDA_SPARSE24=1: mma.sp on the
re-laid weight, issue 17) against cuBLAS bf16 F.linear, the unstructured salr path on the same
weight, and torch's to_sparse_semi_structured (cuSPARSELt / CUTLASS) where this torch and GPU have it.

Method as bench/bench_cuda.py (whose timers it uses): CUDA-event timing of calls replayed from a
CUDA graph, rotating over enough weight copies to exceed 2x L2, median of the repeats, every path on
the same shapes in the same run. Every weight copy is run once before timing, so the one-time 2:4
detection and re-layout (cached per weight) is outside the timed calls, as in inference.

  python bench/bench_cuda_24.py --out OUTDIR            # 11008x4096, 4096x4096; M in {1, 16, 128, 2048}
  python bench/bench_cuda_24.py --quick --out OUTDIR    # 11008x4096; M in {1, 16}
  python bench/bench_cuda_24.py --dry-run               # the script on the CPU, tiny shapes, no GPU
Goals (issue 17) vs cuBLAS bf16: >= 1.7x at M <= 16, >= 1.3x at M = 128, >= 1.0x at M = 2048.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import salr
from salr import ops
from salr.cli.bench import median_seconds
from bench_cuda import copies_for, graph_time_per_call, time_per_call

SHAPES = [(11008, 4096), (4096, 4096)]
MS = [1, 16, 128, 2048]
GOALS = {1: 1.7, 16: 1.7, 128: 1.3, 2048: 1.0}
DEVICE = "cuda"  # --dry-run: "cpu" (wall-clock timing, no graphs, tiny shapes)


def random_2to4(rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Exactly 2 nonzeros in every aligned 4-column chunk (what `salr prune --pattern 2:4` gives)."""
    scores = torch.rand(rows, cols // 4, 4, generator=gen, device=DEVICE)
    keep = scores.argsort(-1).argsort(-1) < 2
    dense = torch.randn(rows, cols, generator=gen, device=DEVICE)
    return (dense * keep.reshape(rows, cols)).to(dtype)


class Case:
    def __init__(self, rows: int, cols: int, l2_bytes: int, gen):
        dense = random_2to4(rows, cols, torch.bfloat16, gen)
        self.shape = (rows, cols)
        bitmap, values, offsets = ops.bitmap_encode(dense)
        real = bitmap.numel() * 8 + values.numel() * 2 + offsets.numel() * 4
        self.sparse = [(bitmap.clone(), values.clone(), offsets.clone()) for _ in range(copies_for(2 * real, l2_bytes))]
        self.dense = [dense.clone() for _ in range(copies_for(dense.numel() * 2, l2_bytes))]
        self.semi = None
        self.semi_error = "CPU dry run"
        try:
            if DEVICE == "cpu":
                raise RuntimeError("CPU dry run")
            from torch.sparse import to_sparse_semi_structured
            self.semi = [to_sparse_semi_structured(d) for d in self.dense]
        except Exception as e:  # noqa: BLE001 - unsupported GPU / torch build / shape: the column reads n/a
            self.semi_error = f"{type(e).__name__}: {e}"[:80]
        self.bias = torch.randn(rows, generator=gen, device=DEVICE).to(torch.bfloat16)

    def salr(self, x, i, sparse24: bool):
        os.environ["SALR_CUDA_SPARSE24"] = "1" if sparse24 else "0"
        bitmap, values, offsets = self.sparse[i % len(self.sparse)]
        return ops.sparse_lowrank_gemm(x, bitmap, values, offsets, *self.shape, None, None, self.bias)

    def linear(self, x, i):
        return F.linear(x, self.dense[i % len(self.dense)], self.bias)

    def semi_linear(self, x, i):
        return F.linear(x, self.semi[i % len(self.semi)], self.bias)


def timed(fn, calls, repeats):
    """Graph time; eager time when the path cannot be captured (marked with *); wall clock on the CPU."""
    if DEVICE == "cpu":
        return median_seconds(fn, calls, repeats) * 1e6, ""
    try:
        return graph_time_per_call(fn, calls, repeats) * 1e6, ""
    except Exception:  # noqa: BLE001
        torch.cuda.synchronize()
        return time_per_call(fn, calls, repeats) * 1e6, "*"


def bench(case: Case, m: int, repeats: int, gen) -> str:
    rows, cols = case.shape
    x = torch.randn(m, cols, generator=gen, device=DEVICE).to(torch.bfloat16)
    for i in range(len(case.sparse)):  # detection + re-layout of every copy, outside the timing
        case.salr(x, i, sparse24=True)
    want = case.linear(x, 0).float()
    got = case.salr(x, 0, sparse24=True).float()
    rel_err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    calls = max(len(case.sparse), len(case.dense)) * 4
    dense_us, _ = timed(lambda i: case.linear(x, i), calls, repeats)
    s24_us, s24_mark = timed(lambda i: case.salr(x, i, sparse24=True), calls, repeats)
    unstructured_us, un_mark = timed(lambda i: case.salr(x, i, sparse24=False), calls, repeats)
    semi = "n/a"
    if case.semi is not None:
        try:
            semi_us, mark = timed(lambda i: case.semi_linear(x, i), calls, repeats)
            semi = f"{semi_us:.1f}{mark} ({dense_us / semi_us:.2f}×)"
        except Exception as e:  # noqa: BLE001
            semi = f"n/a ({type(e).__name__})"
    goal = GOALS.get(m, 1.0)
    speedup = dense_us / s24_us
    return (f"| {rows}x{cols} | {m} | {dense_us:.1f} | {s24_us:.1f}{s24_mark} | **{speedup:.2f}×** | {goal:.1f}× "
            f"{'met' if speedup >= goal else 'missed'} | "
            f"{unstructured_us:.1f}{un_mark} ({dense_us / unstructured_us:.2f}×) | "
            f"{semi} | {rel_err:.1e} |")


HEADER = ("| shape N×K | M | cuBLAS bf16 µs | salr 2:4 µs | speedup | goal | salr unstructured µs | "
          "torch semi-structured µs | max rel err |\n|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="11008x4096, M in {1, 16}")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", help="write the markdown table to OUT/bench_cuda_24.md")
    parser.add_argument("--dry-run", action="store_true",
                        help="run everything on the CPU with tiny shapes (checks the script, not the speed)")
    args = parser.parse_args(argv)
    global DEVICE
    if args.dry_run:
        DEVICE = "cpu"
        name, l2, repeats = "CPU dry run (timings meaningless)", 1 << 16, 2
        shapes, ms = [(40, 136), (24, 72)], [1, 17]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_cuda_24: no CUDA device (--dry-run runs the script on the CPU)")
        if not (salr.native_available()
                and torch._C._dispatch_has_kernel_for_dispatch_key("salr::sparse_lowrank_gemm", "CUDA")):
            why = salr.native_error() or "CPU-only build"
            raise SystemExit(f"bench_cuda_24: salr has no CUDA kernels here ({why})")
        props = torch.cuda.get_device_properties(0)
        name = f"{props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size / 2**20:.0f} MiB"
        l2, repeats = props.L2_cache_size, args.repeats
        shapes, ms = ([(11008, 4096)], [1, 16]) if args.quick else (SHAPES, MS)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    machine = f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; * = eager (not capturable)"
    print(machine, flush=True)
    print(HEADER, flush=True)
    lines = HEADER.splitlines()
    previous = os.environ.get("SALR_CUDA_SPARSE24")
    try:
        for rows, cols in shapes:
            case = Case(rows, cols, l2, gen)
            for m in ms:
                line = bench(case, m, repeats, gen)
                print(line, flush=True)
                lines.append(line)
            del case
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
    finally:
        if previous is None:
            os.environ.pop("SALR_CUDA_SPARSE24", None)
        else:
            os.environ["SALR_CUDA_SPARSE24"] = previous
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_cuda_24.md"), "w", encoding="utf-8") as f:
            f.write(f"Machine: {machine}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

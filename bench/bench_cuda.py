"""GPU benchmark of salr.sparse_lowrank_gemm (CUDA) against cuBLAS dense F.linear, in one run.

Method: CUDA-event timing, both of plain eager calls and of the same calls replayed from a CUDA graph
(the kernels' own time, without the Python / dispatcher launch overhead); every case rotates over enough copies of its weight that the copies
together exceed 2x the L2 cache (each call streams its weight from HBM); median of the repeats;
dense F.linear timed the same way on the same shapes in the same run. GB/s counts the compressed
bytes of the BM8x8 model, 2(1-s) + 0.125 bytes per weight in bf16 (1.125 at 50%), so the
"byte limit" column (dense bytes / compressed bytes) is the best speedup a memory-bound kernel can
reach; "% of copy" compares the achieved GB/s with a device-to-device copy measured here.

  python bench/bench_cuda.py --output bench-cuda.md            # LLaMA shapes x M x sparsity, bf16
  python bench/bench_cuda.py --quick --output bench-cuda.md    # 11008x4096, M in {1, 16, 64}
  python bench/bench_cuda.py --crossover                       # kernel vs decode+cuBLAS over M
  python bench/bench_cuda.py --splits                          # split-K sweep of the mma kernel
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

import salr
from salr import ops

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
MS = [1, 4, 16, 64, 128]
SPARSITIES = [0.5, 0.7, 0.9]
RANK = 32


def model_bytes_per_weight(sparsity: float, element_bytes: int = 2) -> float:
    return element_bytes * (1 - sparsity) + 0.125


def time_per_call(fn, calls: int, repeats: int) -> float:
    """Median seconds per call of fn(i) over `repeats` timed loops of `calls` calls each."""
    for i in range(min(calls, 3)):
        fn(i)
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fn(i)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(samples)


def graph_time_per_call(fn, calls: int, repeats: int) -> float:
    """Like time_per_call, but the `calls` calls are captured once in a CUDA graph and replayed:
    the kernels' own time, without Python / dispatcher launch overhead (how LLM decoding runs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(min(calls, 3)):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(samples)


def copy_gbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written), the practical HBM ceiling."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_per_call(lambda i: dst.copy_(src), 5, 5)
    return 2 * src.numel() / seconds / 1e9


def copies_for(bytes_each: int, l2_bytes: int) -> int:
    return max(2, math.ceil(2 * l2_bytes / max(1, bytes_each)) + 1)


class Case:
    """One weight shape and sparsity: rotated dense and encoded copies, adapters, bias."""

    def __init__(self, rows: int, cols: int, sparsity: float, dtype: torch.dtype, l2_bytes: int, gen):
        dense = torch.randn(rows, cols, generator=gen, device="cuda").to(dtype)
        keep = torch.rand(rows, cols, generator=gen, device="cuda") >= sparsity
        dense = dense * keep
        self.shape, self.sparsity, self.dtype = (rows, cols), sparsity, dtype
        bitmap, values, offsets = ops.bitmap_encode(dense)
        self.real_bytes = bitmap.numel() * 8 + values.numel() * values.element_size() + offsets.numel() * 4
        n_sparse = copies_for(self.real_bytes, l2_bytes)
        self.sparse = [(bitmap.clone(), values.clone(), offsets.clone()) for _ in range(n_sparse)]
        self.dense = [dense.clone() for _ in range(copies_for(dense.numel() * dense.element_size(), l2_bytes))]
        self.a = torch.randn(RANK, cols, generator=gen, device="cuda").to(dtype) / cols**0.5
        self.b = torch.randn(rows, RANK, generator=gen, device="cuda").to(dtype) / RANK
        self.bias = torch.randn(rows, generator=gen, device="cuda").to(dtype)

    def salr(self, x, i, adapters=False):
        bitmap, values, offsets = self.sparse[i % len(self.sparse)]
        a, b = (self.a, self.b) if adapters else (None, None)
        return ops.sparse_lowrank_gemm(x, bitmap, values, offsets, *self.shape, a, b, self.bias)

    def linear(self, x, i):
        return F.linear(x, self.dense[i % len(self.dense)], self.bias)


def bench_case(case: Case, m: int, repeats: int, gen, copy: float) -> dict:
    rows, cols = case.shape
    x = torch.randn(m, cols, generator=gen, device="cuda").to(case.dtype)
    calls = max(len(case.sparse), len(case.dense)) * 4
    # Sanity: the timed kernel computes the product (relative to the output's scale).
    got, want = case.salr(x, 0).float(), case.linear(x, 0).float()
    rel_err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    dense_s = time_per_call(lambda i: case.linear(x, i), calls, repeats)
    salr_s = time_per_call(lambda i: case.salr(x, i), calls, repeats)
    dense_g = graph_time_per_call(lambda i: case.linear(x, i), calls, repeats)
    salr_g = graph_time_per_call(lambda i: case.salr(x, i), calls, repeats)
    lora_g = graph_time_per_call(lambda i: case.salr(x, i, adapters=True), calls, repeats)
    model = rows * cols * model_bytes_per_weight(case.sparsity)
    gbps = model / salr_g / 1e9
    return {
        "shape": f"{rows}x{cols}", "sparsity": case.sparsity, "m": m, "dense_us": dense_s * 1e6,
        "salr_us": salr_s * 1e6, "dense_g_us": dense_g * 1e6, "salr_g_us": salr_g * 1e6, "lora_g_us": lora_g * 1e6,
        "speedup": dense_s / salr_s, "speedup_g": dense_g / salr_g,
        "byte_limit": 2 / model_bytes_per_weight(case.sparsity), "gbps": gbps, "pct_copy": 100 * gbps / copy,
        "dense_gbps": rows * cols * 2 / dense_g / 1e9, "rel_err": rel_err,
        "real_bpw": case.real_bytes / (rows * cols), "copies": len(case.sparse),
    }


HEADER = ("| shape N×K | sparsity | M | dense µs | salr µs | speedup | dense µs (graph) | salr µs (graph) | "
          "speedup (graph) | byte limit | salr + LoRA r=32 µs (graph) | salr GB/s (model) | % of copy | "
          "dense GB/s | bytes/weight | max rel err |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| {r['shape']} | {r['sparsity']:.0%} | {r['m']} | {r['dense_us']:.1f} | {r['salr_us']:.1f} | "
            f"{r['speedup']:.2f}× | {r['dense_g_us']:.1f} | {r['salr_g_us']:.1f} | **{r['speedup_g']:.2f}×** | "
            f"{r['byte_limit']:.2f}× | {r['lora_g_us']:.1f} | {r['gbps']:.0f} | {r['pct_copy']:.0f}% | "
            f"{r['dense_gbps']:.0f} | {r['real_bpw']:.3f} | {r['rel_err']:.1e} |")


def split_sweep(l2_bytes: int, repeats: int, gen) -> list[str]:
    """mma-kernel time (CUDA graph) over forced split-K counts (SALR_CUDA_SPLIT_K)."""
    lines = ["| shape | sparsity | M | split-K | salr µs (graph) |", "|---|---|---|---|---|"]
    for rows, cols in [(11008, 4096), (4096, 4096)]:
        case = Case(rows, cols, 0.5, torch.bfloat16, l2_bytes, gen)
        calls = len(case.sparse) * 4
        for m in [1, 16]:
            x = torch.randn(m, cols, generator=gen, device="cuda").to(torch.bfloat16)
            for splits in [0, 1, 2, 4, 8, 16, 32]:
                if splits:
                    os.environ["SALR_CUDA_SPLIT_K"] = str(splits)
                t = graph_time_per_call(lambda i: case.salr(x, i), calls, repeats)
                os.environ.pop("SALR_CUDA_SPLIT_K", None)
                line = f"| {rows}x{cols} | 50% | {m} | {splits or 'default'} | {t * 1e6:.1f} |"
                print(line, flush=True)
                lines.append(line)
    return lines


def crossover(l2_bytes: int, repeats: int, gen) -> list[str]:
    """Kernel path vs decode + cuBLAS path over M (forced through SALR_CUDA_DENSE_CROSSOVER)."""
    lines = ["| shape | sparsity | M | mma kernel µs (graph) | decode + cuBLAS µs (graph) | cuBLAS dense µs (graph) | faster path |",
             "|---|---|---|---|---|---|---|"]
    for rows, cols in [(11008, 4096), (4096, 4096)]:
        case = Case(rows, cols, 0.5, torch.bfloat16, l2_bytes, gen)
        calls = max(len(case.sparse), len(case.dense)) * 4
        for m in [8, 16, 32, 48, 64, 96, 128, 256]:
            x = torch.randn(m, cols, generator=gen, device="cuda").to(torch.bfloat16)
            times = {}
            for name, forced in [("kernel", str(1 << 30)), ("dense", "1")]:
                os.environ["SALR_CUDA_DENSE_CROSSOVER"] = forced
                times[name] = graph_time_per_call(lambda i: case.salr(x, i), calls, repeats)
            os.environ.pop("SALR_CUDA_DENSE_CROSSOVER")
            dense = graph_time_per_call(lambda i: case.linear(x, i), calls, repeats)
            best = "kernel" if times["kernel"] <= times["dense"] else "decode + cuBLAS"
            line = (f"| {rows}x{cols} | 50% | {m} | {times['kernel'] * 1e6:.1f} | {times['dense'] * 1e6:.1f} | "
                    f"{dense * 1e6:.1f} | {best} |")
            print(line, flush=True)
            lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="11008x4096, M in {1, 16, 64}, 50%% and 70%%")
    parser.add_argument("--crossover", action="store_true", help="time both GEMM paths over M instead")
    parser.add_argument("--splits", action="store_true", help="sweep the split-K count instead")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--output", help="write the markdown table here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda: no CUDA device")
    if not (salr.native_available()
            and torch._C._dispatch_has_kernel_for_dispatch_key("salr::sparse_lowrank_gemm", "CUDA")):
        raise SystemExit(f"bench_cuda: salr has no CUDA kernels here ({salr.native_error() or 'CPU-only build'})")
    props = torch.cuda.get_device_properties(0)
    l2 = props.L2_cache_size
    copy = copy_gbps()
    gen = torch.Generator(device="cuda").manual_seed(0)
    machine = (f"{props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, torch {torch.__version__}, "
               f"device copy {copy:.0f} GB/s, {time.strftime('%Y-%m-%d')}")
    print(machine, flush=True)
    if args.crossover:
        lines = crossover(l2, args.repeats, gen)
    elif args.splits:
        lines = split_sweep(l2, args.repeats, gen)
    else:
        shapes, ms, sparsities = ([(11008, 4096)], [1, 16, 64], [0.5, 0.7]) if args.quick else (SHAPES, MS, SPARSITIES)
        lines = HEADER.splitlines()
        print(HEADER, flush=True)
        for rows, cols in shapes:
            for sparsity in sparsities:
                case = Case(rows, cols, sparsity, torch.bfloat16, l2, gen)
                for m in ms:
                    line = format_row(bench_case(case, m, args.repeats, gen, copy))
                    print(line, flush=True)
                    lines.append(line)
                del case
                torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(f"Machine: {machine}\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""GPU benchmark of salr.sparse_lowrank_gemm (CUDA) against cuBLAS dense F.linear, in one run.

Method: CUDA-event timing of the calls replayed from a CUDA graph (the kernels' own time, without the
Python / dispatcher launch overhead; the plain eager time of the default path is kept too); every
case rotates over enough copies of its weight that the copies together exceed 2x the L2 cache (each
call streams its weight from HBM); median of the repeats; dense F.linear timed the same way on the
same shapes in the same run. Each row times every salr path, forced through environment variables:
the default dispatch (the A-operand mma kernel below the crossover, decode + cuBLAS above it), the
stream kernel (SALR_CUDA_KERNEL=stream, issue 16) and decode + cuBLAS (SALR_CUDA_DENSE_CROSSOVER=1).
GB/s counts the compressed bytes of the BM8x8 model, 2(1-s) + 0.125 bytes per weight in bf16 (1.125
at 50%), so the "byte limit" column (dense bytes / compressed bytes) is the best speedup a
memory-bound kernel can reach; "% of copy" compares the stream kernel's GB/s with a device-to-device
copy measured here.

  python bench/bench_cuda.py --out OUTDIR          # 3 LLaMA shapes x 50/70/90% x M in {1..128}, bf16
  python bench/bench_cuda.py --quick --out OUTDIR  # 11008x4096, M in {1, 16, 64}, 50% and 70%
  python bench/bench_cuda.py --crossover           # kernels vs decode+cuBLAS over M
  python bench/bench_cuda.py --splits              # split-K sweep of both kernels
  python bench/bench_cuda.py --dry-run             # the whole script on the CPU, tiny shapes, no GPU
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
MS = [1, 4, 16, 32, 64, 128]
SPARSITIES = [0.5, 0.7, 0.9]
RANK = 32


def model_bytes_per_weight(sparsity: float, element_bytes: int = 2) -> float:
    return element_bytes * (1 - sparsity) + 0.125


DEVICE = "cuda"  # --dry-run: "cpu" (wall-clock timing, no graphs, tiny shapes)

# The salr paths a row times, each forced through the environment (read by the op at call time).
PATHS = {
    "default": {"SALR_CUDA_KERNEL": "mma"},
    "stream": {"SALR_CUDA_KERNEL": "stream"},
    "decode": {"SALR_CUDA_KERNEL": "mma", "SALR_CUDA_DENSE_CROSSOVER": "1"},
}


class forced_path:
    """Sets a path's environment variables (a PATHS name or a dict) for a `with` block."""

    def __init__(self, path):
        self.env = PATHS[path] if isinstance(path, str) else path

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def time_per_call(fn, calls: int, repeats: int) -> float:
    """Median seconds per call of fn(i) over `repeats` timed loops of `calls` calls each."""
    for i in range(min(calls, 3)):
        fn(i)
    synchronize()
    samples = []
    for _ in range(repeats):
        if DEVICE != "cuda":
            t0 = time.perf_counter()
            for i in range(calls):
                fn(i)
            samples.append((time.perf_counter() - t0) / calls)
            continue
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
    the kernels' own time, without Python / dispatcher launch overhead (how LLM decoding runs).
    Every fn(i) runs once before the capture (the stream kernel's re-layout is built then)."""
    if DEVICE != "cuda":
        return time_per_call(fn, calls, repeats)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(calls):
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
    src = torch.empty(1 << (30 if DEVICE == "cuda" else 24), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    seconds = time_per_call(lambda i: dst.copy_(src), 5, 5)
    return 2 * src.numel() / seconds / 1e9


def copies_for(bytes_each: int, l2_bytes: int) -> int:
    return max(2, math.ceil(2 * l2_bytes / max(1, bytes_each)) + 1)


class Case:
    """One weight shape and sparsity: rotated dense and encoded copies, adapters, bias."""

    def __init__(self, rows: int, cols: int, sparsity: float, dtype: torch.dtype, l2_bytes: int, gen):
        dense = torch.randn(rows, cols, generator=gen, device=DEVICE).to(dtype)
        keep = torch.rand(rows, cols, generator=gen, device=DEVICE) >= sparsity
        dense = dense * keep
        self.shape, self.sparsity, self.dtype = (rows, cols), sparsity, dtype
        bitmap, values, offsets = ops.bitmap_encode(dense)
        self.real_bytes = bitmap.numel() * 8 + values.numel() * values.element_size() + offsets.numel() * 4
        n_sparse = copies_for(self.real_bytes, l2_bytes)
        self.sparse = [(bitmap.clone(), values.clone(), offsets.clone()) for _ in range(n_sparse)]
        self.dense = [dense.clone() for _ in range(copies_for(dense.numel() * dense.element_size(), l2_bytes))]
        self.a = torch.randn(RANK, cols, generator=gen, device=DEVICE).to(dtype) / cols**0.5
        self.b = torch.randn(rows, RANK, generator=gen, device=DEVICE).to(dtype) / RANK
        self.bias = torch.randn(rows, generator=gen, device=DEVICE).to(dtype)

    def salr(self, x, i, adapters=False):
        bitmap, values, offsets = self.sparse[i % len(self.sparse)]
        a, b = (self.a, self.b) if adapters else (None, None)
        return ops.sparse_lowrank_gemm(x, bitmap, values, offsets, *self.shape, a, b, self.bias)

    def linear(self, x, i):
        return F.linear(x, self.dense[i % len(self.dense)], self.bias)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()


def bench_case(case: Case, m: int, repeats: int, gen, copy: float) -> dict:
    rows, cols = case.shape
    x = torch.randn(m, cols, generator=gen, device=DEVICE).to(case.dtype)
    calls = max(len(case.sparse), len(case.dense)) * 4
    want = case.linear(x, 0)
    row = {"shape": f"{rows}x{cols}", "sparsity": case.sparsity, "m": m,
           "dense_g_us": graph_time_per_call(lambda i: case.linear(x, i), calls, repeats) * 1e6}
    with forced_path("default"):
        row["default_us"] = time_per_call(lambda i: case.salr(x, i), calls, repeats) * 1e6
    for name in PATHS:
        with forced_path(name):
            row[f"{name}_err"] = relative_error(case.salr(x, 0), want)  # the timed path computes the product
            row[f"{name}_g_us"] = graph_time_per_call(lambda i: case.salr(x, i), calls, repeats) * 1e6
    with forced_path("stream"):
        row["lora_g_us"] = graph_time_per_call(lambda i: case.salr(x, i, adapters=True), calls, repeats) * 1e6
    model = rows * cols * model_bytes_per_weight(case.sparsity)
    row["gbps"] = model / (row["stream_g_us"] * 1e-6) / 1e9
    row["pct_copy"] = 100 * row["gbps"] / copy
    row["byte_limit"] = 2 / model_bytes_per_weight(case.sparsity)
    row["real_bpw"] = case.real_bytes / (rows * cols)
    return row


HEADER = ("| shape N×K | sparsity | M | cuBLAS µs | default µs (eager) | default µs | stream µs | decode+cuBLAS µs | "
          "**stream vs cuBLAS** | default vs cuBLAS | byte limit | stream + LoRA r=32 µs | stream GB/s (model) | "
          "% of copy | bytes/weight | max rel err (default / stream / decode) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| {r['shape']} | {r['sparsity']:.0%} | {r['m']} | {r['dense_g_us']:.1f} | {r['default_us']:.1f} | "
            f"{r['default_g_us']:.1f} | {r['stream_g_us']:.1f} | {r['decode_g_us']:.1f} | "
            f"**{r['dense_g_us'] / r['stream_g_us']:.2f}×** | {r['dense_g_us'] / r['default_g_us']:.2f}× | "
            f"{r['byte_limit']:.2f}× | {r['lora_g_us']:.1f} | {r['gbps']:.0f} | {r['pct_copy']:.0f}% | "
            f"{r['real_bpw']:.3f} | {r['default_err']:.1e} / {r['stream_err']:.1e} / {r['decode_err']:.1e} |")


def split_sweep(shapes, l2_bytes: int, repeats: int, gen) -> list[str]:
    """Kernel time (CUDA graph) over forced split-K counts (SALR_CUDA_SPLIT_K), both kernels."""
    lines = ["| shape | sparsity | M | split-K | mma µs | stream µs |", "|---|---|---|---|---|---|"]
    for rows, cols in shapes:
        case = Case(rows, cols, 0.5, torch.bfloat16, l2_bytes, gen)
        calls = len(case.sparse) * 4
        for m in [1, 16]:
            x = torch.randn(m, cols, generator=gen, device=DEVICE).to(torch.bfloat16)
            for splits in [0, 1, 2, 4, 8, 16, 32]:
                if splits:
                    os.environ["SALR_CUDA_SPLIT_K"] = str(splits)
                t = {}
                for name in ["default", "stream"]:
                    with forced_path(name):
                        t[name] = graph_time_per_call(lambda i: case.salr(x, i), calls, repeats)
                os.environ.pop("SALR_CUDA_SPLIT_K", None)
                line = (f"| {rows}x{cols} | 50% | {m} | {splits or 'default'} | {t['default'] * 1e6:.1f} | "
                        f"{t['stream'] * 1e6:.1f} |")
                print(line, flush=True)
                lines.append(line)
    return lines


def crossover(shapes, l2_bytes: int, repeats: int, gen) -> list[str]:
    """Both kernels vs the decode + cuBLAS path over M (each forced)."""
    lines = ["| shape | sparsity | M | mma kernel µs | stream kernel µs | decode + cuBLAS µs | cuBLAS dense µs | "
             "fastest salr path |", "|---|---|---|---|---|---|---|---|"]
    for rows, cols in shapes:
        case = Case(rows, cols, 0.5, torch.bfloat16, l2_bytes, gen)
        calls = max(len(case.sparse), len(case.dense)) * 4
        for m in [8, 16, 32, 48, 64, 96, 128]:
            x = torch.randn(m, cols, generator=gen, device=DEVICE).to(torch.bfloat16)
            times = {}
            for name, env in [("mma", {"SALR_CUDA_KERNEL": "mma", "SALR_CUDA_DENSE_CROSSOVER": str(1 << 30)}),
                              ("stream", PATHS["stream"]), ("decode", PATHS["decode"])]:
                with forced_path(env):
                    times[name] = graph_time_per_call(lambda i: case.salr(x, i), calls, repeats)
            dense = graph_time_per_call(lambda i: case.linear(x, i), calls, repeats)
            best = min(times, key=times.get)
            line = (f"| {rows}x{cols} | 50% | {m} | {times['mma'] * 1e6:.1f} | {times['stream'] * 1e6:.1f} | "
                    f"{times['decode'] * 1e6:.1f} | {dense * 1e6:.1f} | {best} |")
            print(line, flush=True)
            lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="11008x4096, M in {1, 16, 64}, 50%% and 70%%")
    parser.add_argument("--crossover", action="store_true", help="time the GEMM paths over M instead")
    parser.add_argument("--splits", action="store_true", help="sweep the split-K count instead")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", help="output folder: the table goes to OUT/bench_cuda[_mode].md")
    parser.add_argument("--output", help="write the markdown table to this file")
    parser.add_argument("--dry-run", action="store_true",
                        help="run everything on the CPU with tiny shapes (checks the script, not the speed)")
    args = parser.parse_args(argv)
    if args.dry_run:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("bench_cuda: no CUDA device (--dry-run runs the script on the CPU)")
    elif not (salr.native_available()
              and torch._C._dispatch_has_kernel_for_dispatch_key("salr::sparse_lowrank_gemm", "CUDA")):
        raise SystemExit(f"bench_cuda: salr has no CUDA kernels here ({salr.native_error() or 'CPU-only build'})")
    if args.dry_run:
        l2, repeats, name = 1 << 16, 2, "CPU dry run (timings meaningless)"
        shapes, ms, sparsities = [(40, 136), (24, 72)], [1, 17], [0.5]
    else:
        props = torch.cuda.get_device_properties(0)
        l2, repeats = props.L2_cache_size, args.repeats
        name = f"{props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB"
        shapes, ms, sparsities = ([(11008, 4096)], [1, 16, 64], [0.5, 0.7]) if args.quick else (SHAPES, MS, SPARSITIES)
    copy = copy_gbps()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    machine = f"{name}, torch {torch.__version__}, device copy {copy:.0f} GB/s, {time.strftime('%Y-%m-%d')}"
    print(machine, flush=True)
    sweep_shapes = shapes if args.dry_run else [(11008, 4096), (4096, 4096)]
    if args.crossover:
        mode, lines = "_crossover", crossover(sweep_shapes, l2, repeats, gen)
    elif args.splits:
        mode, lines = "_splits", split_sweep(sweep_shapes, l2, repeats, gen)
    else:
        mode, lines = "", HEADER.splitlines()
        print(HEADER, flush=True)
        for rows, cols in shapes:
            for sparsity in sparsities:
                case = Case(rows, cols, sparsity, torch.bfloat16, l2, gen)
                for m in ms:
                    line = format_row(bench_case(case, m, repeats, gen, copy))
                    print(line, flush=True)
                    lines.append(line)
                del case
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
    text = f"Machine: {machine}\n\n" + "\n".join(lines) + "\n"
    targets = [args.output] if args.output else []
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        targets.append(os.path.join(args.out, f"bench_cuda{mode}.md"))
    for target in targets:
        with open(target, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()

"""M = 1 decode GEMV against the memory roofline, on every CPU ISA path in one run (issue 20).

For each case (11008x4096 by default; 50% and 70%; bf16, fp16 and fp32) it times, medians over
alternating repeats of a rotation of layer copies larger than the caches (--working-set-gib):
  dense     F.linear(x, W) in torch, same dtype
  salr      sparse_lowrank_gemm on each ISA path (SALR_CPU_ISA=scalar|avx2|avx512, switched per call)
and prints the compressed bytes streamed per second as a percentage of the bulk read bandwidth,
measured in the same run as the median of a multithreaded torch float32 sum over a buffer of
--bulk-gib (the `bulk_read_gbps` of salr.cli.bench): a plain sequential read of DRAM.

  python bench/cpu_roofline.py                       # 11008x4096, M=1, 50/70%, bf16+fp32, avx2+avx512
  python bench/cpu_roofline.py --isa avx2 --dtype bf16 --sparsity 0.5
  python bench/cpu_roofline.py --m 16 128            # larger M (compute-bound; % of bulk is not the goal)
  python bench/cpu_roofline.py --transposed          # dx = dy·W (sparse_gemm_transposed) instead
  python bench/cpu_roofline.py --dtype int8          # int8 values + per-row fp32 scales, bf16 x (issue 21),
                                                     # against torch dense bf16; % of bulk counts int8 bytes
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from salr.cli.bench import Rotation, bulk_read_gbps, machine_line

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INT8 = "int8"  # int8 values with per-row scales; x, output and the dense contender in bf16


class Int8Copies:
    """Copies of one layer quantized to int8 values (round to nearest, per-row absmax scales;
    survivors that round to 0 kept as ±1 so the bitmap stays the mask), enough to exceed the working set."""

    def __init__(self, dense: torch.Tensor, working_set_bytes: int):
        w = dense.float()
        scales = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round(w / scales[:, None]).clamp(-127, 127)
        q = torch.where((q == 0) & (w != 0), torch.sign(w), q).to(torch.int8)
        bitmap, values, offsets = torch.ops.salr.bitmap_encode(q)
        self.compressed_bytes = sum(t.numel() * t.element_size() for t in (bitmap, values, offsets, scales))
        self.count = max(2, -(-working_set_bytes // self.compressed_bytes))
        self.weights = [(bitmap.clone(), values.clone(), offsets.clone(), scales.clone()) for _ in range(self.count)]
        self.rows, self.cols = dense.shape

    def linear(self, x: torch.Tensor, i: int) -> torch.Tensor:
        bitmap, values, offsets, scales = self.weights[i % self.count]
        return torch.ops.salr.sparse_lowrank_gemm(x, bitmap, values, offsets, self.rows, self.cols,
                                                  None, None, None, scales)

    def transposed(self, dy: torch.Tensor, i: int) -> torch.Tensor:
        bitmap, values, offsets, scales = self.weights[i % self.count]
        return torch.ops.salr.sparse_gemm_transposed(dy, bitmap, values, offsets, self.rows, self.cols, scales)


def alternating_medians(fns: dict, layers: int, repeats: int, clock=time.perf_counter) -> dict:
    """Median seconds per layer of each fn, the fns interleaved repeat by repeat (same machine state)."""
    samples = {name: [] for name in fns}
    for name, fn in fns.items():
        fn(0)  # warm-up: first touch, thread pool, ISA choice
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            for i in range(layers):
                fn(i)
            samples[name].append((clock() - start) / layers)
    return {name: statistics.median(s) for name, s in samples.items()}


def with_isa(isa: str, fn):
    def run(i):
        os.environ["SALR_CPU_ISA"] = isa
        return fn(i)
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[11008, 4096], metavar=("N", "K"))
    parser.add_argument("--m", type=int, nargs="+", default=[1])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--dtype", choices=[*DTYPES, INT8], nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--isa", nargs="+", default=["avx2", "avx512"])
    parser.add_argument("--working-set-gib", type=float, default=0.5)
    parser.add_argument("--bulk-gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time (use with --threads 1 on a machine shared with other jobs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--transposed", action="store_true", help="time sparse_gemm_transposed (dx = dy·W)")
    args = parser.parse_args(argv)
    isas = args.isa
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    bulk = bulk_read_gbps(args.bulk_gib, clock=clock)
    print(machine_line(bulk))
    print(f"bulk read: median of a torch.float32 sum over a {args.bulk_gib} GiB buffer; clock: {args.clock}")
    cols = ["shape", "dtype", "sparsity", "M", "dense ms"] + [f"{i} ms" for i in isas]
    cols += [f"{i} vs dense" for i in isas] + [f"{i} % of bulk" for i in isas]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    gen = torch.Generator().manual_seed(0)
    rows, k = args.shape
    for dname in args.dtype:
        for sparsity in args.sparsity:
            dtype = torch.bfloat16 if dname == INT8 else DTYPES[dname]
            rot = Rotation(rows, k, sparsity, dtype, int(args.working_set_gib * 2**30), gen)
            quantized = Int8Copies(rot.dense[0], int(args.working_set_gib * 2**30)) if dname == INT8 else None
            compressed_bytes = quantized.compressed_bytes if quantized else rot.compressed_bytes
            for m in args.m:
                if args.transposed:
                    dy = torch.randn(m, rows, generator=gen).to(dtype)
                    fns = {"dense": lambda i: dy @ rot.dense[i]}
                    for isa in isas:
                        fns[isa] = with_isa(isa, (lambda i: quantized.transposed(dy, i)) if quantized else
                                            lambda i: torch.ops.salr.sparse_gemm_transposed(
                            dy, rot.sparse[i].bitmap, rot.sparse[i].values, rot.sparse[i].offsets, rows, k))
                else:
                    x = torch.randn(m, k, generator=gen).to(dtype)
                    fns = {"dense": lambda i: F.linear(x, rot.dense[i])}
                    for isa in isas:
                        fns[isa] = with_isa(isa, (lambda i: quantized.linear(x, i)) if quantized else
                                            lambda i: rot.sparse[i].linear(x))
                t = alternating_medians(fns, rot.count, args.repeats, clock)
                os.environ.pop("SALR_CPU_ISA", None)
                cells = [f"{rows}x{k}", dname, f"{sparsity:.0%}", str(m), f"{t['dense'] * 1e3:.3f}"]
                cells += [f"{t[i] * 1e3:.3f}" for i in isas]
                cells += [f"{t['dense'] / t[i]:.2f}×" for i in isas]
                cells += [f"{compressed_bytes / t[i] / 1e9 / bulk:.0%}" for i in isas]
                print("| " + " | ".join(cells) + " |", flush=True)
            del rot, quantized


if __name__ == "__main__":
    main()

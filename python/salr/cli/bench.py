"""Benchmark salr.sparse_lowrank_gemm against dense torch in one run (convention 11).

For every (shape, dtype, sparsity, M) it times, as the median of repeats:
  dense        F.linear(x, W)                               (torch, same dtype)
  dense+lora   F.linear(x, W) + (x·Aᵀ)·Bᵀ                   (the unfused baseline, rank 32)
  sparse       salr sparse_lowrank_gemm, no adapter
  sparse+lora  salr sparse_lowrank_gemm with the concatenated r = 16 + 16 adapter fused
dtype int8 (issue 21): the BM8x8 weight holds int8 values with fp32 per-row scales (round-to-nearest
of the same random weight); x, the adapters and the dense baseline are bf16.
Each timed pass runs every layer of a rotation whose compressed weights exceed --working-set
(default 1 GiB) so the weights come from DRAM, not cache; the bulk read bandwidth of the machine is
measured in the same run and printed beside the compressed bytes streamed per second.

  python bench/bench_gemm.py                      # the full grid (40+ minutes on 2 cores)
  python bench/bench_gemm.py --quick              # LLaMA 11008x4096 only, M in {1, 16, 128}
  python bench/bench_gemm.py --crossover          # sweep M to place kDenseCrossoverRows
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import salr
from salr.ops.format import BitmapSparseWeight
from salr.prune.quantize import quantize_int8

LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SMOLLM2_SHAPES = [(576, 576), (1536, 576), (576, 1536)]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.bfloat16}  # int8: x and dense in bf16
ADAPTER_RANK = 32  # r = 16 + 16: the SVD residual adapter and the LoRA, concatenated


def median_seconds(fn, layers: int, repeats: int, clock=time.perf_counter) -> float:
    """Median over `repeats` of the time per layer of one pass over the whole rotation."""
    fn(0)  # warm-up (first-touch, thread pool)
    samples = []
    for _ in range(repeats):
        start = clock()
        for i in range(layers):
            fn(i)
        samples.append((clock() - start) / layers)
    return statistics.median(samples)


def bulk_read_gbps(gib: float = 2.0, repeats: int = 5, clock=time.perf_counter) -> float:
    """GB/s of a multithreaded streaming read (a float32 sum) of a buffer far larger than the caches."""
    buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    seconds = median_seconds(lambda _: buf.sum(), 1, repeats, clock)
    return buf.numel() * 4 / seconds / 1e9


def random_sparse_weight(rows: int, cols: int, sparsity: float, dtype: torch.dtype, gen: torch.Generator):
    dense = torch.randn(rows, cols, generator=gen)
    dense[torch.rand(rows, cols, generator=gen) < sparsity] = 0
    return dense.to(dtype)


class Rotation:
    """Copies of one layer (dense and BM8x8) in distinct memory, enough to exceed the working set."""

    def __init__(self, rows, cols, sparsity, dtype, working_set_bytes, gen, int8: bool = False):
        dense = random_sparse_weight(rows, cols, sparsity, dtype, gen)
        sparse = BitmapSparseWeight.from_dense(*quantize_int8(dense.float())) if int8 else BitmapSparseWeight.from_dense(dense)
        self.compressed_bytes = sparse.nbytes
        self.dense_bytes = dense.numel() * dense.element_size()
        self.count = max(2, -(-working_set_bytes // self.compressed_bytes))
        self.dense = [dense.clone() for _ in range(self.count)]
        self.sparse = [BitmapSparseWeight(sparse.bitmap.clone(), sparse.values.clone(), sparse.offsets.clone(),
                                          rows, cols, None if sparse.scales is None else sparse.scales.clone())
                       for _ in range(self.count)]
        self.a = (torch.randn(ADAPTER_RANK, cols, generator=gen) / cols**0.5).to(dtype)
        self.b = (torch.randn(rows, ADAPTER_RANK, generator=gen) / 8).to(dtype)


def bench_case(rot: Rotation, m: int, dtype, repeats: int, gen) -> dict:
    x = torch.randn(m, rot.sparse[0].cols, generator=gen).to(dtype)
    n = rot.count
    t_dense = median_seconds(lambda i: F.linear(x, rot.dense[i]), n, repeats)
    t_dense_lora = median_seconds(lambda i: F.linear(x, rot.dense[i]) + (x @ rot.a.T) @ rot.b.T, n, repeats)
    t_sparse = median_seconds(lambda i: rot.sparse[i].linear(x), n, repeats)
    t_sparse_lora = median_seconds(lambda i: rot.sparse[i].linear(x, rot.a, rot.b), n, repeats)
    check = rot.sparse[0].linear(x).float()
    reference = F.linear(x.float(), rot.sparse[0].to_dense(torch.float32))  # int8: the dequantized weight
    rel_err = ((check - reference).norm() / reference.norm().clamp_min(1e-30)).item()
    return {"dense": t_dense, "dense_lora": t_dense_lora, "sparse": t_sparse, "sparse_lora": t_sparse_lora,
            "rel_err": rel_err}


def run_grid(shapes, ms, sparsities, dtypes, working_set, repeats, bulk):
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    cases = [(s, d, sp) for d in dtypes for s in shapes for sp in sparsities]
    for (rows, cols), dname, sparsity in tqdm(cases, desc="rotations", unit="weight"):
        dtype = DTYPES[dname]
        rot = Rotation(rows, cols, sparsity, dtype, working_set, gen, int8=dname == "int8")
        for m in ms:
            r = bench_case(rot, m, dtype, repeats, gen)
            gbps = rot.compressed_bytes / r["sparse"] / 1e9
            rows_out.append({
                "shape": f"{rows}x{cols}", "dtype": dname, "sparsity": sparsity, "m": m,
                "dense_ms": r["dense"] * 1e3, "sparse_ms": r["sparse"] * 1e3,
                "speedup": r["dense"] / r["sparse"],
                "speedup_vs_dense_lora": r["dense_lora"] / r["sparse_lora"],
                "adapter_overhead": r["sparse_lora"] / r["sparse"] - 1,
                "gbps": gbps, "roofline": gbps / bulk,
                "dense_gbps": rot.dense_bytes / r["dense"] / 1e9,
                "layers": rot.count, "rel_err": r["rel_err"],
            })
            tqdm.write(format_row(rows_out[-1]))
        del rot
    return rows_out


HEADER = ("| shape N×K | dtype | sparsity | M | dense ms | salr ms | speedup | vs dense+LoRA (fused r=32) "
          "| adapter cost | salr GB/s | % of bulk read | dense GB/s | layers rotated |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    return (f"| {r['shape']} | {r['dtype']} | {r['sparsity']:.0%} | {r['m']} | {r['dense_ms']:.3f} | "
            f"{r['sparse_ms']:.3f} | **{r['speedup']:.2f}×** | {r['speedup_vs_dense_lora']:.2f}× | "
            f"{r['adapter_overhead']:+.1%} | {r['gbps']:.1f} | {r['roofline']:.0%} | {r['dense_gbps']:.1f} | "
            f"{r['layers']} |")


def crossover(working_set, repeats):
    """The sparse kernel and decode + dense GEMM, each forced, across M: where should the switch be?"""
    gen = torch.Generator().manual_seed(1)
    for dname in ("bf16", "fp32"):
        rot = Rotation(11008, 4096, 0.5, DTYPES[dname], working_set, gen)
        print(f"\n{dname} 11008x4096 50%: M | torch dense ms | salr kernel ms | salr decode+GEMM ms")
        for m in (8, 16, 24, 32, 48, 64, 96, 128):
            times = []
            for forced in ("1000000000", "1"):  # kernel always, then dense path always
                os.environ["SALR_CPU_DENSE_CROSSOVER"] = forced
                times.append(bench_case(rot, m, DTYPES[dname], repeats, gen))
            os.environ.pop("SALR_CPU_DENSE_CROSSOVER")
            print(f"{m:4d} | {times[0]['dense'] * 1e3:8.2f} | {times[0]['sparse'] * 1e3:8.2f} | "
                  f"{times[1]['sparse'] * 1e3:8.2f}")
        del rot


def machine_line(bulk: float) -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}, salr CPU path {salr.cpu_isa()}, bulk read {bulk:.1f} GB/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="11008x4096 only, M in {1, 16, 128}")
    parser.add_argument("--crossover", action="store_true", help="sweep M around the dense crossover")
    parser.add_argument("--shapes", choices=["llama", "smollm2", "all"], default="all")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4, 16, 64, 128])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    parser.add_argument("--dtype", choices=list(DTYPES), nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--working-set-gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", help="append the markdown table to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not salr.native_available():
        raise SystemExit(salr.native_error())
    working_set = int(args.working_set_gib * 2**30)
    if args.crossover:
        crossover(working_set, args.repeats)
        return
    shapes = {"llama": LLAMA_SHAPES, "smollm2": SMOLLM2_SHAPES, "all": LLAMA_SHAPES + SMOLLM2_SHAPES}[args.shapes]
    ms, sparsities = args.m, args.sparsity
    if args.quick:
        shapes, ms, sparsities = [(11008, 4096)], [1, 16, 128], [0.5, 0.7]
    bulk = bulk_read_gbps()
    machine = machine_line(bulk)
    print(machine)
    print(HEADER)
    results = run_grid(shapes, ms, sparsities, args.dtype, working_set, args.repeats, bulk)
    table = "\n".join([f"Machine: {machine}", "", HEADER, *map(format_row, results)])
    if args.output:
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(table + "\n")
    worst = max(r["rel_err"] for r in results)
    print(f"\nmax relative error of salr vs fp32 dense over all cases: {worst:.2e}")


if __name__ == "__main__":
    main()

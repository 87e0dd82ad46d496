"""SmolLM2-135M layer shapes at M = 1, on every CPU ISA path in one run (issue 20: small layers
without overhead): by default the weights cache-resident (one layer, called repeatedly); with
--working-set-mb, as decoding sees them: copies of each layer past the caches, called in rotation,
so every call streams its weights (and adapters) from DRAM.

Per (shape, dtype) the median µs per call, all variants interleaved repeat by repeat:
  dense          F.linear(x, W)
  dense+lora     F.linear(x, W) + F.linear(F.linear(x, A), B)      (the adapter as two dense GEMVs)
  salr           sparse_lowrank_gemm, 50% BM8x8, no adapter         (per ISA)
  salr+r80       sparse_lowrank_gemm with the r = 80 adapter fused  (per ISA)
  nn.Linear      the dense layer as a model calls it
  SALRLinear     the salr layer with the same r = 80 adapter, as a model calls it (per ISA)
The goal: salr+r80 below dense and SALRLinear below nn.Linear on every shape, dtype and ISA.
Everything runs under torch.no_grad(), as decoding does.

  python bench/cpu_small_layers.py
  python bench/cpu_small_layers.py --isa avx2 --dtype bf16 --threads 1 --clock cpu   # shared machine
  python bench/cpu_small_layers.py --working-set-mb 128   # streamed: the decode case
  python bench/cpu_small_layers.py --dtype int8   # int8 base (per-row scales), x/adapters/dense in bf16
  python bench/cpu_small_layers.py --dtype int8a  # int8 base and int8 adapters (adapter_scales), x in bf16
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from salr import BitmapSparseWeight, ops
from salr.methods.salr.layer import SALRLinear
from salr.cli.bench import random_sparse_weight
from salr.prune.quantize import quantize_adapter_int8, quantize_int8

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # q/o, k/v, gate/up, down
# int8: int8 base, bf16 rest; int8a: int8 base and int8 adapters (quantize_adapter_int8), bf16 x and dense
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "int8": torch.bfloat16, "int8a": torch.bfloat16}


def interleaved_medians(fns: dict, calls: int, repeats: int, clock=time.perf_counter, warmup: int = 10) -> dict:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            for _ in range(calls):
                fn()
            samples[name].append((clock() - start) / calls)
    return {name: statistics.median(s) for name, s in samples.items()}


def with_isa(isa, fn):
    def run():
        os.environ["SALR_CPU_ISA"] = isa
        return fn()
    return run


def layer_variants(rows: int, k: int, dname: str, rank: int, isas: list[str], gen: torch.Generator) -> dict:
    """One copy of the layer in every form the table times, as calls with no arguments."""
    dtype = DTYPES[dname]
    dense = random_sparse_weight(rows, k, 0.5, dtype, gen)
    q, scales = quantize_int8(dense) if dname.startswith("int8") else (dense, None)
    sparse = BitmapSparseWeight.from_dense(q, scales)
    a = (torch.randn(rank, k, generator=gen) / k**0.5).to(dtype)
    b = (torch.randn(rows, rank, generator=gen) / 8).to(dtype)
    x = torch.randn(1, k, generator=gen).to(dtype)
    linear = torch.nn.Linear(k, rows, bias=False, dtype=dtype)
    linear.weight.data.copy_(dense)
    layer = SALRLinear.from_weights(q, svd_a=a, svd_b=b, scales=scales, dtype=dtype).eval()
    adapter = {"adapter_a": a, "adapter_b": b}
    if dname == "int8a":
        layer.quantize_adapters()
        q_a, q_b, b_scales = quantize_adapter_int8(a, b)
        adapter = {"adapter_a": q_a, "adapter_b": q_b, "adapter_scales": b_scales}
    fns = {"dense": lambda: F.linear(x, dense),
           "dense+lora": lambda: F.linear(x, dense) + F.linear(F.linear(x, a), b),
           "nn.Linear": lambda: linear(x)}
    for isa in isas:
        fns[f"{isa} salr"] = with_isa(isa, lambda: sparse.linear(x))
        fns[f"{isa} salr+r"] = with_isa(isa, lambda: ops.sparse_lowrank_gemm(
            x, sparse.bitmap, sparse.values, sparse.offsets, rows, k, scales=scales, **adapter))
        fns[f"{isa} layer"] = with_isa(isa, lambda: layer(x))
    return fns


def rotating(copies: list[dict], name: str):
    """Calls `name` of each copy in turn: with copies past the caches, every call reads DRAM."""
    calls = itertools.cycle([fns[name] for fns in copies])
    return lambda: next(calls)()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isa", nargs="+", default=["avx2", "avx512"])
    parser.add_argument("--dtype", choices=list(DTYPES), nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--rank", type=int, default=80)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="cpu: process CPU time (use with --threads 1 on a machine shared with other jobs)")
    parser.add_argument("--working-set-mb", type=float, default=0,
                        help="copies of each layer with this many MB of dense weights, called in rotation "
                             "(0: one copy, cache-resident)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = (f"streamed ({args.working_set_mb:g} MB of dense weights per shape)" if args.working_set_mb
             else "cache-resident")
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, M = 1, 50% BM8x8, r = {args.rank}, "
          f"weights {where}, µs/call ({args.clock} clock)")
    cols = ["shape", "dtype", "dense", "dense+lora", "nn.Linear"]
    for isa in args.isa:
        cols += [f"{isa} salr", f"{isa} salr+r{args.rank}", f"{isa} salr+r{args.rank} vs dense",
                 f"{isa} SALRLinear", f"{isa} SALRLinear vs nn.Linear"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    gen = torch.Generator().manual_seed(0)
    for dname in args.dtype:
        for rows, k in SHAPES:
            dense_bytes = rows * k * DTYPES[dname].itemsize
            n_copies = max(1, math.ceil(args.working_set_mb * 1e6 / dense_bytes))
            copies = [layer_variants(rows, k, dname, args.rank, args.isa, gen) for _ in range(n_copies)]
            fns = {name: rotating(copies, name) for name in copies[0]}
            with torch.no_grad():
                t = interleaved_medians(fns, max(args.calls, n_copies), args.repeats,
                                        time.process_time if args.clock == "cpu" else time.perf_counter)
            os.environ.pop("SALR_CPU_ISA", None)
            cells = [f"{rows}x{k}", dname, f"{t['dense'] * 1e6:.1f}", f"{t['dense+lora'] * 1e6:.1f}",
                     f"{t['nn.Linear'] * 1e6:.1f}"]
            for isa in args.isa:
                cells += [f"{t[f'{isa} salr'] * 1e6:.1f}", f"{t[f'{isa} salr+r'] * 1e6:.1f}",
                          f"{t['dense'] / t[f'{isa} salr+r']:.2f}×", f"{t[f'{isa} layer'] * 1e6:.1f}",
                          f"{t['nn.Linear'] / t[f'{isa} layer']:.2f}×"]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

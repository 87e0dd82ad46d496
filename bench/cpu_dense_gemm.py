"""The large-M CPU path for bf16 weights on a CPU with and without a fast bf16 GEMM (issue 20).

At M >= the dense crossover, sparse_lowrank_gemm decodes band chunks and hands them to ATen's GEMM.
Where oneDNN has AVX512_BF16 that GEMM runs in bf16; elsewhere (Zen 3, older Xeons) torch's bf16
GEMM is slow and salr widens the chunks to fp32 (SALR_CPU_DENSE_GEMM=auto|native|fp32 forces it).
Per M, interleaved repeat by repeat, median ms per call of one 11008x4096 layer, 50% BM8x8:
  torch bf16 / torch fp32   F.linear on the dense weight in that dtype
  salr kernel               the sparse kernel forced (SALR_CPU_DENSE_CROSSOVER huge)
  salr dense bf16 / fp32    decode + GEMM forced, the GEMM in bf16 or widened to fp32
  salr auto                 what the op picks by itself

oneDNN reads ONEDNN_MAX_CPU_ISA once per process, so emulate a CPU without AVX512_BF16 with a
second run:
  python bench/cpu_dense_gemm.py --threads 1 --clock cpu
  ONEDNN_MAX_CPU_ISA=AVX2 SALR_CPU_ISA=avx2 python bench/cpu_dense_gemm.py --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

import salr
from salr import BitmapSparseWeight
from salr._native import _C
from salr.cli.bench import random_sparse_weight




def with_env(fn, **env):
    def run():
        for k, v in env.items():
            os.environ[k] = v
        try:
            return fn()
        finally:
            for k in env:
                os.environ.pop(k, None)
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--shape", type=int, nargs=2, default=[11008, 4096])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from cpu_small_layers import interleaved_medians  # noqa: E402 (the bench folder's shared timer)

    rows, cols = args.shape
    gen = torch.Generator().manual_seed(0)
    dense = random_sparse_weight(rows, cols, args.sparsity, torch.bfloat16, gen)
    dense32 = dense.float()
    sparse = BitmapSparseWeight.from_dense(dense)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, salr path {salr.cpu_isa()}, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'unset')}, auto GEMM dtype for bf16: "
          f"{_C.cpu_dense_gemm_dtype('bfloat16')}; {rows}x{cols} {args.sparsity:.0%}, ms/call ({args.clock} clock)")
    cols_out = ["M", "torch bf16", "torch fp32", "salr kernel", "salr dense bf16", "salr dense fp32", "salr auto",
                "auto vs torch bf16"]
    print("| " + " | ".join(cols_out) + " |\n|" + "---|" * len(cols_out))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for m in args.m:
        x = torch.randn(m, cols, generator=gen).to(torch.bfloat16)
        x32 = x.float()
        fns = {"torch bf16": lambda: F.linear(x, dense),
               "torch fp32": lambda: F.linear(x32, dense32),
               "kernel": with_env(lambda: sparse.linear(x), SALR_CPU_DENSE_CROSSOVER="1000000000"),
               "dense bf16": with_env(lambda: sparse.linear(x), SALR_CPU_DENSE_CROSSOVER="1", SALR_CPU_DENSE_GEMM="native"),
               "dense fp32": with_env(lambda: sparse.linear(x), SALR_CPU_DENSE_CROSSOVER="1", SALR_CPU_DENSE_GEMM="fp32"),
               "auto": lambda: sparse.linear(x)}
        t = interleaved_medians(fns, 1, args.repeats, clock, warmup=1)
        cells = [str(m)] + [f"{t[k] * 1e3:.1f}" for k in fns] + [f"{t['torch bf16'] / t['auto']:.2f}×"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

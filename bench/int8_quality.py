"""Perplexity of a saved salr model with float bases against the same model with its bases rounded to
int8 after the fact (round-to-nearest, per row and per 64-column group; `salr.methods.salr.model.
quantize_bases`), design.md §5 protocol, plus the bytes one decoded token streams in bf16.

The rounding here comes after the SVD adapter was fitted, so the adapter does not absorb it (a
model converted with ``--quantize int8`` fits the adapter against the dequantized base): an upper
bound on what RTN costs the converted model.

  python bench/int8_quality.py runs/prune/model [--eval-windows 16] [--scales row 64]
"""

from __future__ import annotations

import argparse
import copy

import torch

import salr
from salr.cli import assets
from salr.cli.layer_report import decode_bytes
from salr.eval.perplexity import perplexity
from salr.methods.salr.model import quantize_bases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a directory written by salr prune / finetune (float bases)")
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--scales", nargs="+", choices=["row", "64"], default=["row", "64"],
                        help="the int8 variants: per-row scales, per 64-column group scales (default both)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    windows = assets.text_splits(tokenizer).eval_windows(args.eval_windows, 512)
    base = salr.load(args.model)
    rows = []
    variants = [("float values", None)] + [(f"int8 RTN, per {'row' if s == 'row' else '64 columns'}", s)
                                           for s in args.scales]
    for name, scales in variants:
        model = copy.deepcopy(base)
        if scales is not None:
            quantize_bases(model, "int8", None if scales == "row" else 64)
        ppl = perplexity(model, windows, desc=name)
        mb = decode_bytes(copy.deepcopy(model).to(torch.bfloat16))
        rows.append((name, ppl, mb))
        print(f"| {name} | {ppl:.3f} | {(ppl / rows[0][1] - 1) * 100:+.2f} % | {mb['block_linears'] / 1e6:.1f} | "
              f"{mb['adapters'] / 1e6:.1f} | {mb['lm_head'] / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()

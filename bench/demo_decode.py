"""The full demo's decode comparison without its pruning and training (issues 20 and 21).

    python bench/demo_decode.py [--quantize int8] [--quantize-adapters int8] [--isa avx2 avx512]

`salr demo` ends by timing greedy decoding of the dense SmolLM2-135M against its merged 50 % SALR
model (bf16, SVD r=64 + LoRA r=16 merged into r=80 adapters) with steps.compare_speed, and reports the
ratio beside the byte limit. The bytes a token reads depend on the shapes, the sparsity and the
ranks, not on which weights survive or what the adapters learned, so this script builds the same
model by magnitude pruning with an untrained LoRA (seconds instead of 15 minutes) and runs the same
comparison, for each --isa in turn (SALR_CPU_ISA), with the demo's decode budget.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

import salr
from salr.cli import steps
from salr.cli.layer_report import byte_limit
from salr.cli.machine import speed_context
from salr.methods.salr.config import SALRConfig


def demo_shaped_model(dense: torch.nn.Module, quantize: str | None, quantize_adapters: str | None = None
                      ) -> torch.nn.Module:
    """The demo's merged inference form: 50 % per layer, SVD r=64 + LoRA r=16 merged, bf16 (with
    `quantize_adapters`, the merged adapters stored as int8)."""
    model = steps.dense_copy(dense)
    salr.sparsify_(model, SALRConfig(sparsity=0.5, criterion="magnitude", svd_rank=64, svd_method="randomized",
                                     lora_rank=16, quantize=quantize), None, progress=False)
    salr.merge_(model)
    if quantize_adapters:
        salr.quantize_adapters_(model)
    return model.to(torch.bfloat16).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantize", choices=["int8"], default=None)
    parser.add_argument("--quantize-adapters", choices=["int8"], default=None)
    parser.add_argument("--isa", nargs="+", default=["avx512", "avx2"])
    parser.add_argument("--repeats", type=int, default=None, help="decode rounds (default: the demo's)")
    args = parser.parse_args(argv)
    model, tokenizer, _ = steps.load("smollm2")
    sparse = demo_shaped_model(model, args.quantize, args.quantize_adapters)
    dense = model.to(torch.bfloat16).eval()
    limit = byte_limit(dense, sparse)
    budget = steps.Budget()
    if args.repeats:
        budget.decode_repeats = args.repeats
    rows = []
    for isa in args.isa:
        os.environ["SALR_CPU_ISA"] = isa
        (dense_tps, _), (sparse_tps, _) = steps.compare_speed(dense, sparse, tokenizer, budget, torch.bfloat16)
        ratio = sparse_tps / dense_tps
        rows.append({**speed_context(torch.bfloat16), "isa": isa, "dense_tok_s": dense_tps, "salr_tok_s": sparse_tps,
                     "ratio": ratio, "byte_limit": limit["limit"], "of_limit": ratio / limit["limit"]})
    mb = {k: {part: v / 1e6 for part, v in limit[k].items()} for k in ("dense", "salr")}
    print(json.dumps({"quantize": args.quantize, "quantize_adapters": args.quantize_adapters, "mb_per_token": mb,
                      "rows": rows}, indent=1))
    print("| path | dense tok/s | salr tok/s | salr / dense | byte limit | of the limit |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['isa']} | {r['dense_tok_s']:.1f} | {r['salr_tok_s']:.1f} | {r['ratio']:.2f}× | "
              f"{r['byte_limit']:.2f}× | {r['of_limit']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What the demo's fine-tuning is limited by: the demo's recipe (Wanda 50% + SVD r=64 + LoRA r=16, 60 AdamW
steps of 4 x 256 tokens) with one setting changed per variant, perplexity on 16 evaluation windows.

    python bench/demo_sweep.py base trainable-svd lr=2e-3 lr=4e-3 --out /tmp/sweep.json

Each variant loads and prunes a fresh SmolLM2-135M (seed 0: the same pruned model and LoRA init).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from salr.cli import steps as workflow
from salr.io.files import atomic_write_text
from salr.cli.steps import Budget


def run_variant(name: str) -> dict:
    budget = Budget()
    options = {"sparsity": 0.5, "criterion": "wanda"}
    if name == "trainable-svd":
        options["trainable_svd"] = True
    elif name.startswith("lr="):
        budget.lr = float(name[3:])
    elif name != "base":
        raise ValueError(f"variant {name!r}: expected base, trainable-svd or lr=<float>")
    model, _, splits = workflow.load("smollm2", "wikipedia")
    evaluation = Budget(eval_windows=16)
    dense = workflow.evaluate(model, splits, evaluation, "dense")
    start = time.perf_counter()
    workflow.prune(model, splits, budget, **options)
    pruned = workflow.evaluate(model, splits, evaluation, "pruned")
    trained_at = time.perf_counter()
    workflow.finetune(model, splits, budget)
    return {"variant": name, "dense": dense, "pruned": pruned,
            "fine_tuned": workflow.evaluate(model, splits, evaluation, "fine-tuned"),
            "prune_s": trained_at - start, "train_s": time.perf_counter() - trained_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", help="base | trainable-svd | lr=<float>")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    results = []
    for name in args.variants:
        results.append(run_variant(name))
        print(json.dumps(results[-1]), flush=True)
        if args.out:
            atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    print("| variant | pruned | fine-tuned | fine-tuned / dense |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['pruned']:.2f} | {r['fine_tuned']:.2f} | {r['fine_tuned'] / r['dense']:.3f} |")


if __name__ == "__main__":
    main()

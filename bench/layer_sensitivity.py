"""Which linears carry the pruning error (issue 18's remaining lever): prune SmolLM2-135M with the
demo's recipe (SparseGPT + SVD r=64 + OWL at 50 %, the demo's calibration budget), then put one
projection type back to its dense weights in every block (q, k, v, o, gate, up, down, attention, MLP)
and measure the perplexity each restoration buys, against the share of the blocks' weights it costs.

    python bench/layer_sensitivity.py --threads 2 --eval-windows 16

Before fine-tuning (the LoRA is zero then): what the adapters have to recover, by type.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses

import torch
from torch import nn

from salr.cli import steps
from salr.nn.models import block_linears, set_submodule

GROUPS = {"q_proj": ["q_proj"], "k_proj": ["k_proj"], "v_proj": ["v_proj"], "o_proj": ["o_proj"],
          "gate_proj": ["gate_proj"], "up_proj": ["up_proj"], "down_proj": ["down_proj"],
          "attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}


def with_dense(pruned: nn.Module, dense: nn.Module, kinds: list[str]) -> tuple[nn.Module, int]:
    """A copy of `pruned` whose block linears named `kinds` are `dense`'s again; and their weight count."""
    model = copy.deepcopy(pruned)
    restored = 0
    for _, linears in block_linears(dense, kinds):
        for name, linear in linears.items():
            set_submodule(model, name, copy.deepcopy(linear))
            restored += linear.weight.numel()
    return model, restored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", default="wikipedia")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dense, _, splits = steps.load(args.model, args.text)
    budget = dataclasses.replace(steps.Budget(), eval_windows=args.eval_windows)
    block_weights = sum(m.weight.numel() for _, linears in block_linears(dense) for m in linears.values())
    base = steps.evaluate(dense, splits, budget, "dense")
    pruned = steps.prune(copy.deepcopy(dense), splits, budget, progress=False, criterion="sparsegpt", layerwise="owl")
    pruned_ppl = steps.evaluate(pruned, splits, budget, "pruned")
    rows = []
    for label, kinds in GROUPS.items():
        model, restored = with_dense(pruned, dense, kinds)
        ppl = steps.evaluate(model, splits, budget, f"{label} dense")
        rows.append((label, restored / block_weights, ppl))
    print(f"\ndense {base:.2f}, pruned (SparseGPT + SVD r=64 + OWL, 50 %) {pruned_ppl:.2f}; "
          f"{args.eval_windows} evaluation windows")
    print("| dense again | share of block weights | perplexity | gap to dense closed | per % of weights |")
    print("|---|---|---|---|---|")
    for label, share, ppl in rows:
        closed = (pruned_ppl - ppl) / (pruned_ppl - base)
        print(f"| {label} | {100 * share:.1f} % | {ppl:.2f} | {100 * closed:.0f} % | {closed / share:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LoSA on SmolLM2-135M (design.md §5): perplexity of LoSA vs Wanda + plain LoRA (dense-merged and
masked-merged) vs Wanda alone, same fine-tuning steps and trainable parameters; and the peak RSS of
a LoSA training step vs the dense-BA approach (BA materialized, as LoSA's reference code does).

    python bench/losa_quality.py quality --sparsities 0.5 0.7 --steps 40 --out /tmp/losa.json
    python bench/losa_quality.py memory  --sizes 2048 4096 --layers 1 4 8

quality: one fresh copy of the model per method. "Wanda" = sequential Wanda (per output row) at the
uniform target; "+ LoRA" = a plain LoRA of rank R̄ on every linear, trained on the sparse base; its
dense-merged perplexity is the unmerged model's (merging W_s + s·BA densely is exact, and densifies
the weight); masked-merged folds only M⊙(BA) (the weight stays sparse). LoSA: T rounds on the cubic
schedule, RMI layer-wise sparsity, error-based ranks (Σ r_l = R̄·L: the same trainable parameters),
the same total steps, merged at the end into plain BM8x8 layers.

memory: each case in a fresh subprocess; the peak RSS (VmHWM, reset after setup) of one forward +
backward through a stack of L [N, N] 50%-sparse layers with rank-8 adapters on 64 tokens, minus the
RSS after setup. LoSA's extra memory is one layer's values-sized buffers at a time (flat in L); the
dense-BA graph keeps N×K tensors of every layer until the backward (linear in L).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

import torch


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


# ----------------------------------------------------------------------------- quality

def quality(args: argparse.Namespace) -> dict:
    from salr.cli import assets
    from salr.train.data import TokenWindows
    from salr.eval.perplexity import perplexity
    from salr.losa.layer import LoSALinear
    from salr.losa.config import LoSAConfig
    from salr.losa.model import trainable_count
    from salr.losa.rounds import run
    from salr.train.config import TrainConfig
    from salr.train.loop import train

    base, tokenizer = assets.load_model("smollm2")
    splits = assets.text_splits(tokenizer)
    calib = splits.calibration_windows(args.calib_windows, args.calib_seq_len, seed=0)
    evals = splits.eval_windows(args.eval_windows, 512)
    tcfg = TrainConfig(lr=args.lr, steps=args.steps, batch_size=args.batch_size, schedule=args.schedule,
                       warmup_steps=args.warmup, max_grad_norm=1.0, seed=args.seed, progress=True)

    def ppl(model, what):
        t0 = time.perf_counter()
        value = perplexity(model, evals, desc=f"ppl {what}")
        print(f"  {what}: perplexity {value:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return value

    results = {"machine": machine_line(), "args": vars(args), "eval_tokens": int(evals.numel()), "rows": []}
    results["dense"] = ppl(base, "dense") if not args.skip_dense else None
    for sparsity in args.sparsities:
        row = {"sparsity": sparsity}
        # Wanda alone, then Wanda + plain LoRA on the same pruned model.
        model = copy.deepcopy(base) if "baseline" in args.methods else None
        t0 = time.perf_counter()
        if model is not None:
            run(model, LoSAConfig(sparsity, rounds=1, total_steps=0, layerwise="uniform", rank_allocation="uniform",
                                  masked=False, final_merge=False, mean_rank=args.rank, r_max=args.rank,
                                  lora_alpha=args.alpha, progress=True), calib, splits.train)
            row["wanda"] = ppl(model, f"Wanda {sparsity:.0%}")
            row["lora_trainable"] = trainable_count(model)
            train(model, TokenWindows(splits.train, args.train_seq_len, seed=args.seed), tcfg, resume=False)
            row["lora_seconds"] = time.perf_counter() - t0
            row["lora_dense_merged"] = ppl(model, f"Wanda {sparsity:.0%} + LoRA, dense-merged")
            for m in model.modules():
                if isinstance(m, LoSALinear):
                    m.merge()  # masked merge: keeps the bitmap, drops the off-mask part of BA
            row["lora_masked_merged"] = ppl(model, f"Wanda {sparsity:.0%} + LoRA, masked-merged")
            del model
        if "losa" in args.methods:
            # LoSA.
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            config = LoSAConfig(sparsity, rounds=args.rounds, total_steps=args.steps, mean_rank=args.rank,
                                r_max=args.r_max, lora_alpha=args.alpha, train=tcfg, cka_tokens=256,
                                final_share=args.final_share or None, layerwise=args.layerwise,
                                rank_allocation=args.rank_allocation, progress=True)
            report = run(model, config, calib, TokenWindows(splits.train, args.train_seq_len, seed=args.seed))
            row["losa_seconds"] = time.perf_counter() - t0
            row["losa_trainable"] = report.trainable_parameters
            row["losa_final_sparsity"] = report.final_sparsity
            row["losa_rounds"] = [{k: v for k, v in vars(r).items() if k != "cka"} for r in report.rounds]
            row["losa"] = ppl(model, f"LoSA {sparsity:.0%}")
            del model
        results["rows"].append(row)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    return results


def quality_table(results: dict) -> str:
    lines = ["| sparsity | Wanda | Wanda + LoRA, dense-merged (dense weight) | Wanda + LoRA, masked-merged | "
             "LoSA (merged, sparse) | trainable params LoRA / LoSA |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        losa_params = sorted(set(r.get("losa_trainable", [])))

        def cell(key, fmt="{:.2f}"):
            return fmt.format(r[key]) if key in r else "–"
        lines.append(f"| {r['sparsity']:.0%} | {cell('wanda')} | {cell('lora_dense_merged')} | "
                     f"{cell('lora_masked_merged')} | {cell('losa')} | {cell('lora_trainable', '{:,}')} / "
                     f"{', '.join(f'{p:,}' for p in losa_params)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- memory

def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def memory_case(kind: str, n: int, layers: int, rank: int, tokens: int) -> dict:
    """One forward + backward through a stack of `layers` [n, n] 50%-sparse layers with rank-`rank`
    adapters, in this process; returns the peak RSS growth over the set-up state."""
    torch.manual_seed(0)
    from salr.losa.layer import LoSALinear

    stack, params = [], []
    for _ in range(layers):
        w = torch.randn(n, n)
        w[torch.rand(n, n) < 0.5] = 0
        if kind == "losa":
            layer = LoSALinear(w, rank=rank, scale=1.0)
            with torch.no_grad():
                layer.lora_b.normal_(std=0.01)
            stack.append(layer)
            params += [layer.lora_a, layer.lora_b]
            del w
        else:  # dense-BA: the dense base plus M⊙(BA) materialized in every layer at every step
            a = torch.nn.Parameter(torch.randn(rank, n) / math.sqrt(n))
            b = torch.nn.Parameter(torch.randn(n, rank) * 0.01)
            stack.append((w, w != 0, a, b))
            params += [a, b]
    x = torch.randn(tokens, n)

    def step():
        h = x
        for layer in stack:
            if kind == "losa":
                h = layer(h)
            else:
                w, mask, a, b = layer
                h = h @ (w + mask * (b @ a)).T
        h.square().mean().backward()

    setup_mb = _rss_kb("VmRSS") / 1024
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    step()
    peak = _rss_kb("VmHWM")
    assert all(p.grad is not None for p in params)
    return {"kind": kind, "n": n, "layers": layers, "rank": rank, "tokens": tokens, "rss_after_setup_mb": setup_mb,
            "step_growth_mb": (peak - before) / 1024, "dense_weight_mb": n * n * 4 / 2**20}


def memory(args: argparse.Namespace) -> dict:
    rows = []
    for n in args.sizes:
        for layers in args.layers:
            for kind in ("losa", "dense_ba"):
                # A fixed mmap threshold makes glibc return freed large buffers at once, so RSS tracks
                # live memory (its default dynamic threshold keeps freed buffers in the heap).
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
                out = subprocess.run([sys.executable, __file__, "memory-case", kind, str(n), str(layers),
                                      str(args.rank), str(args.tokens)], capture_output=True, text=True, check=True,
                                     env=env)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    return {"machine": machine_line(), "rows": rows}


def memory_table(results: dict) -> str:
    lines = ["| N = K | layers | one dense fp32 weight (MiB) | LoSA step: peak RSS growth (MiB) | "
             "dense-BA step (MiB) |", "|---|---|---|---|---|"]
    by = {}
    for r in results["rows"]:
        by.setdefault((r["n"], r["layers"]), {})[r["kind"]] = r
    for (n, layers), d in by.items():
        lines.append(f"| {n} | {layers} | {d['losa']['dense_weight_mb']:.0f} | {d['losa']['step_growth_mb']:.1f} | "
                     f"{d['dense_ba']['step_growth_mb']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7])
    q.add_argument("--steps", type=int, default=40)
    q.add_argument("--rounds", type=int, default=5)
    q.add_argument("--rank", type=int, default=8)
    q.add_argument("--r-max", type=int, default=32)
    q.add_argument("--alpha", type=float, default=16.0)
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--schedule", choices=["constant", "linear", "cosine"], default="constant")
    q.add_argument("--warmup", type=int, default=0, help="warmup steps over the run (LoSA: split over rounds)")
    q.add_argument("--final-share", type=float, default=0.6,
                   help="LoSA: the last round's fraction of the steps (0 = equal rounds)")
    q.add_argument("--layerwise", choices=["rmi", "uniform"], default="rmi")
    q.add_argument("--rank-allocation", choices=["error", "uniform"], default="error")
    q.add_argument("--methods", nargs="+", choices=["baseline", "losa"], default=["baseline", "losa"])
    q.add_argument("--seed", type=int, default=0, help="training seed (LoRA init, data order)")
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--train-seq-len", type=int, default=256)
    q.add_argument("--calib-windows", type=int, default=8)
    q.add_argument("--calib-seq-len", type=int, default=512)
    q.add_argument("--eval-windows", type=int, default=64)
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--out", default=None)
    q.add_argument("--skip-dense", action="store_true", help="do not evaluate the dense model")
    m = sub.add_parser("memory")
    m.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    m.add_argument("--layers", type=int, nargs="+", default=[1, 4, 8])
    m.add_argument("--rank", type=int, default=8)
    m.add_argument("--tokens", type=int, default=64)
    c = sub.add_parser("memory-case")
    c.add_argument("kind", choices=["losa", "dense_ba"])
    c.add_argument("n", type=int)
    c.add_argument("layers", type=int)
    c.add_argument("rank", type=int)
    c.add_argument("tokens", type=int)
    args = parser.parse_args()
    if args.cmd == "memory-case":
        torch.set_num_threads(1)
        print(json.dumps(memory_case(args.kind, args.n, args.layers, args.rank, args.tokens)))
        return
    if args.cmd == "quality":
        torch.set_num_threads(args.threads)
        res = quality(args)
        print(f"\n{res['machine']}\ndense perplexity {res['dense']}\n")
        print(quality_table(res))
    else:
        res = memory(args)
        print(f"\n{res['machine']}\n")
        print(memory_table(res))


if __name__ == "__main__":
    main()

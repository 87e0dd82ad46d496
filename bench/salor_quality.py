"""SALOR on SmolLM2-135M (design.md §5): SALR with dense LoRA factors vs SALOR with 50% / 75% sparse
factors, on the same pruned base and with the same fine-tuning steps; perplexity and LoRA bytes.

    python bench/salor_quality.py --steps 30 --eval-windows 16 --threads 1 --out runs/salor_quality

Base: Wanda 50% (per output row, sequential calibration) + SVD residual adapter r=64, converted ONCE
(cached with salr.save under --cache, reused by later runs); every method trains a deep copy
of it, so all start from the same base, SVD adapter and LoRA init (rank 16, alpha 32). SALOR's masks
follow the cubic ramp from 0 to the target over the first half of the steps (mask updates through
train(on_step=update_all_masks)), frozen afterwards; then merge() stores A⊙Ma and s·B⊙Mb in BM8x8.

LoRA bytes: SALR = the dense factors (r·(K + N) values per layer); SALOR = the BM8x8 factors as
stored (values + bitmap + offsets). fp32 is the evaluated dtype; the bf16 column is the same tensors
at 2 bytes per value (same bitmaps and offsets).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

import salr
from salr.io.saved_model import CONFIG_FILE

from losa_quality import machine_line  # bench/ is the script's folder, so on sys.path


def base_model(args, model, splits):
    """The Wanda 50% + SVD model with an untrained LoRA: from the cache, or `model` converted and cached."""
    cache = Path(args.cache)
    if (cache / CONFIG_FILE).is_file():
        print(f"base: loading {cache}", flush=True)
        return salr.load(cache), 0.0
    calibration = splits.calibration_windows(args.calib_windows, 512, seed=0)
    t0 = time.perf_counter()
    salr.sparsify_(model, salr.SALRConfig(criterion="wanda", sparsity=args.sparsity, svd_rank=args.svd_rank,
                                          lora_rank=args.rank, lora_alpha=args.alpha), calibration)
    seconds = time.perf_counter() - t0
    salr.save(model, cache, overwrite=True)
    return model.eval(), seconds


def lora_bytes(model, bf16: bool = False) -> int:
    """Bytes of all LoRA factors as held: dense (SALRLinear) or BM8x8 (merged SALORLinear)."""
    from salr.methods.salor.layer import SALORLinear
    from salr.methods.salr.model import salr_layers

    total = 0
    for layer in salr_layers(model).values():
        if isinstance(layer, SALORLinear) and layer.factor_rank:
            for w in (layer.sparse_factors.a, layer.sparse_factors.b):
                total += w.index_bytes + w.nnz * (2 if bf16 else w.values.element_size())
        elif layer.lora_a is not None:
            total += (layer.lora_a.numel() + layer.lora_b.numel()) * (2 if bf16 else layer.lora_a.element_size())
    return total


def run(args) -> dict:
    from salr.cli import assets
    from salr.train.data import TokenWindows
    from salr.eval.perplexity import perplexity
    from salr.methods.salor.config import FactorSparsityConfig
    from salr.methods.salor.factors import update_all_masks
    from salr.methods.salor.model import salor_layers, to_salor
    from salr.train.config import TrainConfig
    from salr.train.loop import train

    dense, tokenizer = assets.load_model("smollm2")
    splits = assets.text_splits(tokenizer)
    evals = splits.eval_windows(args.eval_windows, 512)
    base, convert_s = base_model(args, dense, splits)
    del dense

    def ppl(model, what):
        t0 = time.perf_counter()
        value = perplexity(model, evals, desc=f"ppl {what}")
        print(f"  {what}: perplexity {value:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return value

    results = {"machine": machine_line(), "args": vars(args), "command": command_line(),
               "eval_tokens": int(evals.numel()), "convert_seconds": convert_s, "rows": []}
    results["base"] = ppl(base, "base (no fine-tuning)")
    config = TrainConfig(lr=args.lr, steps=args.steps, batch_size=args.batch_size,
                         warmup_steps=min(args.warmup, args.steps),
                         seed=0, progress=True)
    for factor_sparsity in [None, *args.factor_sparsities]:
        name = "SALR (dense factors)" if factor_sparsity is None else f"SALOR {factor_sparsity:.0%} factors"
        print(f"{name}:", flush=True)
        model = copy.deepcopy(base)
        row = {"method": name, "factor_sparsity": factor_sparsity, "dense_lora_bytes": lora_bytes(model),
               "dense_lora_bytes_bf16": lora_bytes(model, bf16=True)}
        if factor_sparsity is not None:
            to_salor(model, FactorSparsityConfig(factor_sparsity, args.factor_pattern, start_step=0,
                                                 end_step=args.steps // 2))
        t0 = time.perf_counter()
        history = train(model, TokenWindows(splits.train, args.train_seq_len, seed=0), config, resume=False,
                        on_step=update_all_masks)
        row["train_seconds"] = time.perf_counter() - t0
        row["final_loss"] = sum(e["loss"] for e in history[-5:]) / min(5, len(history))
        model.eval()
        row["ppl"] = ppl(model, f"{name}, trained")
        if factor_sparsity is not None:
            layers = salor_layers(model).values()
            row["mask_sparsity_ab"] = [sum(m.factor_sparsity()[i] for m in layers) / len(layers) for i in (0, 1)]
            for layer in layers:
                layer.merge()  # the stored form: BM8x8 factors through the sparse kernel
            row["ppl_stored"] = ppl(model, f"{name}, stored BM8x8")
        row["lora_bytes"] = lora_bytes(model)
        row["lora_bytes_bf16"] = lora_bytes(model, bf16=True)
        results["rows"].append(row)
        del model
        if args.out:
            write(results, args.out)
    return results


def timing(args) -> str:
    """Forward time of one layer at SmolLM2's MLP shapes: SALR merged (base + [A_svd; A] in ONE fused
    call) vs SALOR stored (fused base + A_svd call, then the BM8x8 factors in two sparse GEMMs)."""
    from salr.methods.salor.config import FactorSparsityConfig
    from salr.methods.salor.layer import SALORLinear
    from salr.methods.salr.layer import SALRLinear

    def best_us(layer, x, repeats=30):
        times = []
        with torch.no_grad():
            for _ in range(repeats + 3):
                t0 = time.perf_counter()
                layer(x)
                times.append(time.perf_counter() - t0)
        return min(times[3:]) * 1e6

    lines = ["| shape N×K | M | SALR merged (µs) | " + " | ".join(f"SALOR {s:.0%} stored (µs)" for s in
                                                              args.factor_sparsities) + " |",
             "|---|---|---|" + "---|" * len(args.factor_sparsities)]
    for n, k in ((1536, 576), (576, 1536)):
        torch.manual_seed(0)
        w = torch.randn(n, k)
        w[torch.rand(n, k) < args.sparsity] = 0
        base = SALRLinear.from_weights(w, None, torch.randn(args.svd_rank, k) / k, torch.randn(n, args.svd_rank),
                                       lora_rank=args.rank, alpha=args.alpha)
        with torch.no_grad():
            base.lora_b.normal_()
        variants = []
        for s in args.factor_sparsities:
            layer = SALORLinear.from_salr(base, FactorSparsityConfig(s))
            variants.append(layer.merge().eval())
        dense = copy.deepcopy(base).merge().eval()
        for m in (1, 256):
            x = torch.randn(m, k)
            cells = [best_us(dense, x)] + [best_us(v, x) for v in variants]
            lines.append(f"| {n}×{k} | {m} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    return "\n".join(lines)


def table(results: dict) -> str:
    dense = results["rows"][0]["dense_lora_bytes"]
    lines = ["| method | perplexity (trained) | perplexity (stored form) | LoRA bytes fp32 | LoRA bytes bf16 | "
             "× dense LoRA (fp32) | mask sparsity A / B | train s |",
             "|---|---|---|---|---|---|---|---|",
             f"| Wanda 50% + SVD r=64, no fine-tuning | {results['base']:.2f} | – | – | – | – | – | – |"]
    for r in results["rows"]:
        masks = "/".join(f"{s:.3f}" for s in r["mask_sparsity_ab"]) if "mask_sparsity_ab" in r else "dense"
        lines.append(f"| {r['method']} | {r['ppl']:.2f} | {r.get('ppl_stored', r['ppl']):.2f} | "
                     f"{r['lora_bytes']:,} | {r['lora_bytes_bf16']:,} | {r['lora_bytes'] / dense:.3f} | {masks} | "
                     f"{r['train_seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results["rows"]:
        x, y = r["lora_bytes"] / 2**20, r.get("ppl_stored", r["ppl"])
        ax.scatter([x], [y], s=40)
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(results["base"], color="grey", linestyle="--", linewidth=1, label="base, no fine-tuning")
    ax.set_xlabel("LoRA bytes as stored, fp32 (MiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"SmolLM2-135M, Wanda 50% + SVD r=64, {results['args']['steps']} steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def write(results: dict, out: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, folder / "results.json")


def command_line() -> str:
    return " ".join(["python", "bench/salor_quality.py", *sys.argv[1:]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factor-sparsities", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--factor-pattern", default=None, help="N:M pattern of the factors (default unstructured)")
    parser.add_argument("--sparsity", type=float, default=0.5, help="base sparsity (Wanda)")
    parser.add_argument("--svd-rank", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default="runs/salor_base_wanda50",
                        help="where the converted base is saved once and reloaded from")
    parser.add_argument("--out", default="runs/salor_quality", help="results.json and ppl_vs_bytes.png go here")
    parser.add_argument("--timing-only", action="store_true",
                        help="only time one layer's forward, SALR merged vs SALOR stored (no model, no training)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.timing_only:
        print(f"{machine_line()}\nCommand: `{command_line()}`\n\n{timing(args)}")
        return
    results = run(args)
    table_md = table(results)
    print(f"\n{results['machine']}\nCommand: `{results['command']}`\n\n{table_md}")
    if args.out:
        write(results, args.out)
        plot(results, Path(args.out) / "ppl_vs_bytes.png")
        (Path(args.out) / "table.md").write_text(table_md + "\n")


if __name__ == "__main__":
    main()

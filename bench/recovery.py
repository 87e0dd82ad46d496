"""Recovery at 50 % unstructured (issue 18): every recipe on one budget against dense + LoRA.

    python bench/recovery.py --out runs/recovery dense+lora wanda+svd sparsegpt+svd sparsegpt+svd+distill ...

A recipe is a '+'-joined name:
  dense+lora                   LoRA r on every block linear of the unpruned model (the baseline)
  <criterion>+svd[+distill|+distill-lora][+owl]   SALR: prune (wanda | sparsegpt) + SVD residual
                                 adapter + LoRA; distill: KL to the dense model (--distill-weight,
                                 --distill-temperature); distill-lora: KL to the dense model after LoRA
                                 on the same budget (the dense + lora recipe's model, trained first:
                                 the plain dense teacher is itself above the goal)
                                 owl: OWL layer-wise ratios around the target
                                 types: sparsity per projection type around each block's ratio
                                 (salr.prune.type_allocation: q/k/o pruned harder, v and the MLP less)
  <criterion>+svd+salor        SALR with sparse LoRA factors (50 %, cubic ramp over the first half)
  <criterion>+svd+int8         SALR on an int8 base (per-row scales): Wanda rounds to nearest after
                                 pruning, SparseGPT folds the rounding into its column loop (issue 21);
                                 also evaluated with the merged adapters stored as int8
                                 (salr.quantize_adapters_, one scale per output row)
  losa+rmi | losa+owl          LoSA from the dense model (mean rank r, r_max 4r), merged: no adapters
A sparse recipe may name its own target after '@' (otherwise --sparsity, unstructured): wanda+svd@0.7,
wanda+svd@2:4 (N:M, SALR recipes only), so one table holds several targets against one baseline.

Every recipe uses the same budget (the demo's: 32 × 512-token calibration windows, 60 AdamW steps of
4 × 256 tokens, lr 1e-3, warmup 5, cosine, seed 0: the same LoRA init and data order; --train-steps
scales the tokens) and is evaluated on the first --eval-windows 512-token windows of the evaluation split. Each finished recipe
is one JSON in --out (a re-run skips it); the table (perplexity, wall time, trainable parameters,
bytes of the saved model) and the plot (perplexity against bytes) are rewritten after each.
--quick runs the machinery on a small budget (with --model / --text: a tiny local model in a test).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from salr import losa
from salr.cli import steps
from salr.interop.hf import to_transformers
from salr.io.files import atomic_write_text
from salr.io.saved_model import save
from salr.methods.salr.model import quantize_adapters_
from salr.methods.salor.config import FactorSparsityConfig
from salr.prune.masks import resolve_sparsity
from salr.train import distill
from salr.train.config import TrainConfig

CRITERIA = ("wanda", "sparsegpt")
SALR_EXTRAS = ("distill", "distill-lora", "owl", "types", "salor", "int8")
DENSE_LORA = {"sparsity": 0.0, "criterion": "magnitude", "svd_rank": 0}  # the baseline: LoRA on the dense weight


def quick_budget() -> steps.Budget:
    return steps.Budget(eval_windows=4, eval_seq_len=32, calib_windows=4, calib_seq_len=32, train_steps=4,
                        train_batch=2, train_seq_len=32, lr=3e-3, warmup=1, svd_rank=4, lora_rank=4)


# Budget fields a command line may change; one --out holds rows of one value of each.
BUDGET_FLAGS = (("--train-steps", "train_steps"), ("--lora-rank", "lora_rank"))


def lora_alpha(budget: steps.Budget) -> dict:
    """alpha = 2r at every --lora-rank (the budget's r = 16 -> 32, SALRConfig's default): the LoRA scale stays 2."""
    return {"lora_alpha": 2.0 * budget.lora_rank}


def parse_target(target: str) -> dict:
    """'0.7' -> {"sparsity": 0.7, "pattern": None}; '2:4' -> {"sparsity": 0.5, "pattern": "2:4"}."""
    pattern = target if ":" in target else None
    sparsity = None if pattern else float(target)
    return {"sparsity": resolve_sparsity(sparsity, pattern, ("recipe target", "recipe target")), "pattern": pattern}


def parse_recipe(name: str) -> dict:
    """The recipe's parts: {"kind": "dense" | "salr" | "losa", "target": None | {...}, ...}; ValueError
    naming a bad one."""
    recipe_name, at, target_text = name.partition("@")
    parts = recipe_name.split("+")
    try:
        target = parse_target(target_text) if at else None
    except ValueError as e:
        raise ValueError(f"recipe {name!r}: target after '@': {e}") from None
    extras = parts[2:]
    if parts == ["dense", "lora"] and target is None:
        return {"kind": "dense", "target": None}
    if (parts[0] == "losa" and len(parts) == 2 and parts[1] in ("rmi", "owl")
            and (target is None or target["pattern"] is None)):
        return {"kind": "losa", "layerwise": parts[1], "target": target}
    if (parts[0] in CRITERIA and parts[1:2] == ["svd"] and all(e in SALR_EXTRAS for e in extras)
            and len(set(extras)) == len(extras) and not {"distill", "distill-lora"} <= set(extras)
            and not ("types" in extras and target is not None and target["pattern"] is not None)):
        return {"kind": "salr", "criterion": parts[0], "target": target,
                **{e.replace("-", "_"): e in extras for e in SALR_EXTRAS}}
    raise ValueError(f"recipe {name!r}: expected dense+lora, losa+rmi[@S], losa+owl[@S] or "
                     f"<{'|'.join(CRITERIA)}>+svd[+distill|+distill-lora][+owl][+types][+salor][+int8][@S|@N:M] "
                     f"(+types: unstructured targets only)")


def target_label(row: dict) -> str:
    return row.get("pattern") or f"{row['sparsity']:.0%}"


def lora_teacher(model: torch.nn.Module, splits, budget: steps.Budget, seed: int) -> torch.nn.Module:
    """The dense + lora recipe's model as a frozen teacher: a copy of the dense `model` with LoRA trained
    on the same budget, data order and seed, folded into plain dense weights."""
    teacher = steps.dense_copy(model)
    steps.prune(teacher, splits, budget, seed=seed, progress=False, **lora_alpha(budget), **DENSE_LORA)
    steps.finetune(teacher, splits, budget, seed=seed)
    steps.merge_all(teacher)
    return distill.frozen_teacher(to_transformers(teacher))


def with_int8_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a merged SALR model with its adapters stored as int8 (salr.quantize_adapters_: the
    format the op reads, one scale per output row)."""
    model = copy.deepcopy(model)
    quantize_adapters_(model)
    return model


def trainable_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def saved_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model as salr.save writes it (in a temporary directory, removed afterwards)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save(model, Path(tmp) / "model")
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_recipe(name: str, args: argparse.Namespace, budget: steps.Budget) -> dict:
    recipe = parse_recipe(name)
    model, _, splits = steps.load(args.model, args.text)
    evaluation = dataclasses.replace(budget, eval_windows=args.eval_windows)
    start = time.perf_counter()
    target = recipe["target"] or {"sparsity": 0.0 if recipe["kind"] == "dense" else args.sparsity, "pattern": None}
    row: dict = {"recipe": name, **target, "train_steps": budget.train_steps, "lora_rank": budget.lora_rank}
    if recipe["kind"] == "losa":
        config = losa.LoSAConfig(
            sparsity=target["sparsity"], rounds=args.rounds, total_steps=budget.train_steps, mean_rank=budget.lora_rank,
            r_max=4 * budget.lora_rank, **lora_alpha(budget), layerwise=recipe["layerwise"],
            train=TrainConfig(steps=budget.train_steps, batch_size=budget.train_batch, lr=budget.lr,
                              warmup_steps=budget.warmup, seed=args.seed), progress=False)
        calibration = splits.calibration_windows(budget.calib_windows, budget.calib_seq_len)
        torch.manual_seed(args.seed)
        report = losa.run(model, config, calibration, splits.train_source(budget.train_seq_len, seed=args.seed))
        losa.export_salr(model)
        row.update(trainable=max(report.trainable_parameters), final_sparsity=report.final_sparsity,
                   loss=[h["loss"] for r in report.rounds for h in r.history])
    else:
        teacher = None
        if recipe["kind"] == "dense":
            options = dict(DENSE_LORA)
        else:
            options = {**target, "criterion": recipe["criterion"], "layerwise": "owl" if recipe["owl"] else "uniform",
                       "quantize": "int8" if recipe["int8"] else None}
            if recipe["types"]:
                options["type_allocation"] = row["type_strength"] = args.type_strength  # SALRConfig resolves it
            if recipe["salor"]:
                options["factor_config"] = FactorSparsityConfig(0.5, end_step=budget.train_steps // 2)
            if recipe["distill"]:
                teacher = distill.frozen_teacher(model)
            if recipe["distill_lora"]:
                teacher = lora_teacher(model, splits, budget, args.seed)
                row["teacher_s"] = time.perf_counter() - start  # in prune_s too: the recipe's cost
        steps.prune(model, splits, budget, seed=args.seed, progress=False, **lora_alpha(budget), **options)
        row["prune_s"] = time.perf_counter() - start
        if recipe["kind"] != "dense":
            row["pruned"] = steps.evaluate(model, splits, evaluation, f"{name}: pruned")
        row["trainable"] = trainable_params(model)
        train_options = ({"distill_weight": args.distill_weight, "distill_temperature": args.distill_temperature}
                         if teacher is not None else {})
        trained_at = time.perf_counter()
        history = steps.finetune(model, splits, budget, teacher=teacher, seed=args.seed, **train_options)
        row["train_s"] = time.perf_counter() - trained_at
        row["loss"] = [h["loss"] for h in history]
        del teacher
        steps.merge_all(model)
        if recipe["kind"] == "dense":
            model = to_transformers(model)  # LoRA folded into the dense weights: a plain dense model
        row["wall_s"] = row["prune_s"] + row["train_s"]  # the evaluation of the pruned model left out
    if recipe["kind"] == "losa":
        row["wall_s"] = time.perf_counter() - start
    row["fine_tuned"] = steps.evaluate(model, splits, evaluation, f"{name}: fine-tuned")
    if recipe.get("int8"):
        row["int8_adapters"] = steps.evaluate(with_int8_adapters(model), splits, evaluation, f"{name}: int8 adapters")
    row["bytes"] = saved_bytes(model)
    row["eval_windows"] = args.eval_windows
    return row


def dense_perplexity(args: argparse.Namespace, budget: steps.Budget) -> float:
    path = args.out / "dense.json"
    if path.exists():
        return json.loads(path.read_text())["perplexity"]
    model, _, splits = steps.load(args.model, args.text)
    ppl = steps.evaluate(model, splits, dataclasses.replace(budget, eval_windows=args.eval_windows), "dense")
    atomic_write_text(path, json.dumps({"perplexity": ppl, "eval_windows": args.eval_windows}) + "\n")
    return ppl


def table(rows: list[dict], dense: float) -> str:
    base = next((r["fine_tuned"] for r in rows if r["recipe"] == "dense+lora"), None)
    adapters = any("int8_adapters" in r for r in rows)  # a column only when an int8 recipe ran
    header = ["recipe", "sparsity", "pruned", "fine-tuned", "× dense + LoRA", "wall s", "trainable params", "saved MB"]
    header += ["int8 adapters"] if adapters else []
    dense_ratio = "–" if base is None else f"{dense / base:.3f}"
    dense_row = ["dense (no training)", "–", "–", f"{dense:.2f}", dense_ratio] + ["–"] * (len(header) - 5)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), "| " + " | ".join(dense_row) + " |"]
    for r in rows:
        ratio = "–" if base is None else f"{r['fine_tuned'] / base:.3f}"
        pruned = f"{r['pruned']:.2f}" if "pruned" in r else "–"
        int8_adapters = f" {r['int8_adapters']:.2f} |" if "int8_adapters" in r else " – |"
        lines.append(f"| {r['recipe']} | {target_label(r)} | {pruned} | {r['fine_tuned']:.2f} | {ratio} | "
                     f"{r['wall_s']:.0f} | {r['trainable']:,} | {r['bytes'] / 1e6:.1f} |"
                     + (int8_adapters if adapters else ""))
    return "\n".join(lines)


def plot(rows: list[dict], dense: float, path: Path) -> None:
    """Perplexity against saved bytes, every point labelled; the dense + LoRA line and the goal (1.10×)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = next((r["fine_tuned"] for r in rows if r["recipe"] == "dense+lora"), None)
    # Recipes within 20 MB of each other share a stack: their labels in perplexity order, 9 points apart.
    stacks: dict[int, list[dict]] = {}
    key, previous = -1, None
    for r in sorted(rows, key=lambda r: r["bytes"]):
        key += previous is None or r["bytes"] - previous > 20e6
        previous = r["bytes"]
        stacks.setdefault(key, []).append(r)
    for stack in stacks.values():
        stack.sort(key=lambda r: -r["fine_tuned"])
    rightmost = max(stacks)
    for key, stack in stacks.items():
        left = len(stack) == 1 and key != rightmost  # a lone point beside a stack: its label on the left
        for i, r in enumerate(stack):
            colour = "black" if r["recipe"] == "dense+lora" else ("tab:green" if r["recipe"].startswith("losa")
                                                                  else "tab:blue")
            ax.scatter(r["bytes"] / 1e6, r["fine_tuned"], color=colour)
            ax.annotate(f"{r['recipe']} ({r['fine_tuned']:.2f})", (r["bytes"] / 1e6, r["fine_tuned"]), fontsize=7,
                        xytext=(-8 if left else 8, 9 * ((len(stack) - 1) / 2 - i)), textcoords="offset points",
                        va="center", ha="right" if left else "left",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "gray"})
    ax.axhline(dense, color="gray", ls=":", lw=1, label=f"dense, no training ({dense:.2f})")
    if base is not None and any(r["sparsity"] == 0.5 and not r.get("pattern") for r in rows):
        ax.axhline(1.10 * base, color="tab:red", ls="--", lw=1,
                   label=f"50% goal: 1.10 × dense + LoRA ({1.1 * base:.2f})")
    if base is not None and any(r["sparsity"] > 0.5 or r.get("pattern") for r in rows):
        ax.axhline(2 * base, color="tab:purple", ls="--", lw=1,
                   label=f"2:4 / 70% goal: 2 × dense + LoRA ({2 * base:.2f})")
    ax.margins(x=0.35, y=0.12)  # room for the labels
    ax.set_xlabel("saved model (MB, fp32)")
    ax.set_ylabel("perplexity after fine-tuning")
    targets = sorted({target_label(r) for r in rows if r["recipe"] != "dense+lora"})
    ax.set_title(f"{' / '.join(targets)} sparse recipes vs dense + LoRA, {rows[0].get('train_steps', 60)} steps each")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _claim(path: Path) -> bool:
    """Create `path` unless it exists: two processes on one --out never run the same recipe."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _report(args: argparse.Namespace, dense: float) -> list[dict]:
    """The finished recipes of --out (in the order asked, then any others), written as table.md + plot."""
    found = {json.loads(p.read_text())["recipe"]: json.loads(p.read_text()) for p in sorted(args.out.glob("*.json"))
             if p.name != "dense.json"}
    rows = [found.pop(n) for n in args.recipes if n in found] + list(found.values())
    if rows:
        atomic_write_text(args.out / "table.md", table(rows, dense) + "\n")
        plot(rows, dense, args.out / "recovery.png")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipes", nargs="*", help="recipe names, run in order (see above)")
    parser.add_argument("--out", type=Path, required=True, help="directory: one JSON per recipe, table.md, plot")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--text", default="wikipedia")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--train-steps", type=int, default=None,
                        help="fine-tuning steps (default: the budget's 60; --quick's 4): more tokens, same schedule")
    parser.add_argument("--lora-rank", type=int, default=None,
                        help="LoRA rank of every recipe, alpha 2r (default: the budget's 16; LoSA: its mean rank)")
    parser.add_argument("--rounds", type=int, default=5, help="LoSA rounds")
    parser.add_argument("--type-strength", type=float, default=1.0,
                        help="+types: the per-type offsets times this (default 1; a row records it)")
    parser.add_argument("--distill-weight", type=float, default=0.5)
    parser.add_argument("--distill-temperature", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a tiny budget: checks the machinery, not the numbers")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite the table and the plot from the recipes finished in --out")
    args = parser.parse_args(argv)
    for name in args.recipes:
        parse_recipe(name)  # a typo fails before hours of work
    if args.threads:
        torch.set_num_threads(args.threads)
    default = quick_budget() if args.quick else steps.Budget()
    budget = default
    for flag, field in BUDGET_FLAGS:
        value = getattr(args, field)
        if value is not None:
            if value < 1:
                parser.error(f"{flag}: must be >= 1, got {value}")
            budget = dataclasses.replace(budget, **{field: value})
    args.out.mkdir(parents=True, exist_ok=True)
    for done in args.out.glob("*.json"):  # one table, one budget: a finished row of another budget is an error
        row = json.loads(done.read_text())
        for flag, field in BUDGET_FLAGS:
            done_value = row.get(field, getattr(default, field))
            if done_value != getattr(budget, field):
                parser.error(f"--out {args.out}: {done.name} was run with {field} {done_value}, this run with "
                             f"{getattr(budget, field)} ({flag}): use another --out")
    dense = dense_perplexity(args, budget)
    for i, name in enumerate([] if args.report else args.recipes, 1):
        stem = name.replace("+", "_").replace(":", "-")
        path, claim = args.out / f"{stem}.json", args.out / f"{stem}.running"
        if path.exists() or not _claim(claim):  # finished, or another process runs it (a stale claim: delete it)
            print(f"[{i}/{len(args.recipes)}] {name}: {'done' if path.exists() else 'claimed by another run'}", flush=True)
            continue
        print(f"[{i}/{len(args.recipes)}] {name} ...", flush=True)
        row = run_recipe(name, args, budget)
        atomic_write_text(path, json.dumps(row, indent=1) + "\n")
        claim.unlink()
        print(f"[{i}/{len(args.recipes)}] {name}: {row['fine_tuned']:.2f} in {row['wall_s']:.0f} s", flush=True)
        _report(args, dense)
    rows = _report(args, dense)
    print(table(rows, dense))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

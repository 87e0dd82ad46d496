"""The model-level path the CLI and the demo run: load → calibrate + sparsify → fine-tune → evaluate
→ merge → save → reload → generate. Each step is a plain function over (model, tokenizer, splits)
with a :class:`Budget` (how much data and compute), so the commands stay short.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from salr import losa
from salr.cli import assets
from salr.eval.generation import decode_speed
from salr.eval.perplexity import completion_perplexity, perplexity
from salr.io.saved_model import load as load_saved
from salr.methods.registry import merge_, sparsify_
from salr.methods.salor.config import FactorSparsityConfig, SALORConfig
from salr.methods.salor.factors import has_factor_masks, update_all_masks
from salr.methods.salr.config import SALRConfig
from salr.methods.salr.model import quantize_adapters_, salr_layers
from salr.prune.quantize import check_group_size, check_quantize
from salr.train.config import TrainConfig
from salr.train.loop import train

PROMPT = "The history of the city begins"


@dataclass
class Budget:
    """How much data and compute one run uses (the demo's full and --quick sizes)."""

    eval_windows: int = 64
    eval_seq_len: int = 512
    calib_windows: int = 32
    calib_seq_len: int = 512
    train_steps: int = 60
    train_batch: int = 4
    train_seq_len: int = 256
    lr: float = 1e-3
    warmup: int = 5
    svd_rank: int = 64
    lora_rank: int = 16
    new_tokens: int = 32
    decode_repeats: int = 5
    # LoSA calibrates four times per round (CKA, statistics, pruned outputs, dense error) for 5 rounds:
    # 8 windows keep its 160 window passes near SALR's 64 (2 passes over 32 windows).
    losa_calib_windows: int = 8
    losa_rounds: int = 5

    @classmethod
    def quick(cls) -> "Budget":
        # 8 × 256 calibration tokens: at least the 1,536 inputs of SmolLM2's down projections, so
        # SparseGPT's Hessians have full rank (4 windows gave 70 pruned perplexity against 53).
        return cls(eval_windows=4, eval_seq_len=256, calib_windows=8, calib_seq_len=256, train_steps=8,
                   train_batch=2, train_seq_len=128, lr=2e-3, warmup=1, svd_rank=16, lora_rank=8,
                   new_tokens=16, decode_repeats=3, losa_calib_windows=2,
                   losa_rounds=3)  # 8 steps: 5 for the last round, 3 for the first two


def load(model: str, text: str = assets.WIKIPEDIA):
    """(model, tokenizer, splits) for 'smollm2' / a local HF directory and 'wikipedia' / a text file."""
    net, tokenizer = assets.load_model(model)
    return net, tokenizer, assets.text_splits(tokenizer, text)


def quantize_options(args: argparse.Namespace) -> dict:
    """SALRConfig's quantize fields of --quantize / --quantize-group-size, checked before the model loads."""
    quantize = check_quantize(args.quantize, "--quantize")
    group_size = check_group_size(args.quantize_group_size, "--quantize-group-size")
    if quantize is None and group_size is not None:
        raise ValueError("--quantize-group-size: only with --quantize int8")
    return {"quantize": quantize, "quantize_group_size": group_size}


def evaluate(model: nn.Module, splits: assets.TextSplits, budget: Budget, desc: str) -> float:
    """Perplexity on the evaluation split: over every token of its windows, or for chat data over the
    completion tokens of its first eval_windows conversations (exp of their mean NLL)."""
    if isinstance(splits, assets.ChatSplits):
        return completion_perplexity(model, splits.eval_batch(budget.eval_windows, budget.eval_seq_len), desc=desc)
    windows = splits.eval_windows(budget.eval_windows, budget.eval_seq_len)
    return perplexity(model, windows, desc=desc)


def perplexity_scope(splits: assets.TextSplits) -> str:
    """What :func:`evaluate`'s perplexity averages over, for the reports."""
    return "completion tokens" if isinstance(splits, assets.ChatSplits) else "all tokens"


def prune(model: nn.Module, splits: assets.TextSplits, budget: Budget, seed: int = 0, progress: bool = True,
          factor_config: FactorSparsityConfig | None = None, **salr_options: Any) -> nn.Module:
    """Calibrate on the train pool and sparsify every decoder-block linear in place: SALR with the
    SALRConfig fields `salr_options` (ranks default to the budget's), SALOR with a `factor_config`.

    Seeds torch's global RNG first: the LoRA factors are initialized from it, so the same command gives
    the same run (and every torchrun rank builds the same model)."""
    torch.manual_seed(seed)
    calibration = splits.calibration_windows(budget.calib_windows, budget.calib_seq_len)
    config = SALRConfig(**{"svd_rank": budget.svd_rank, "lora_rank": budget.lora_rank, **salr_options})
    if factor_config is not None:
        config = SALORConfig.from_parts(config, factor_config)
    return sparsify_(model, config, calibration, progress=progress)


def finetune(model: nn.Module, splits: assets.TextSplits, budget: Budget, run_dir=None,
             resume: bool = False, teacher: nn.Module | None = None, **train_options: Any) -> list[dict]:
    """Train the adapters (whatever requires grad) on windows of the train pool (for chat data: its
    conversations, the loss on completion tokens only); a model with SALOR layers follows their mask
    schedule (update_all_masks after every step). With `teacher` (the dense model,
    :func:`salr.train.distill.frozen_teacher`) and distill_* options, the loss distils from it."""
    config = TrainConfig(steps=budget.train_steps, batch_size=budget.train_batch, lr=budget.lr,
                         warmup_steps=budget.warmup, **train_options)
    batches = splits.train_source(budget.train_seq_len, seed=config.seed)
    model.train()
    try:
        return train(model, batches, config, run_dir=run_dir, resume=resume,
                     on_step=update_all_masks if has_factor_masks(model) else None, teacher=teacher)
    finally:
        model.eval()


def losa_config(budget: Budget, sparsity: float, seed: int = 0, **options: Any) -> losa.LoSAConfig:
    """LoSA on the budget: its steps, rounds and optimizer settings, mean rank = the budget's LoRA rank,
    r_max 4× that, alpha 2× (SALR's LoRA scale); `options` override LoSAConfig fields (layerwise, ...)."""
    train_config = TrainConfig(steps=budget.train_steps, batch_size=budget.train_batch, lr=budget.lr,
                               warmup_steps=budget.warmup, seed=seed,
                               **{k: options.pop(k) for k in ("schedule", "grad_accum") if k in options})
    defaults = {"mean_rank": budget.lora_rank, "r_max": 4 * budget.lora_rank, "lora_alpha": 2.0 * budget.lora_rank,
                "rounds": budget.losa_rounds}
    return losa.LoSAConfig(sparsity=sparsity, total_steps=budget.train_steps, train=train_config,
                           **{**defaults, **options})


def run_losa(model: nn.Module, splits: assets.TextSplits, budget: Budget, config: losa.LoSAConfig,
             calib_windows: int | None = None, on_pruned=None) -> tuple[losa.LoSAReport, list[dict]]:
    """LoSA from the dense model in place (:func:`salr.losa.run` on `calib_windows` calibration windows,
    default ``budget.losa_calib_windows``), exported to plain sparse SALR layers; returns the report and
    the training history over all rounds (one step count, each entry with its round)."""
    calibration = splits.calibration_windows(calib_windows or budget.losa_calib_windows, budget.calib_seq_len)
    torch.manual_seed(config.train.seed)  # the LoRA factors are initialized from torch's global RNG
    report = losa.run(model, config, calibration, splits.train_source(budget.train_seq_len, seed=config.train.seed),
                      on_pruned=on_pruned)
    losa.export_salr(model)
    model.eval()
    history, done = [], 0
    for r in report.rounds:
        history += [{**h, "step": done + h["step"], "round": r.round} for h in r.history]
        done += r.steps
    return report, history


def merge_all(model: nn.Module) -> int:
    """Fold every trained LoRA into its layer's inference adapter; returns how many layers merged."""
    return merge_(model)


def adapter_quantize_option(args: argparse.Namespace) -> str | None:
    """--quantize-adapters, checked before the model loads: None or "int8"."""
    return check_quantize(args.quantize_adapters, "--quantize-adapters")


def quantize_merged_adapters(model: nn.Module, splits: assets.TextSplits, budget: Budget, stages: dict) -> None:
    """The merged adapters stored as int8 (salr.quantize_adapters_), and the model evaluated again as
    stage "int8 adapters"."""
    quantize_adapters_(model)
    stages["int8 adapters"] = {"perplexity": evaluate(model, splits, budget, "int8 adapters")}


@torch.no_grad()
def reload_matches(model: nn.Module, directory, splits: assets.TextSplits) -> tuple[nn.Module, float]:
    """Load the saved model back; returns it and the max |Δlogit| against the in-memory model."""
    reloaded = load_saved(directory)
    probe = splits.eval_windows(1, 64)
    diff = (model(input_ids=probe).logits - reloaded(input_ids=probe).logits).abs().max().item()
    return reloaded, diff


def _has_dtype(model: nn.Module, dtype: torch.dtype) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return all(t.dtype == dtype for t in tensors if t.is_floating_point())


def compare_speed(dense: nn.Module, sparse: nn.Module, tokenizer, budget: Budget,
                  dtype: torch.dtype | None = None) -> tuple[tuple[float, str], tuple[float, str]]:
    """((dense tokens/s, text), (sparse tokens/s, text)), measured alternately, one decode of each per
    round over ``budget.decode_repeats`` rounds, medians: a shared machine's load drifts over minutes,
    and alternating makes the drift hit both models alike (measuring dense at the start of a run and
    sparse at its end does not). With `dtype`, a model not already in it is measured on a cast copy."""
    models = [m if dtype is None or _has_dtype(m, dtype) else copy.deepcopy(m).to(dtype) for m in (dense, sparse)]
    runs: list[list] = [[], []]
    for _ in range(budget.decode_repeats):
        for model, results in zip(models, runs):
            results.append(decode_speed(model, tokenizer, PROMPT, budget.new_tokens, 1))
    return tuple((statistics.median(r.tokens_per_s for r in results), results[-1].text)  # type: ignore[return-value]
                 for results in runs)


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """Per converted layer: name, shape, sparsity, adapter ranks and compressed bytes."""
    rows = []
    for name, layer in salr_layers(model).items():
        rows.append({"layer": name, "shape": [layer.out_features, layer.in_features],
                     "sparsity": layer.sparsity, "svd_rank": layer.svd_rank, "lora_rank": layer.lora_rank,
                     "bytes": layer.compressed_bytes()})
    return rows


def dense_copy(model: nn.Module) -> nn.Module:
    """An untouched copy to compare against (conversion works in place)."""
    return copy.deepcopy(model)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start

"""The LoSA procedure: T rounds of (RMI layer-wise sparsity → prune the merged weight → error-based
ranks → fine-tune the masked LoRA), then one final merge into plain BM8x8 sparse layers.

Round t (t = 1..T) targets the mean sparsity s_t = S − S(1 − t/T)³:

1. **RMI**: the calibration windows run through the current model (LoRA included); every decoder
   block's input features feed a streaming linear CKA (one window's features of all blocks at a
   time); importance I = exp(−β·t̃) gives the per-block sparsity by the closed-form LP with
   |x_l − s_t| ≤ δ and x_l ≥ the block's current sparsity (masks only grow).
2. **Prune** (sequential, block by block, each block fed by the already-pruned ones): Wanda scores
   |W_eff|·‖X_j‖ on the *merged* weight W_eff = W_s + s·M⊙(BA), per output row, already-pruned
   entries first; the kept entries keep W_eff, i.e. the layer becomes M'⊙(W_s + s·BA). The LoRA
   factors stay (their trained directions carry over) instead of being folded in.
3. **Ranks**: E_l = per-feature-normalized error between the dense block (original weights) and
   the pruned block on the same inputs; r_l ∝ E_l in [1, r_max], Σ r_l = R̄·L; every linear of block
   l gets rank r_l (grow: fresh A rows, zero B columns; shrink: top directions kept, the rest merged).
4. **Fine-tune** the LoRA factors (everything else frozen) with :func:`salr.train.train` for the
   round's share of the steps.

After round T every layer is merged (``LoSALinear.merge``): a plain BM8x8 sparse model, no adapters.
Memory: one block boundary's activations (inputs, pruned outputs, dense outputs) plus a copy of the
targeted dense weights (for E_l), and one window of all blocks' features for the CKA.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

from salr.losa.config import LoSAConfig, LoSAReport, RoundReport
from salr.losa.layer import LoSALinear
from salr.losa.model import block_cka, block_sparsity, losa_layers, prune_pass, trainable_count
from salr.losa.ranks import allocate_ranks
from salr.losa.rmi import block_importance, layerwise_sparsity, sparsity_delta
from salr.losa.schedule import sparsity_schedule, split_steps
from salr.nn.models import block_linears, find_blocks, set_submodule, vocab_size
from salr.prune.calibration import check_calibration
from salr.prune.owl import owl_block_sparsity
from salr.train.loop import train


def run(model: nn.Module, config: LoSAConfig, calibration: Any, train_data: Any,
        eval_fn: Callable[[nn.Module], Any] | None = None,
        on_round: Callable[[int, nn.Module, RoundReport], None] | None = None,
        on_pruned: Callable[[int, nn.Module], None] | None = None) -> LoSAReport:
    """Apply LoSA to a causal LM in place (see the module docstring) and return the per-round report.

    calibration: token ids [n_windows, seq_len] (pruning statistics, CKA, reconstruction errors).
    train_data: what :func:`salr.train.train` accepts (a ``TokenWindows`` continues across rounds).
    eval_fn: passed to ``train`` (called at the end of every round's fine-tuning).
    on_round: ``on_round(t, model, report)`` after every round's fine-tuning (logging, checkpoints).
    on_pruned: ``on_pruned(t, model)`` after round t's pruning and rank change, before its fine-tuning
    (the demo evaluates the last round's freshly pruned model there).
    The model's targeted ``nn.Linear`` layers become :class:`LoSALinear`; every other parameter is
    frozen. With ``final_merge`` they end merged: plain BM8x8 sparse layers with rank 0.
    """
    if not isinstance(config, LoSAConfig):
        raise ValueError(f"config: expected a LoSAConfig, got {type(config).__name__}")
    ids = check_calibration(calibration, vocab_size(model))
    path, blocks = find_blocks(model)
    per_block = block_linears(model, config.targets)
    if any(not isinstance(lin, (nn.Linear, LoSALinear)) for _, lins in per_block for lin in lins.values()):
        raise ValueError("model: LoSA wraps nn.Linear layers; GPT-2 style Conv1D is not supported")
    model.requires_grad_(False)
    dense = {name: lin for _, lins in per_block for name, lin in lins.items() if isinstance(lin, nn.Linear)}
    if not dense:
        raise ValueError("model: no nn.Linear to adapt (already converted?)")
    owl = None
    if config.layerwise == "owl":  # measured once, on the dense model, as OWL prescribes
        owl = torch.tensor(owl_block_sparsity(model, ids, config.sparsity, m=config.owl_m, lam=config.owl_lambda,
                                              targets=config.targets, progress=config.progress), dtype=torch.float64)
    gen = torch.Generator().manual_seed(config.seed)
    for name, lin in dense.items():  # 0 % sparse at first; round 1 prunes
        set_submodule(model, name, LoSALinear.from_linear(lin, rank=0, scale=config.scale, masked=config.masked))
    names_by_block = [list(lins) for _, lins in per_block]
    targets = sparsity_schedule(config.sparsity, config.rounds)
    steps = (split_steps(config.total_steps, config.rounds, config.final_share) if config.total_steps
             else [0] * config.rounds)
    reports, trainable = [], []
    num_blocks = len(blocks)
    for t in range(1, config.rounds + 1):
        target = targets[t - 1]
        layers = losa_layers(model)
        current = torch.tensor([block_sparsity([layers[n] for n in names]) for names in names_by_block],
                               dtype=torch.float64)
        importance = cka = None
        if config.layerwise == "rmi":
            cka = block_cka(model, ids, config.cka_tokens, config.seed + t, config.progress)
            importance = block_importance(cka, config.beta)
            delta = config.delta if config.delta is not None else sparsity_delta(target)
            try:
                ratios = layerwise_sparsity(importance, target, delta, current, config.max_layer_sparsity)
            except ValueError as exc:  # masks only grow and the band cannot hold the mean: stay put
                warnings.warn(f"LoSA round {t}: {exc}; using max(target, current) per block", stacklevel=2)
                ratios = torch.clamp(current, min=target)
        elif owl is not None:
            # OWL's final ratios scaled to this round's target: the weighted mean is the round's target and
            # every block's ratio grows round by round (masks only grow), ending at OWL's ratios.
            ratios = torch.clamp(owl * (target / config.sparsity if config.sparsity else 0.0), min=current)
        else:
            ratios = torch.clamp(current, min=target)
        errors = prune_pass(model, ids, names_by_block, dense, ratios.tolist(), config.progress, t)
        if config.rank_allocation == "error":
            ranks = allocate_ranks(errors, config.mean_rank, config.r_max)
        else:
            ranks = [config.mean_rank] * num_blocks
        for names, rank in zip(names_by_block, ranks):
            for name in names:
                layers[name].resize_rank(rank, generator=gen)
        trainable.append(trainable_count(model))
        if on_pruned is not None:
            on_pruned(t, model)
        first = last = None
        history: list[dict[str, Any]] = []
        if steps[t - 1] > 0:
            round_cfg = dataclasses.replace(config.train, steps=steps[t - 1], seed=config.train.seed + t,
                                            warmup_steps=round_warmup(config.train.warmup_steps, steps[t - 1],
                                                                      config.total_steps))
            history = train(model, train_data, round_cfg, run_dir=None, eval_fn=eval_fn, resume=False)
            first, last = history[0]["loss"], history[-1]["loss"]
        layers = losa_layers(model)
        reports.append(RoundReport(
            round=t, target=target,
            block_sparsity=[block_sparsity([layers[n] for n in names]) for names in names_by_block],
            ranks=list(ranks), errors=list(errors),
            importance=importance.tolist() if importance is not None else None,
            cka=cka.tolist() if cka is not None else None, steps=steps[t - 1], first_loss=first, last_loss=last,
            history=history))
        if on_round is not None:
            on_round(t, model, reports[-1])
    layers = losa_layers(model)
    if config.final_merge:
        for layer in layers.values():
            layer.merge()
    final = block_sparsity(list(layers.values()))
    return LoSAReport(config.to_dict(), reports, final, trainable)


def round_warmup(warmup_steps: int, round_steps: int, total_steps: int) -> int:
    """A round's share of the run's warmup: proportional to its steps, at least 1 when there is any
    warmup, at most the round's steps."""
    if warmup_steps <= 0:
        return 0
    return min(round_steps, max(1, int(math.floor(warmup_steps * round_steps / total_steps + 0.5))))

"""LoSA's model-level pieces: the block CKA pass (RMI), the Wanda pruning pass on the merged weights
with the per-block reconstruction error, layer discovery, and the export to plain SALR layers.
:mod:`salr.losa.rounds` runs them round by round.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from salr._checks import check_module
from salr.losa.layer import LoSALinear
from salr.losa.ranks import ErrorAccumulator
from salr.losa.rmi import StreamingCKA
from salr.methods.salr.layer import SALRLinear
from salr.nn.models import find_blocks, layers_of, model_device, set_submodule, vocab_size
from salr.prune.calibration import LinearStats, block_output, check_calibration, run_sequential
from salr.prune.criteria import wanda_scores
from salr.prune.masks import count, prune_smallest


class _StopForward(Exception):
    """Raised after the last block in the CKA pass: the final norm and LM head need not run."""


@torch.no_grad()
def block_cka(model: nn.Module, calibration: torch.Tensor, cka_tokens: int | None = 256, seed: int = 0,
              progress: bool = True) -> torch.Tensor:
    """Streaming linear CKA [L, L] between the decoder blocks' input features, one window at a time."""
    check_calibration(calibration, vocab_size(model), name="calibration")
    _, blocks = find_blocks(model)
    device = model_device(model)
    feats: list[torch.Tensor | None] = [None] * len(blocks)

    def pre_hook(index):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            feats[index] = hidden.detach().reshape(-1, hidden.shape[-1])
        return hook

    def stop(_module, _args, _out):
        raise _StopForward

    handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(stop))
    cka = StreamingCKA(len(blocks), cka_tokens, seed)
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(calibration.shape[0]), desc="LoSA: block CKA", unit="window", disable=not progress,
                      leave=False):
            with contextlib.suppress(_StopForward):
                model(input_ids=calibration[i:i + 1].to(device), use_cache=False)
            cka.update(feats)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return cka.matrix()


def wanda_keep(weight: torch.Tensor, column_norms: torch.Tensor, sparsity: float,
               current: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask pruning round(sparsity·K) entries per output row by Wanda's score |W|·‖X_j‖
    (:func:`salr.prune.criteria.wanda_scores`); entries outside ``current`` are pruned first, so the
    result lies inside it (masks only grow)."""
    if weight.dim() != 2 or column_norms.shape != (weight.shape[1],):
        raise ValueError(f"column_norms: need one norm per column of the [N, K] weight, got {tuple(column_norms.shape)} "
                         f"for {tuple(weight.shape)}")
    scores = wanda_scores(weight, column_norms)
    if current is not None:
        scores = scores.masked_fill(~current, -1.0)  # below every real score (scores are >= 0)
    k = weight.shape[1]
    keep = prune_smallest(scores, min(k, count(sparsity, k)), dim=1)
    if current is not None:
        keep &= current
    return keep


@contextlib.contextmanager
def _dense_swap(model: nn.Module, dense: dict[str, nn.Linear]):
    """Temporarily put the original dense linears back (for the reconstruction error)."""
    saved = {name: model.get_submodule(name) for name in dense}
    try:
        for name, lin in dense.items():
            set_submodule(model, name, lin)
        yield
    finally:
        for name, mod in saved.items():
            set_submodule(model, name, mod)


def losa_layers(model: nn.Module) -> dict[str, LoSALinear]:
    """Every LoSALinear of `model` by qualified name."""
    return layers_of(model, LoSALinear)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def block_sparsity(layers: Sequence[LoSALinear]) -> float:
    total = sum(m.out_features * m.in_features for m in layers)
    return 1.0 - sum(m.nnz for m in layers) / max(1, total)


@torch.no_grad()
def prune_pass(model: nn.Module, ids: torch.Tensor, names_by_block: list[list[str]], dense: dict[str, nn.Linear],
               ratios: list[float], progress: bool, round_index: int) -> list[float]:
    """Sequential calibration (:func:`salr.prune.calibration.run_sequential`): per block, Wanda-prune
    its LoSALinears at the block's ratio on the merged weight, then measure E_l (dense vs pruned
    block, same inputs). Returns [E_l]."""
    errors: list[float] = []

    def prune_block(index: int, _block: nn.Module, layers: dict[str, nn.Module],
                    stats: dict[str, LinearStats]) -> None:
        for name, layer in layers.items():
            keep = wanda_keep(layer.effective_weight(), stats[name].column_norms(), ratios[index], layer.mask())
            layer.apply_mask(keep)

    def measure(index: int, block: nn.Module, inputs: torch.Tensor, outputs: torch.Tensor, extras: list) -> None:
        acc = ErrorAccumulator()
        with _dense_swap(model, {n: dense[n] for n in names_by_block[index]}):
            for i, (args, kwargs) in enumerate(extras):
                acc.add(block_output(block(inputs[i:i + 1], *args, **kwargs)), outputs[i:i + 1])
        errors.append(acc.value())

    layers = [(index, {n: model.get_submodule(n) for n in names}) for index, names in enumerate(names_by_block)]
    run_sequential(model, ids, prune_block, progress=progress, desc=f"LoSA round {round_index}: prune",
                   layers=layers, after_block=measure)
    return errors


@torch.no_grad()
def export_salr(model: nn.Module) -> int:
    """Replace every merged (rank-0) :class:`LoSALinear` by an adapter-free ``SALRLinear`` holding the
    same bitmap, values and offsets (no re-encode: bit for bit), so the model goes through
    ``salr.save`` / ``salr.load``, generation and the CLI like any salr model. Returns the count.
    ValueError for a layer that still has an adapter (call ``merge()`` or run with final_merge)."""
    check_module(model)
    layers = losa_layers(model)
    unmerged = [name for name, m in layers.items() if m.rank > 0]
    if unmerged:
        raise ValueError(f"model: {len(unmerged)} LoSALinear layers still have adapters (first: {unmerged[0]}); "
                         f"merge them before exporting")
    for name, m in layers.items():
        out = SALRLinear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.values.dtype,
                         device=m.values.device)
        out.bitmap, out.values, out.offsets = m.bitmap.clone(), m.values.detach().clone(), m.offsets.clone()
        if m.bias is not None:
            out.bias.copy_(m.bias.detach())
        set_submodule(model, name, out)
    return len(layers)

"""Pruning criteria for one weight matrix: magnitude, Wanda, SparseGPT; unstructured or N:M.

All functions see a weight as W [out_features N, in_features K] (the nn.Linear layout) and return a
keep-mask (True = weight survives) with exactly the requested sparsity in every comparison group
(the groups and counts are in :mod:`salr.prune.masks`).

Scores (from the papers' descriptions):

* magnitude: ``|W_ij|``;
* Wanda (Sun et al., 2023): ``|W_ij|·‖X_j‖₂`` with ‖X_j‖₂ the norm of input feature j over all
  calibration tokens;
* SparseGPT (Frantar & Alistarh, 2023) is not a score but a reconstruction: see :mod:`salr.prune.sparsegpt`.
"""

from __future__ import annotations

from typing import Any

import torch

from salr._checks import check_tensor
from salr.prune.masks import GROUPS, check_nm_width, mask_from_scores, parse_pattern, resolve_sparsity
from salr.prune.quantize import check_group_size, quantize_int8
from salr.prune.sparsegpt import sparsegpt_prune, sparsegpt_quantize

CRITERIA = ("magnitude", "wanda", "sparsegpt")
# Each criterion's comparison group as its paper uses it: magnitude per layer (the baseline of the
# Wanda and SparseGPT papers), Wanda per output row, SparseGPT per 128-column block of all rows.
DEFAULT_GROUP = {"magnitude": "layer", "wanda": "row", "sparsegpt": "layer"}


def check_criterion(criterion: Any) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"criterion: unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    return criterion


def resolve_group(group: Any, criterion: str, pattern: Any) -> str:
    """The comparison group: the criterion's default for None; must be None for an N:M pattern."""
    if pattern is not None:
        if group is not None:
            raise ValueError(f"group: an N:M pattern ({pattern!r}) compares within its groups of M; "
                             f"group must be None, got {group!r}")
        return "nm"
    if group is None:
        return DEFAULT_GROUP[check_criterion(criterion)]
    if group not in GROUPS:
        raise ValueError(f"group: expected one of {', '.join(GROUPS)} (or None for the criterion's default), "
                         f"got {group!r}")
    return group


# ---------------------------------------------------------------------------------------- scores

def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    check_tensor(weight, "weight", dim=2)
    return weight.detach().float().abs()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W_ij|·‖X_j‖₂ (input_norms: [K], the per-input-feature norms over calibration tokens)."""
    if input_norms is None:
        raise ValueError("input_norms: Wanda needs the per-input activation norms from calibration data")
    if input_norms.shape != (weight.shape[1],):
        raise ValueError(f"input_norms: expected shape ({weight.shape[1]},) for a weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(input_norms.shape)}")
    return weight.detach().float().abs() * input_norms.to(weight.device).float().unsqueeze(0)


def prune_weight(weight: torch.Tensor, criterion: str, sparsity: float | None, *, pattern: Any = None,
                 group: str | None = None, input_norms: torch.Tensor | None = None,
                 hessian: torch.Tensor | None = None, blocksize: int = 128,
                 damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one [N, K] weight; returns ``(pruned weight in fp32, keep-mask)``.

    magnitude needs nothing, Wanda needs `input_norms` ([K]), SparseGPT needs `hessian` ([K, K],
    ``2/n·XᵀX``) and also updates the surviving weights. The weight itself is not modified.
    """
    criterion = check_criterion(criterion)
    s = resolve_sparsity(sparsity, pattern)
    nm = parse_pattern(pattern)
    grp = resolve_group(group, criterion, pattern)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [out_features, in_features] tensor, got {tuple(weight.shape)}")
    check_nm_width(weight.shape[1], nm)
    if criterion == "sparsegpt":
        if hessian is None:
            raise ValueError("hessian: SparseGPT needs the layer's input Hessian from calibration data")
        return sparsegpt_prune(weight, hessian, s, nm=nm, group=grp, blocksize=blocksize, damping=damping)
    scores = magnitude_scores(weight) if criterion == "magnitude" else wanda_scores(weight, input_norms)
    keep = mask_from_scores(scores, s, grp, nm)
    w = weight.detach().float()
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device)), keep


def prune_weight_int8(weight: torch.Tensor, criterion: str, sparsity: float | None, *, group_size: int | None = None,
                      pattern: Any = None, group: str | None = None, input_norms: torch.Tensor | None = None,
                      hessian: torch.Tensor | None = None, blocksize: int = 128,
                      damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one [N, K] weight and quantize it to int8 (:mod:`salr.prune.quantize`): returns
    ``(q int8 [N, K], scales fp32 [N] or [N, ceil(K/64)])``; the nonzeros of q are the mask.

    SparseGPT folds the quantization into its column loop
    (:func:`salr.prune.sparsegpt.sparsegpt_quantize`); magnitude and Wanda prune, then round to
    nearest. Arguments as :func:`prune_weight`; `group_size` None (per row) or 64.
    """
    check_group_size(group_size, "group_size")
    if check_criterion(criterion) != "sparsegpt":
        pruned, _ = prune_weight(weight, criterion, sparsity, pattern=pattern, group=group, input_norms=input_norms)
        return quantize_int8(pruned, group_size)
    if hessian is None:
        raise ValueError("hessian: SparseGPT needs the layer's input Hessian from calibration data")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D [out_features, in_features] tensor, got {tuple(weight.shape)}")
    nm = parse_pattern(pattern)
    check_nm_width(weight.shape[1], nm)
    q, scales, _ = sparsegpt_quantize(weight, hessian, resolve_sparsity(sparsity, pattern), nm=nm,
                                      group=resolve_group(group, criterion, pattern), blocksize=blocksize,
                                      damping=damping, group_size=group_size)
    return q, scales

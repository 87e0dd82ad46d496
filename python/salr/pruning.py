"""Pruning criteria for one weight matrix: magnitude, Wanda, SparseGPT; unstructured or N:M.

All functions see a weight as W [out_features N, in_features K] (the nn.Linear layout) and return a
keep-mask (True = weight survives) with exactly the requested sparsity in every comparison group:

* unstructured, ``group="row"``: every output row loses ``round(s·K)`` weights (Wanda's
  per-output comparison group);
* unstructured, ``group="layer"``: the whole matrix loses ``round(s·N·K)`` weights;
* ``pattern="N:M"``: in every run of M consecutive inputs of a row, exactly N survive (2:4, 4:8);
  the sparsity is then 1 − N/M (a contradicting ratio is an error).

Scores (from the papers' descriptions):

* magnitude: ``|W_ij|``;
* Wanda (Sun et al., 2023): ``|W_ij|·‖X_j‖₂`` with ‖X_j‖₂ the norm of input feature j over all
  calibration tokens;
* SparseGPT (Frantar & Alistarh, 2023) is not a score but a reconstruction: see :mod:`salr.sparsegpt`.

Rounding: ``round(x)`` is round-half-up, ``floor(x + 0.5)``, so the counts never depend on banker's
rounding.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from salr._checks import check_fraction, check_int, check_tensor

CRITERIA = ("magnitude", "wanda", "sparsegpt")
GROUPS = ("row", "layer")
# Each criterion's comparison group as its paper uses it: magnitude per layer (the baseline of the
# Wanda and SparseGPT papers), Wanda per output row, SparseGPT per 128-column block of all rows.
DEFAULT_GROUP = {"magnitude": "layer", "wanda": "row", "sparsegpt": "layer"}


def count(fraction: float, size: int) -> int:
    """round-half-up(fraction·size): how many of `size` weights a ratio prunes."""
    check_fraction(fraction, "fraction")
    check_int(size, "size")
    return int(math.floor(fraction * size + 0.5))


def parse_pattern(pattern: Any, name: str = "pattern") -> tuple[int, int] | None:
    """None -> None; "N:M" -> (N, M) with 0 < N < M. ValueError naming the argument `name` otherwise."""
    if pattern is None:
        return None
    if isinstance(pattern, (tuple, list)) and len(pattern) == 2:
        n, m = pattern
    elif isinstance(pattern, str):
        try:
            n, m = (int(p) for p in pattern.split(":"))
        except ValueError:
            raise ValueError(f"{name}: expected 'N:M' such as '2:4' or '4:8', got {pattern!r}") from None
    else:
        raise ValueError(f"{name}: expected None or 'N:M' such as '2:4', got {pattern!r}")
    if not (isinstance(n, int) and isinstance(m, int)) or not 0 < n < m:
        raise ValueError(f"{name}: {pattern!r} needs 0 < N < M (N weights kept out of every M), "
                         f"got N={n}, M={m}")
    return n, m


def check_sparsity(sparsity: Any, name: str = "sparsity") -> float:
    """A float in [0, 1); ValueError naming `name` otherwise."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise ValueError(f"{name}: expected a number in [0, 1), got {sparsity!r}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"{name}: must be in [0, 1) (the fraction of weights removed), got {sparsity!r}")
    return float(sparsity)


def resolve_sparsity(sparsity: Any, pattern: Any, names: tuple[str, str] = ("sparsity", "pattern")) -> float:
    """The ratio a (sparsity, pattern) pair means; None takes it from the pattern.

    ValueError when the ratio is out of [0, 1) or contradicts the N:M pattern; `names` are the
    arguments the messages name (e.g. ("factor_sparsity", "factor_pattern") for SALOR).
    """
    sparsity_name, pattern_name = names
    nm = parse_pattern(pattern, pattern_name)
    if sparsity is None:
        if nm is None:
            raise ValueError(f"{sparsity_name}: required without an N:M {pattern_name}")
        return 1.0 - nm[0] / nm[1]
    s = check_sparsity(sparsity, sparsity_name)
    if nm is not None and not math.isclose(s, 1.0 - nm[0] / nm[1], abs_tol=1e-9):
        raise ValueError(f"{sparsity_name}: {pattern_name} {pattern!r} keeps {nm[0]} of every {nm[1]} weights "
                         f"(sparsity {1 - nm[0] / nm[1]:g}), which contradicts {sparsity_name}={s:g}")
    return s


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


def check_nm_width(in_features: int, nm: tuple[int, int] | None, what: str = "weight") -> None:
    if nm is not None and in_features % nm[1]:
        raise ValueError(f"pattern: {nm[0]}:{nm[1]} needs the in_features of every pruned layer to be a multiple "
                         f"of {nm[1]}, but {what} has in_features={in_features}")


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


# ----------------------------------------------------------------------------------------- masks

def _prune_smallest(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Keep-mask that drops the k smallest scores along `dim` (exactly k per slice)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        drop = torch.topk(scores, k, dim=dim, largest=False).indices
        keep.scatter_(dim, drop, False)
    return keep


def mask_from_scores(scores: torch.Tensor, sparsity: float, group: str = "row",
                     nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Keep-mask [N, K] removing the lowest scores: per row, per layer, or N:M along K."""
    rows, cols = scores.shape
    if nm is not None:
        n, m = nm
        check_nm_width(cols, nm)
        return _prune_smallest(scores.reshape(rows, cols // m, m), m - n, dim=2).reshape(rows, cols)
    if group == "row":
        return _prune_smallest(scores, count(sparsity, cols), dim=1)
    if group == "layer":
        return _prune_smallest(scores.reshape(-1), count(sparsity, rows * cols), dim=0).reshape(rows, cols)
    raise ValueError(f"group: expected 'row' or 'layer', got {group!r}")


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
        from salr.sparsegpt import sparsegpt_prune
        if hessian is None:
            raise ValueError("hessian: SparseGPT needs the layer's input Hessian from calibration data")
        return sparsegpt_prune(weight, hessian, s, nm=nm, group=grp, blocksize=blocksize, damping=damping)
    scores = magnitude_scores(weight) if criterion == "magnitude" else wanda_scores(weight, input_norms)
    keep = mask_from_scores(scores, s, grp, nm)
    w = weight.detach().float()
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device)), keep


def mask_sparsity(keep: torch.Tensor) -> float:
    """Fraction of pruned entries of a keep-mask."""
    if check_tensor(keep, "keep").dtype != torch.bool:
        raise ValueError(f"keep: must be a bool mask, got dtype {keep.dtype}")
    return 1.0 - keep.float().mean().item()

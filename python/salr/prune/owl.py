"""OWL layer-wise sparsity (Outlier-Weighted Layerwise sparsity, Yin et al., 2023).

Blocks whose weights see more activation outliers keep more of them. From one calibration pass over
the dense model (:func:`salr.prune.calibration.run_sequential` with a callback that only measures):

1. per target linear, the Wanda scores ``A_ij = |W_ij|·‖X_j‖₂``; an *outlier* is a score above
   ``M ×`` the layer's mean score; a block's layer outlier distribution (LOD) is its outlier count
   over its weight count (all its target linears together);
2. the LODs are min-max normalized to u_b ∈ [−1, 1], and ``s_b = target − λ·(u_b − ū)`` (ū the
   parameter-weighted mean), so more outliers -> lower sparsity;
3. every s_b is clipped to ``[max(0, target − λ), target + λ]`` and a common shift (found by
   bisection) brings the parameter-weighted mean back to the target, so the model's global sparsity
   stays the target (up to the per-row count rounding of the masks).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

from salr._checks import check_tensor
from salr.nn.models import weight_view
from salr.prune.calibration import LinearStats, run_sequential
from salr.prune.criteria import wanda_scores

LAYERWISE = ("uniform", "owl")
DEFAULT_M = 5.0
DEFAULT_LAMBDA = 0.08


def check_owl_params(target: Any, m: Any, lam: Any, where: str = "owl") -> tuple[float, float, float]:
    """(target, M, λ) as floats; ValueError naming the bad one (`where` prefixes the names)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise ValueError(f"{where}: sparsity must be one target number in [0, 1), got {target!r}")
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not (math.isfinite(m) and m > 0):
        raise ValueError(f"{where}: owl_m must be a finite number > 0 (the outlier threshold as a multiple "
                         f"of the mean score), got {m!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"{where}: owl_lambda must be a finite number >= 0, got {lam!r}")
    if target + lam >= 1.0:
        raise ValueError(f"{where}: owl_lambda: target + owl_lambda must stay below 1 (no block may be "
                         f"fully pruned), got {target} + {lam}")
    return float(target), float(m), float(lam)


def outlier_count(scores: torch.Tensor, m: float) -> int:
    """How many entries of `scores` exceed `m` × their mean."""
    check_tensor(scores, "outlier_count: scores")
    if scores.numel() == 0:
        raise ValueError("outlier_count: scores is empty")
    _, m, _ = check_owl_params(0.0, m, 0.0, "outlier_count")
    return int((scores > m * scores.mean()).sum())


@torch.no_grad()
def block_outlier_ratios(model: nn.Module, calibration: Any, *, m: float = DEFAULT_M,
                         targets: Sequence[str] | None = None,
                         progress: bool = True) -> tuple[list[float], list[int]]:
    """Per decoder block (in order): (LOD, the block's target weight count), measured on the model
    as it is (one sequential calibration pass that changes nothing)."""
    _, m, _ = check_owl_params(0.0, m, 0.0, "block_outlier_ratios")
    lods, sizes = [], []

    def measure(_index: int, _block: nn.Module, linears: dict[str, nn.Module],
                stats: dict[str, LinearStats]) -> None:
        outliers = weights = 0
        for name, lin in linears.items():
            scores = wanda_scores(weight_view(lin), stats[name].column_norms())
            outliers += outlier_count(scores, m)
            weights += scores.numel()
        lods.append(outliers / weights if weights else 0.0)
        sizes.append(weights)

    run_sequential(model, calibration, measure, targets=targets, progress=progress, desc="OWL: outliers")
    return lods, sizes


def owl_ratios(lods: Sequence[float], sizes: Sequence[int], target: float,
               lam: float = DEFAULT_LAMBDA) -> tuple[float, ...]:
    """The per-block sparsities of OWL for outlier ratios `lods` and block weight counts `sizes`
    (see the module doc): within ``[max(0, target − λ), target + λ]``, weighted mean = target."""
    target, _, lam = check_owl_params(target, DEFAULT_M, lam, "owl_ratios")
    if len(lods) != len(sizes) or not lods:
        raise ValueError(f"owl_ratios: lods and sizes need one entry per block, got {len(lods)} and {len(sizes)}")
    if any(s <= 0 for s in sizes):
        raise ValueError(f"owl_ratios: sizes must be positive weight counts, got {list(sizes)}")
    lod = torch.tensor(lods, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    w = w / w.sum()
    spread = float(lod.max() - lod.min())
    if spread == 0.0 or lam == 0.0:
        return tuple(target for _ in lods)
    u = 2.0 * (lod - lod.min()) / spread - 1.0
    raw = target - lam * (u - (w * u).sum())
    return clipped_at_mean(raw, w, target, max(0.0, target - lam), target + lam)


def clipped_at_mean(raw: torch.Tensor, weights: torch.Tensor, target: float, lo: float, hi: float) -> tuple[float, ...]:
    """``clamp(raw + c, lo, hi)`` with the common shift c that makes its `weights`-weighted mean `target`
    (weights summing to 1, lo <= target <= hi): ratios moved apart, the global sparsity kept."""
    if not (isinstance(raw, torch.Tensor) and isinstance(weights, torch.Tensor) and raw.dim() == 1
            and weights.shape == raw.shape and raw.numel() > 0):
        raise ValueError("clipped_at_mean: raw and weights must be 1-D tensors of one non-zero length")
    if not lo <= target <= hi:
        raise ValueError(f"clipped_at_mean: target must lie in [lo, hi] = [{lo}, {hi}], got {target}")

    def mean_at(shift: float) -> float:
        return float((weights * (raw + shift).clamp(lo, hi)).sum())

    # The weighted mean of the clipped ratios rises monotonically with the shift: bisect for the target.
    a, b = lo - float(raw.max()), hi - float(raw.min())
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mean_at(mid) < target:
            a = mid
        else:
            b = mid
    return tuple(float(v) for v in (raw + 0.5 * (a + b)).clamp(lo, hi))


def owl_block_sparsity(model: nn.Module, calibration: Any, target: float, *, m: float = DEFAULT_M,
                       lam: float = DEFAULT_LAMBDA, targets: Sequence[str] | None = None,
                       progress: bool = True) -> tuple[float, ...]:
    """OWL's per-block sparsities for `model` at global `target` (module doc)."""
    target, m, lam = check_owl_params(target, m, lam, "owl_block_sparsity")
    lods, sizes = block_outlier_ratios(model, calibration, m=m, targets=targets, progress=progress)
    return owl_ratios(lods, sizes, target, lam)

"""Keep-masks with exact counts, and the checks of the ratio / pattern settings every method shares.

A keep-mask is True where a weight survives. Counts are exact in every comparison group:

* unstructured, ``group="row"``: every output row loses ``round(s·K)`` weights;
* unstructured, ``group="layer"``: the whole matrix loses ``round(s·N·K)`` weights;
* ``pattern="N:M"``: in every run of M consecutive inputs of a row, exactly N survive (2:4, 4:8);
  the sparsity is then 1 − N/M (a contradicting ratio is an error).

Rounding: ``round(x)`` is round-half-up, ``floor(x + 0.5)``, so the counts never depend on banker's
rounding. The criteria that produce the scores are in :mod:`salr.prune.criteria`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from salr._checks import check_fraction, check_int, check_tensor

GROUPS = ("row", "layer")


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


def check_nm_width(in_features: int, nm: tuple[int, int] | None, what: str = "weight") -> None:
    if nm is not None and in_features % nm[1]:
        raise ValueError(f"pattern: {nm[0]}:{nm[1]} needs the in_features of every pruned layer to be a multiple "
                         f"of {nm[1]}, but {what} has in_features={in_features}")


def prune_smallest(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Keep-mask that drops the k smallest scores along `dim` (exactly k per slice)."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= scores.shape[dim]:
        raise ValueError(f"k: must be in [0, {scores.shape[dim]}] (the entries along dim {dim}), got {k!r}")
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
        return prune_smallest(scores.reshape(rows, cols // m, m), m - n, dim=2).reshape(rows, cols)
    if group == "row":
        return prune_smallest(scores, count(sparsity, cols), dim=1)
    if group == "layer":
        return prune_smallest(scores.reshape(-1), count(sparsity, rows * cols), dim=0).reshape(rows, cols)
    raise ValueError(f"group: expected 'row' or 'layer', got {group!r}")


def mask_sparsity(keep: torch.Tensor) -> float:
    """Fraction of pruned entries of a keep-mask."""
    if check_tensor(keep, "keep").dtype != torch.bool:
        raise ValueError(f"keep: must be a bool mask, got dtype {keep.dtype}")
    return 1.0 - keep.float().mean().item()

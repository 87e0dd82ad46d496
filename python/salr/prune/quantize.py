"""Symmetric int8 quantization of a pruned weight (issue 21): W ≈ scales · q, q ∈ [−127, 127].

* Scales are fp32, one per output row ([N]) or one per row and 64-column group ([N, ceil(K/64)],
  ``group_size=64``: the groups of the BM8x8 offsets, so a kernel applies one scale per group it
  walks). scale = max|w| / 127 over the row (group); an all-zero row (group) gets scale 1.
* Rounding: round to nearest (ties to even, as torch.round), clamped to ±127. A survivor (w ≠ 0)
  that rounds to 0 is stored as ±1 (its sign), so the bitmap of q is still the pruning mask: pruning
  decides which weights are zero, quantization never does. A weight that is exactly 0 stays 0.
* Round-to-nearest after pruning is :func:`quantize_int8`. The variant folded into SparseGPT's
  column loop (the OBS update absorbs each column's quantization error, as GPTQ does) rounds with
  :func:`round_to_grid` inside :func:`salr.prune.sparsegpt.sparsegpt_prune`, on scales chosen from
  the dense weight beforehand (:func:`int8_scales`).
"""

from __future__ import annotations

from typing import Any

import torch

from salr._checks import check_tensor
from salr.ops import reference
from salr.ops.format import GROUP_SIZE, check_scales, column_scales

QUANTIZE_MODES = ("int8",)
QMAX = 127


def check_quantize(value: Any, name: str = "quantize") -> str | None:
    """None (values keep their float dtype) or "int8"; ValueError naming `name` otherwise."""
    if value is not None and value not in QUANTIZE_MODES:
        raise ValueError(f"{name}: expected None or one of {', '.join(QUANTIZE_MODES)}, got {value!r}")
    return value


def check_group_size(value: Any, name: str = "quantize_group_size") -> int | None:
    """None (one scale per output row) or 64 (one per row and 64-column group)."""
    if value is not None and (isinstance(value, bool) or value != GROUP_SIZE):
        raise ValueError(f"{name}: expected None (per output row) or {GROUP_SIZE} (per 64-column group), "
                         f"got {value!r}")
    return value


def _check_weight(weight: Any) -> torch.Tensor:
    check_tensor(weight, "weight", dim=2)
    if not weight.is_floating_point():
        raise ValueError(f"weight: expected a float tensor, got {weight.dtype}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight: contains NaN or inf; cannot quantize")
    return weight.detach().float()


def int8_scales(weight: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """fp32 scales max|w| / 127 per row ([N]) or per row and 64-column group ([N, ceil(K/64)]);
    1 where the row (group) is all zero. Always > 0 and finite."""
    w = _check_weight(weight).abs()
    group_size = check_group_size(group_size, "group_size")
    if group_size is None:
        amax = w.amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    else:
        padded = w.new_zeros(w.shape[0], reference.groups_per_band(w.shape[1]) * GROUP_SIZE)
        padded[:, :w.shape[1]] = w
        amax = padded.view(w.shape[0], -1, GROUP_SIZE).amax(dim=2)
    scales = (amax / QMAX).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where(amax > 0, scales, torch.ones_like(scales)).contiguous()


def round_to_grid(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q = round(w / scales) clamped to ±127 as floats, survivors that round to 0 kept as ±1 (see
    the module doc); `scales` broadcasts against `w`."""
    check_tensor(w, "w")
    check_tensor(scales, "scales")
    q = torch.round(w / scales).clamp_(-QMAX, QMAX)
    return torch.where((q == 0) & (w != 0), torch.sign(w), q)


def quantize_to_grid(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 q [N, K] of `weight` on the grid of `scales` ([N] or [N, ceil(K/64)])."""
    w = _check_weight(weight)
    check_scales(scales, *w.shape)
    return round_to_grid(w, column_scales(scales.to(w.device), w.shape[1])).to(torch.int8)


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """scales · q as fp32 [N, K] (the weight the int8 kernels multiply by)."""
    check_tensor(q, "q", dim=2)
    if q.dtype != torch.int8:
        raise ValueError(f"q: expected int8, got {q.dtype}")
    check_scales(scales, *q.shape)
    return reference.dequantize(q, scales.to(q.device), torch.float32)


def quantize_adapter_int8(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A low-rank adapter B·A (a [R, K], b [N, R]) as int8 for sparse_lowrank_gemm's adapter_scales:
    ``(q_a int8 [R, K], q_b int8 [N, R], b_scales fp32 [N])`` with B·A ≈ diag(b_scales)·q_b·q_a. A's
    rows get their own grid (scale s_r); s_r is folded into B's column r before B is put on a grid per
    row, so the product needs one scale per output row only. Plain round to nearest: the factors are
    dense (no mask to keep)."""
    check_tensor(a, "a", dim=2)
    check_tensor(b, "b", dim=2)
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64) or b.dtype != a.dtype:
        raise ValueError(f"quantize_adapter_int8: a and b must share a float dtype, got {a.dtype} and {b.dtype}")
    if b.shape[1] != a.shape[0]:
        raise ValueError(f"quantize_adapter_int8: b must have shape [N, {a.shape[0]}] to match a, got {tuple(b.shape)}")
    a32, b32 = a.detach().float(), b.detach().float()
    if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
        raise ValueError("quantize_adapter_int8: a and b must be finite")
    a_scales = int8_scales(a32)
    q_a = torch.round(a32 / a_scales[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    folded = b32 * a_scales[None, :]
    b_scales = int8_scales(folded)
    q_b = torch.round(folded / b_scales[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return q_a.contiguous(), q_b.contiguous(), b_scales


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest int8 of a pruned [N, K] weight: ``(q int8 [N, K], scales fp32)``; the
    nonzeros of q are exactly the nonzeros of `weight`."""
    scales = int8_scales(weight, group_size)
    return quantize_to_grid(weight, scales), scales

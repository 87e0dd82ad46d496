"""SALOR: sparsity on the low-rank factors themselves (A: r×K, B: N×r).

Each factor carries a mask. The masks are recomputed by magnitude on a cubic schedule from 0 to the
target (gradual magnitude pruning), then frozen; a pruned entry never comes back (masks are
computed on the already-masked factor, where pruned entries are exactly zero and rank last).
Structured option "N:M": in every group of M consecutive entries along the last dimension (K for
A, r for B) at most N survive; during the ramp the number pruned per group grows with the schedule,
so the final masks are exactly N:M.

Gradients reach only surviving entries (the forward uses factor ⊙ mask) and the raw parameters are
re-zeroed at masked positions before every forward, so optimizer momentum cannot revive them.
For inference the masked factors are stored in BM8x8 and applied with the same sparse kernel as
the base: T = x·Aᵀ (A sparse), then T·Bᵀ (B sparse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from salr._checks import check_fraction, check_int, check_module
from salr.format import BitmapSparseWeight


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); None -> None. ValueError for anything else or N >= M."""
    if pattern is None:
        return None
    try:
        n, m = (int(p) for p in pattern.split(":"))
    except ValueError:
        raise ValueError(f"factor pattern must look like 'N:M' (e.g. '2:4'), got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"factor pattern {pattern!r}: need 0 < N < M (N kept out of every M)")
    return n, m


@dataclass(frozen=True)
class FactorSparsityConfig:
    """Target sparsity of the LoRA factors and when it is reached.

    sparsity: fraction of zeros in each factor at the end, in [0, 1). With a pattern it must equal
        1 − N/M (a contradiction is an error).
    pattern: None (unstructured magnitude) or "N:M" along K for A and along r for B.
    start_step / end_step: the cubic ramp s_t = S·(1 − (1 − t)³), t = (step − start)/(end − start);
        masks are frozen from end_step on.
    update_every: recompute masks every this many steps during the ramp.
    """

    sparsity: float
    pattern: str | None = None
    start_step: int = 0
    end_step: int = 0
    update_every: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"FactorSparsityConfig.sparsity must be in [0, 1), got {self.sparsity!r}")
        nm = parse_pattern(self.pattern)
        if nm is not None and not math.isclose(self.sparsity, 1 - nm[0] / nm[1], abs_tol=1e-9):
            raise ValueError(f"FactorSparsityConfig: pattern {self.pattern} means sparsity {1 - nm[0] / nm[1]:g}, "
                             f"but sparsity={self.sparsity:g} was asked")
        if self.start_step < 0 or self.end_step < self.start_step:
            raise ValueError(f"FactorSparsityConfig: need 0 <= start_step <= end_step, got "
                             f"{self.start_step}, {self.end_step}")
        if self.update_every < 1:
            raise ValueError(f"FactorSparsityConfig.update_every must be >= 1, got {self.update_every}")

    def ratio_at(self, step: int) -> float:
        """The scheduled sparsity at `step` (cubic ramp, then the target)."""
        check_int(step, "step")
        if step >= self.end_step:
            return self.sparsity
        if step < self.start_step:
            return 0.0
        t = (step - self.start_step) / (self.end_step - self.start_step)
        return self.sparsity * (1.0 - (1.0 - t) ** 3)


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest-|w| entries so that exactly round(sparsity·numel) are pruned."""
    check_fraction(sparsity, "sparsity")
    prune = round(sparsity * weight.numel())
    mask = torch.ones_like(weight, dtype=torch.bool)
    if prune > 0:
        drop = torch.topk(weight.detach().abs().flatten().float(), prune, largest=False).indices
        mask.view(-1)[drop] = False
    return mask


def nm_mask(weight: torch.Tensor, prune_per_group: int, m: int) -> torch.Tensor:
    """In each group of m consecutive entries along the last dim, prune the prune_per_group smallest."""
    if weight.shape[-1] % m:
        raise ValueError(f"an N:M pattern with M={m} needs the factor's last dimension ({weight.shape[-1]}) "
                         f"to be a multiple of {m}")
    groups = weight.detach().abs().float().reshape(-1, m)
    mask = torch.ones_like(groups, dtype=torch.bool)
    if prune_per_group > 0:
        drop = torch.topk(groups, prune_per_group, dim=1, largest=False).indices
        mask.scatter_(1, drop, False)
    return mask.reshape(weight.shape)


class SALORAdapter(nn.Module):
    """A LoRA update s·B·A whose factors are sparse: y = s·((x·(A⊙Ma)ᵀ)·(B⊙Mb)ᵀ).

    Init as PEFT: A Kaiming-uniform(a=√5), B zero (so B's first masks wait until it has trained).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 config: FactorSparsityConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if rank < 1 or rank > min(in_features, out_features):
            raise ValueError(f"SALORAdapter: rank must be in [1, min(in, out) = {min(in_features, out_features)}], "
                             f"got {rank}")
        nm = parse_pattern(config.pattern)
        if nm is not None:
            for name, dim in (("in_features (A's K)", in_features), ("rank (B's r)", rank)):
                if dim % nm[1]:
                    raise ValueError(f"SALORAdapter: pattern {config.pattern} needs {name} = {dim} to be a "
                                     f"multiple of {nm[1]}")
        self.config, self.scale = config, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.register_buffer("mask_a", torch.ones(rank, in_features, dtype=torch.bool, device=device))
        self.register_buffer("mask_b", torch.ones(out_features, rank, dtype=torch.bool, device=device))

    def _mask_for(self, factor: torch.Tensor, ratio: float) -> torch.Tensor:
        nm = parse_pattern(self.config.pattern)
        if nm is None:
            return magnitude_mask(factor, ratio)
        n, m = nm
        prune = round((ratio / self.config.sparsity) * (m - n)) if self.config.sparsity > 0 else 0
        return nm_mask(factor, prune, m)

    @torch.no_grad()
    def update_masks(self, step: int) -> bool:
        """Recompute both masks for `step` if the schedule says so. Returns whether they changed."""
        self.config.ratio_at(step)  # validates step
        cfg = self.config
        if step > cfg.end_step or step < cfg.start_step:
            return False
        if step != cfg.end_step and (step - cfg.start_step) % cfg.update_every:
            return False
        ratio = cfg.ratio_at(step)
        # Masked entries are zero, so they rank last and stay pruned: the masks only shrink.
        new_a = self._mask_for(self.lora_a * self.mask_a, ratio) & self.mask_a
        new_b = self._mask_for(self.lora_b * self.mask_b, ratio) & self.mask_b if self.lora_b.any() else self.mask_b
        changed = not (torch.equal(new_a, self.mask_a) and torch.equal(new_b, self.mask_b))
        self.mask_a.copy_(new_a)
        self.mask_b.copy_(new_b)
        self.apply_masks()
        return changed

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero the raw parameters at masked positions (optimizer momentum cannot revive them)."""
        self.lora_a.mul_(self.mask_a)
        self.lora_b.mul_(self.mask_b)

    def masked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A⊙Ma, s·B⊙Mb): the factors the forward uses, differentiable in the surviving entries."""
        return self.lora_a * self.mask_a, (self.lora_b * self.mask_b) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.lora_a.shape[1]:
            raise ValueError(f"x: last dimension {x.shape[-1]} != in_features {self.lora_a.shape[1]}")
        if self.training:
            self.apply_masks()
        a, b = self.masked_factors()
        return (x @ a.t()) @ b.t()

    def factor_sparsity(self) -> tuple[float, float]:
        return 1 - self.mask_a.float().mean().item(), 1 - self.mask_b.float().mean().item()

    @torch.no_grad()
    def to_sparse(self) -> "SparseFactors":
        a, b = self.masked_factors()
        return SparseFactors(BitmapSparseWeight.from_dense(a.contiguous()),
                             BitmapSparseWeight.from_dense(b.contiguous()))


@dataclass(frozen=True)
class SparseFactors:
    """A SALOR adapter for inference: both factors in BM8x8 (B carries the scale)."""

    a: BitmapSparseWeight  # [r, K]
    b: BitmapSparseWeight  # [N, r]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(x·Aᵀ)·Bᵀ through two sparse GEMMs (T = x·Aᵀ is [.., r])."""
        return self.b.linear(self.a.linear(x))

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes


def update_all_masks(model: nn.Module, step: int) -> int:
    """Step every SALORAdapter of `model`; returns how many changed their masks."""
    check_module(model)
    return sum(int(m.update_masks(step)) for m in model.modules() if isinstance(m, SALORAdapter))

"""SALOR: sparsity on the low-rank factors themselves (A: r×K, B: N×r).

Each factor carries a mask. The masks follow a cubic schedule from 0 to the target (gradual
magnitude pruning) and are frozen once the target is reached; a pruned entry never comes back (masks
are computed on the already-masked factor, where pruned entries are exactly zero and rank last).
Structured option "N:M": in every group of M consecutive entries along the last dimension (K for
A, r for B) at most N survive; during the ramp the number pruned per group grows with the schedule,
so the final masks are exactly N:M.

Gradients reach only surviving entries (the forward uses factor ⊙ mask) and the raw parameters are
re-zeroed at masked positions by every mask update and every training forward, so optimizer momentum
cannot revive them. For inference the masked factors are stored in BM8x8 and applied with the same
sparse kernel as the base: T = x·Aᵀ (A sparse), then T·Bᵀ (B sparse).

This module holds the method-independent parts (masks, the standalone :class:`SALORAdapter`,
:class:`SparseFactors`); the settings are in :mod:`salr.methods.salor.config`,
:mod:`salr.methods.salor.layer` makes it a layer of a converted model and
``salr.sparsify_(model, SALORConfig(...))`` applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from salr._checks import check_fraction, check_module
from salr.methods.salor.config import FactorSparsityConfig
from salr.ops.format import BitmapSparseWeight
from salr.prune.masks import count, prune_smallest

def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest-|w| entries so that exactly round(sparsity·numel) are pruned."""
    check_fraction(sparsity, "sparsity")
    scores = weight.detach().abs().float().reshape(-1)
    return prune_smallest(scores, count(sparsity, scores.numel()), dim=0).reshape(weight.shape)


def nm_mask(weight: torch.Tensor, prune_per_group: int, m: int) -> torch.Tensor:
    """In each group of m consecutive entries along the last dim, prune the prune_per_group smallest."""
    if weight.shape[-1] % m:
        raise ValueError(f"factor_pattern: an N:M pattern with M={m} needs the factor's last dimension "
                         f"({weight.shape[-1]}) to be a multiple of {m}")
    groups = weight.detach().abs().float().reshape(-1, m)
    return prune_smallest(groups, prune_per_group, dim=1).reshape(weight.shape)


class FactorMasks:
    """The mask logic shared by :class:`SALORAdapter` and :class:`salr.methods.salor.layer.SALORLinear`.

    The host module has parameters ``lora_a`` [r, K], ``lora_b`` [N, r], bool buffers ``mask_a``,
    ``mask_b`` of the same shapes, a ``factor_config`` and a ``scale``.
    """

    def _register_masks(self, rank: int, in_features: int, out_features: int, device) -> None:
        self.register_buffer("mask_a", torch.ones(rank, in_features, dtype=torch.bool, device=device))
        self.register_buffer("mask_b", torch.ones(out_features, rank, dtype=torch.bool, device=device))

    def _mask_for(self, factor: torch.Tensor, ratio: float) -> torch.Tensor:
        cfg = self.factor_config
        if cfg.nm is None:
            return magnitude_mask(factor, ratio)
        m = cfg.nm[1]
        return nm_mask(factor, cfg.pruned_count(m, ratio), m)

    @torch.no_grad()
    def update_masks(self, step: int) -> bool:
        """Bring the masks to the schedule's ratio at `step` (finished optimizer steps); returns
        whether they changed.

        The masks are a function of the schedule: a mask that has pruned fewer entries than the
        ratio of the latest update step asks for is recomputed on the masked factor (so it only
        shrinks), one that has is left alone (frozen). This also restores masks after a resume,
        where the loaded factors hold exact zeros at the masked places, and lets B (zero at init)
        get its mask as soon as it has trained.
        """
        if self.mask_a is None:
            return False  # merged: the factors are stored sparse and frozen
        ratio = self.factor_config.ratio_at(self.factor_config.last_update(step))
        changed = False
        for factor, mask in ((self.lora_a, self.mask_a), (self.lora_b, self.mask_b)):
            if int((~mask).sum()) >= self.factor_config.pruned_count(mask.numel(), ratio):
                continue
            if not factor.any():
                continue  # an all-zero factor (B at init) has no magnitudes to rank yet
            mask &= self._mask_for(factor * mask, ratio)
            changed = True
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

    def factor_sparsity(self) -> tuple[float, float]:
        """The fraction of masked entries of (A, B)."""
        return 1 - self.mask_a.float().mean().item(), 1 - self.mask_b.float().mean().item()


class SALORAdapter(FactorMasks, nn.Module):
    """A standalone LoRA update s·B·A whose factors are sparse: y = s·((x·(A⊙Ma)ᵀ)·(B⊙Mb)ᵀ).

    Init as PEFT: A Kaiming-uniform(a=√5), B zero (so B's first masks wait until it has trained).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 config: FactorSparsityConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if rank < 1 or rank > min(in_features, out_features):
            raise ValueError(f"rank: must be in [1, min(in_features, out_features) = "
                             f"{min(in_features, out_features)}], got {rank}")
        config.check_dims(in_features, rank, "the adapter")
        self.factor_config, self.scale = config, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self._register_masks(rank, in_features, out_features, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.lora_a.shape[1]:
            raise ValueError(f"x: last dimension {x.shape[-1]} != in_features {self.lora_a.shape[1]}")
        if self.training:
            self.apply_masks()
        a, b = self.masked_factors()
        return (x @ a.t()) @ b.t()

    @torch.no_grad()
    def to_sparse(self) -> "SparseFactors":
        a, b = self.masked_factors()
        return SparseFactors.from_dense(a, b)


@dataclass(frozen=True)
class SparseFactors:
    """A SALOR adapter for inference: both factors in BM8x8 (B carries the scale)."""

    a: BitmapSparseWeight  # [r, K]
    b: BitmapSparseWeight  # [N, r]

    @classmethod
    def from_dense(cls, a: torch.Tensor, b: torch.Tensor) -> "SparseFactors":
        """Encode masked factors A [r, K] and s·B [N, r]; their zeros become the bitmaps."""
        return cls(BitmapSparseWeight.from_dense(a.detach().contiguous()),
                   BitmapSparseWeight.from_dense(b.detach().contiguous()))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(x·Aᵀ)·Bᵀ through two sparse GEMMs (T = x·Aᵀ is [.., r])."""
        return self.b.linear(self.a.linear(x))

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes


def update_all_masks(model: nn.Module, step: int) -> int:
    """Bring every masked-factor module of `model` to the schedule at `step`; returns how many changed.

    Usable as a :func:`salr.train.train` ``on_step`` callback.
    """
    check_module(model)
    return sum(int(m.update_masks(step)) for m in model.modules() if isinstance(m, FactorMasks))


def has_factor_masks(model: nn.Module) -> bool:
    """Whether `model` holds a masked-factor module whose masks are still live (not merged)."""
    check_module(model)
    return any(isinstance(m, FactorMasks) and getattr(m, "mask_a", None) is not None for m in model.modules())

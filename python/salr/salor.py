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

This module holds the method-independent parts (config, masks, the standalone
:class:`SALORAdapter`, :class:`SparseFactors`); :mod:`salr.salor_linear` makes it a layer of a
converted model (``salr.convert(model, method="salor", factor_sparsity=...)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from salr._checks import check_fraction, check_int, check_module
from salr.format import BitmapSparseWeight
from salr.pruning import _prune_smallest, count, parse_pattern, resolve_sparsity

# The argument names the messages use (those of salr.convert and the CLI's --factor-* options).
NAMES = ("factor_sparsity", "factor_pattern")


@dataclass(frozen=True)
class FactorSparsityConfig:
    """Target sparsity of the LoRA factors and when it is reached.

    sparsity: fraction of zeros in each factor at the end, in [0, 1); None = taken from `pattern`.
        With a pattern it must equal 1 − N/M (a contradiction is an error).
    pattern: None (unstructured magnitude) or "N:M" along K for A and along r for B.
    start_step / end_step: the cubic ramp s_t = S·(1 − (1 − t)³), t = (step − start)/(end − start),
        in finished optimizer steps; masks are at the target (and frozen) from end_step on.
        start = end = 0: one-shot (the target from the first step on).
    update_every: recompute masks every this many steps during the ramp.
    """

    sparsity: float | None = None
    pattern: str | None = None
    start_step: int = 0
    end_step: int = 0
    update_every: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", resolve_sparsity(self.sparsity, self.pattern, NAMES))
        for name in ("start_step", "end_step", "update_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name == "update_every"):
                raise ValueError(f"factor_{name}: expected an integer >= {int(name == 'update_every')}, got {value!r}")
        if self.end_step < self.start_step:
            raise ValueError(f"factor_start_step, factor_end_step: need start_step <= end_step, got "
                             f"{self.start_step}, {self.end_step}")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern, NAMES[1])

    def ratio_at(self, step: int) -> float:
        """The scheduled sparsity at `step` (cubic ramp, then the target)."""
        check_int(step, "step")
        if step >= self.end_step:
            return self.sparsity
        if step < self.start_step:
            return 0.0
        t = (step - self.start_step) / (self.end_step - self.start_step)
        return self.sparsity * (1.0 - (1.0 - t) ** 3)

    def last_update(self, step: int) -> int:
        """The latest mask-update step at or before `step` (updates every update_every in the ramp)."""
        check_int(step, "step")
        if step >= self.end_step or step < self.start_step:
            return step
        return self.start_step + (step - self.start_step) // self.update_every * self.update_every

    def pruned_count(self, numel: int, ratio: float) -> int:
        """How many entries of a factor with `numel` entries a mask at `ratio` prunes."""
        check_int(numel, "numel")
        check_fraction(ratio, "ratio")
        nm = self.nm
        if nm is None:
            return count(ratio, numel)
        n, m = nm
        per_group = count(ratio / self.sparsity, m - n) if self.sparsity > 0 else 0
        return per_group * (numel // m)

    def check_dims(self, in_features: int, rank: int, what: str = "the layer") -> None:
        """ValueError when an N:M pattern does not tile K (A's groups) or r (B's groups)."""
        nm = self.nm
        if nm is None:
            return
        for dim, value in (("in_features (A's groups run along K)", in_features),
                           ("the LoRA rank (B's groups run along r)", rank)):
            if value % nm[1]:
                raise ValueError(f"factor_pattern: {self.pattern} needs {dim} to be a multiple of {nm[1]}, "
                                 f"but {what} has {value}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FactorSparsityConfig":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"FactorSparsityConfig: unknown fields {unknown}")
        return cls(**dict(data))


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest-|w| entries so that exactly round(sparsity·numel) are pruned."""
    check_fraction(sparsity, "sparsity")
    scores = weight.detach().abs().float().reshape(-1)
    return _prune_smallest(scores, count(sparsity, scores.numel()), dim=0).reshape(weight.shape)


def nm_mask(weight: torch.Tensor, prune_per_group: int, m: int) -> torch.Tensor:
    """In each group of m consecutive entries along the last dim, prune the prune_per_group smallest."""
    if weight.shape[-1] % m:
        raise ValueError(f"factor_pattern: an N:M pattern with M={m} needs the factor's last dimension "
                         f"({weight.shape[-1]}) to be a multiple of {m}")
    groups = weight.detach().abs().float().reshape(-1, m)
    return _prune_smallest(groups, prune_per_group, dim=1).reshape(weight.shape)


class FactorMasks:
    """The mask logic shared by :class:`SALORAdapter` and :class:`salr.salor_linear.SALORLinear`.

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

    Usable as a :func:`salr.training.train` ``on_step`` callback.
    """
    check_module(model)
    return sum(int(m.update_masks(step)) for m in model.modules() if isinstance(m, FactorMasks))


def has_factor_masks(model: nn.Module) -> bool:
    """Whether `model` holds a masked-factor module whose masks are still live (not merged)."""
    check_module(model)
    return any(isinstance(m, FactorMasks) and getattr(m, "mask_a", None) is not None for m in model.modules())

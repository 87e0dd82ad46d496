"""``SALORLinear``: a :class:`~salr.methods.salr.layer.SALRLinear` whose LoRA factors are sparse (SALOR).
:mod:`salr.methods.salor.model` applies it to a model (``salr.sparsify_(model, SALORConfig(...))``).

Two forms, one class:

* training form (``lora_rank`` > 0): trainable ``lora_a`` [r, K], ``lora_b`` [N, r] with bool masks
  ``mask_a`` / ``mask_b`` (:class:`salr.methods.salor.factors.FactorMasks`). The forward is SALRLinear's: ONE
  ``sparse_lowrank_gemm`` call on the sparse base with the concatenated adapters
  ``[A_svd; A⊙Ma]``, ``[B_svd, s·B⊙Mb]`` (masked *dense* factors: the op takes dense adapters),
  so gradients reach only surviving entries.
* stored form, after :meth:`SALORLinear.merge` (``factor_rank`` > 0): the masks are brought to the
  target, and A⊙Ma and s·B⊙Mb are stored in BM8x8 (buffers ``factor_a_{bitmap,values,offsets}``,
  ``factor_b_...``); nothing trains. The forward is the fused op on base + SVD adapter, plus the
  sparse factors through two more calls of the same sparse kernel, T = x·Aᵀ (A sparse, T [.., r])
  then T·Bᵀ (B sparse). The fused op has no sparse-adapter operand, so the sparse factors cannot
  join the concatenated adapters; folding them in densely would give back the bytes SALOR saves.

Supported combinations, in one line: dense SVD adapter + masked dense LoRA in the fused op
(training), or dense SVD adapter in the fused op + BM8x8 LoRA factors in two sparse GEMMs (stored).

On disk (``salr.save``) a SALOR layer's record carries two more fields than a SALR layer's:
``factor_config`` (the :class:`FactorSparsityConfig` as a dict) and ``factor_rank`` (r of the stored
form, 0 in the training form), see :mod:`salr.io.saved_model`; the tensors (masks or BM8x8 factors)
are in the state dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from salr.methods.salor.config import FactorSparsityConfig
from salr.methods.salor.factors import FactorMasks, SparseFactors
from salr.methods.salr.config import _check_int
from salr.methods.salr.layer import SALRLinear
from salr.ops.format import BitmapSparseWeight

_FACTOR_BUFFERS = tuple(f"factor_{f}_{t}" for f in "ab" for t in ("bitmap", "values", "offsets"))


class SALORLinear(FactorMasks, SALRLinear):
    """SALRLinear with masked (training form) or BM8x8-stored (after merge) LoRA factors.

    factor_config: the factor sparsity and its schedule. factor_rank: r of the stored form (what
    :func:`salr.load` builds from a record); a module holds trainable factors
    (``lora_rank``) or stored ones (``factor_rank``), never both. Other arguments as SALRLinear.
    """

    def __init__(self, in_features: int, out_features: int, *, factor_config: FactorSparsityConfig,
                 factor_rank: int = 0, **salr_kwargs: Any) -> None:
        super().__init__(in_features, out_features, **salr_kwargs)
        if not isinstance(factor_config, FactorSparsityConfig):
            raise ValueError(f"factor_config: expected a salr.FactorSparsityConfig, got "
                             f"{type(factor_config).__name__}")
        _check_int(factor_rank, "factor_rank", 0)
        if self.lora_rank and factor_rank:
            raise ValueError("lora_rank, factor_rank: a SALORLinear holds trainable factors (lora_rank) or "
                             "stored sparse ones (factor_rank), not both")
        if not (self.lora_rank or factor_rank):
            raise ValueError("lora_rank: SALOR sparsifies the LoRA factors, so it needs lora_rank >= 1")
        factor_config.check_dims(in_features, self.lora_rank or factor_rank)
        self.factor_config = factor_config
        self.factor_rank = factor_rank
        device = self.bitmap.device
        if self.lora_rank:
            self._register_masks(self.lora_rank, in_features, out_features, device)
        else:
            self.register_buffer("mask_a", None)
            self.register_buffer("mask_b", None)
        for name in _FACTOR_BUFFERS:
            self.register_buffer(name, None)
        if factor_rank:
            zeros = torch.zeros((), dtype=self.compute_dtype, device=device)
            self._set_sparse_factors(SparseFactors.from_dense(zeros.expand(factor_rank, in_features),
                                                              zeros.expand(out_features, factor_rank)))

    @classmethod
    def from_salr(cls, layer: SALRLinear, factor_config: FactorSparsityConfig) -> "SALORLinear":
        """The same layer (base, SVD adapter, LoRA values and init) with masked LoRA factors (all
        ones until the first mask update)."""
        if not isinstance(layer, SALRLinear):
            raise ValueError(f"layer: expected a SALRLinear, got {type(layer).__name__}")
        if layer.lora_a is None:
            raise ValueError("layer: SALOR needs a layer with a LoRA (lora_rank >= 1) to sparsify")
        module = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, svd_rank=layer.svd_rank,
                     lora_rank=layer.lora_rank, alpha=layer.alpha, dropout=layer.dropout,
                     trainable_svd=layer.trainable_svd, dtype=layer.compute_dtype, device=layer.bitmap.device,
                     factor_config=factor_config, quantize=layer.quantize,
                     quantize_group_size=layer.quantize_group_size)
        module.load_state_dict({**layer.state_dict(), "mask_a": module.mask_a, "mask_b": module.mask_b})
        for name in ("svd_a", "svd_b", "lora_a", "lora_b"):
            old, new = getattr(layer, name), getattr(module, name)
            if old is not None:
                new.requires_grad_(old.requires_grad)
        module.train(layer.training)
        return module

    # ---- the stored (BM8x8) factors ---------------------------------------------------------------
    def _set_sparse_factors(self, factors: SparseFactors) -> None:
        for prefix, weight in (("factor_a", factors.a), ("factor_b", factors.b)):
            for part in ("bitmap", "values", "offsets"):
                setattr(self, f"{prefix}_{part}", getattr(weight, part))

    @property
    def sparse_factors(self) -> SparseFactors | None:
        """The stored factors (A⊙Ma [r, K] and s·B⊙Mb [N, r] in BM8x8), None in the training form."""
        if not self.factor_rank:
            return None
        r = self.factor_rank
        a = BitmapSparseWeight(self.factor_a_bitmap, self.factor_a_values, self.factor_a_offsets, r, self.in_features)
        b = BitmapSparseWeight(self.factor_b_bitmap, self.factor_b_values, self.factor_b_offsets, self.out_features, r)
        return SparseFactors(a, b)

    @property
    def adapter_rank(self) -> int:
        return super().adapter_rank + self.factor_rank

    @torch.no_grad()
    def combined_adapter(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """As SALRLinear's, with the stored sparse factors (A⊙Ma, s·B⊙Mb) appended, decoded to fp32."""
        pair = super().combined_adapter()
        if not self.factor_rank:
            return pair
        factors = self.sparse_factors
        a, b = factors.a.to_dense().float(), factors.b.to_dense().float()
        return (a, b) if pair is None else (torch.cat([pair[0], a], 0), torch.cat([pair[1], b], 1))

    def lora_bytes(self) -> int:
        """Bytes of the LoRA factors as held: dense factors (training form) or BM8x8 (stored form)."""
        if self.factor_rank:
            return self.sparse_factors.nbytes
        return sum(t.numel() * t.element_size() for t in (self.lora_a, self.lora_b))

    def compressed_bytes(self) -> int:
        extra = [self.mask_a, self.mask_b] + [getattr(self, name) for name in _FACTOR_BUFFERS]
        return super().compressed_bytes() + sum(t.numel() * t.element_size() for t in extra if t is not None)

    # ---- compute -----------------------------------------------------------------------------------
    def _lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_a * self.mask_a, self.lora_b * self.mask_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.lora_a is not None:
            self.apply_masks()
        y = super().forward(x)
        if self.factor_rank:
            y = y + self.sparse_factors(x.to(self.compute_dtype)).to(y.dtype)
        return y

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        w = super().to_dense()
        if self.factor_rank:
            factors = self.sparse_factors
            w = w + factors.b.to_dense().float() @ factors.a.to_dense().float()
        return w

    @torch.no_grad()
    def merge(self) -> "SALORLinear":
        """Bring the masks to the target (a no-op once training passed the schedule's end), store
        A⊙Ma and s·B⊙Mb in BM8x8 (the module dtype) and drop the trainable factors and masks.
        ValueError if the factors are not finite. Returns self."""
        if self.lora_a is None:
            return self
        self.update_masks(self.factor_config.end_step)
        a, b = self._lora_factors()
        a, b = a.float(), b.float() * self.scale
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError("merge: the LoRA factors hold NaN or inf; refusing to merge")
        dtype = self.compute_dtype
        self._set_sparse_factors(SparseFactors.from_dense(a.to(dtype), b.to(dtype)))
        self.factor_rank = a.shape[0]
        self.lora_a = self.lora_b = None
        self.mask_a = self.mask_b = None
        self.lora_dropout = nn.Identity()
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # As SALRLinear: the masks follow the file's LoRA rank and the stored factors' nnz is data.
        for name in ("mask_a", "mask_b", *_FACTOR_BUFFERS):
            key = prefix + name
            if key in state_dict and self._buffers.get(name) is not None:
                src = state_dict[key]
                self._buffers[name] = torch.empty(src.shape, dtype=src.dtype, device=self._device())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        cfg = self.factor_config
        form = f"stored BM8x8, factor_rank={self.factor_rank}" if self.factor_rank else "training"
        return (f"{super().extra_repr()}, factor_sparsity={cfg.sparsity:g}, factor_pattern={cfg.pattern}, "
                f"factors={form}")

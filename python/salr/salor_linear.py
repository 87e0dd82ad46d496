"""``SALORLinear``: a :class:`~salr.salr_linear.SALRLinear` whose LoRA factors are sparse (SALOR), and
the glue that makes it a ``salr.convert`` method (``method="salor"``) that saves and loads.

Two forms, one class:

* training form (``lora_rank`` > 0): trainable ``lora_a`` [r, K], ``lora_b`` [N, r] with bool masks
  ``mask_a`` / ``mask_b`` (:class:`salr.salor.FactorMasks`). The forward is SALRLinear's: ONE
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

On disk (``salr.convert.save``) a SALOR layer's record carries two more fields than a SALR layer's:
``factor_config`` (the :class:`FactorSparsityConfig` as a dict) and ``factor_rank`` (r of the stored
form, 0 in the training form): :func:`layer_record_fields` writes them, :func:`layer_skeleton`
rebuilds the right module from a record; the tensors (masks or BM8x8 factors) are in the state dict.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import nn

from salr._checks import check_module
from salr.format import BitmapSparseWeight
from salr.models import block_linears, linear_dims
from salr.salor import FactorMasks, FactorSparsityConfig, SparseFactors
from salr.salr_linear import SALRConfig, SALRLinear, _check_int

_FACTOR_BUFFERS = tuple(f"factor_{f}_{t}" for f in "ab" for t in ("bitmap", "values", "offsets"))
# salr.convert keyword -> FactorSparsityConfig field.
FACTOR_OPTIONS = {"factor_sparsity": "sparsity", "factor_pattern": "pattern", "factor_start_step": "start_step",
                  "factor_end_step": "end_step", "factor_update_every": "update_every"}


class SALORLinear(FactorMasks, SALRLinear):
    """SALRLinear with masked (training form) or BM8x8-stored (after merge) LoRA factors.

    factor_config: the factor sparsity and its schedule. factor_rank: r of the stored form (what
    :func:`salr.convert.load` builds from a record); a module holds trainable factors
    (``lora_rank``) or stored ones (``factor_rank``), never both. Other arguments as SALRLinear.
    """

    def __init__(self, in_features: int, out_features: int, *, factor_config: FactorSparsityConfig,
                 factor_rank: int = 0, **salr_kwargs: Any) -> None:
        super().__init__(in_features, out_features, **salr_kwargs)
        if not isinstance(factor_config, FactorSparsityConfig):
            raise ValueError(f"factor_config: expected a salr.salor.FactorSparsityConfig, got "
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
            zeros = torch.zeros((), dtype=self.values.dtype, device=device)
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
                     trainable_svd=layer.trainable_svd, dtype=layer.values.dtype, device=layer.bitmap.device,
                     factor_config=factor_config)
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
            y = y + self.sparse_factors(x.to(self.values.dtype)).to(y.dtype)
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
        dtype = self.values.dtype
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


# ------------------------------------------------------------------------------- convert glue

def pop_factor_config(method: str, factor_config: FactorSparsityConfig | None,
                      overrides: MutableMapping[str, Any]) -> FactorSparsityConfig | None:
    """Take the ``factor_*`` keywords out of `overrides` (salr.convert's) and return the SALOR config:
    `factor_config` updated by them; None for other methods (which must not be given any)."""
    given = {FACTOR_OPTIONS[k]: overrides.pop(k) for k in list(overrides) if k in FACTOR_OPTIONS}
    if method != "salor":
        if given or factor_config is not None:
            names = sorted([f"factor_{k}" for k in given] + (["factor_config"] if factor_config else []))
            raise ValueError(f"{', '.join(names)}: factor sparsity is for method='salor', not {method!r}")
        return None
    if factor_config is not None and not isinstance(factor_config, FactorSparsityConfig):
        raise ValueError(f"factor_config: expected a salr.salor.FactorSparsityConfig, got "
                         f"{type(factor_config).__name__}")
    data = factor_config.to_dict() if factor_config is not None else {}
    if "sparsity" in given and "pattern" not in given:
        data.pop("pattern", None)  # a new ratio alone replaces the base config's pattern
    data.update(given)
    if "sparsity" not in data and "pattern" not in data:
        raise ValueError("factor_sparsity: method='salor' needs factor_sparsity (or factor_pattern, or a "
                         "factor_config)")
    return FactorSparsityConfig.from_dict(data)


def check_targets(model: nn.Module, config: SALRConfig, factor_config: FactorSparsityConfig) -> None:
    """Before any work: the LoRA exists and the factor pattern tiles every target's K and r."""
    if not config.lora_rank:
        raise ValueError("lora_rank: method='salor' sparsifies the LoRA factors, so it needs lora_rank >= 1")
    for _, linears in block_linears(model, config.target_modules):
        for name, lin in linears.items():
            factor_config.check_dims(linear_dims(lin)[1], config.lora_rank, f"layer {name}")


def to_salor(model: nn.Module, factor_config: FactorSparsityConfig) -> nn.Module:
    """Give every SALRLinear of an already converted `model` masked LoRA factors, in place (the
    LoRA values, and which parameters train, are kept)."""
    from salr.models import set_submodule

    check_module(model)
    if not isinstance(factor_config, FactorSparsityConfig):
        raise ValueError(f"factor_config: expected a salr.salor.FactorSparsityConfig, got {type(factor_config).__name__}")
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, SALRLinear) and not isinstance(m, SALORLinear)}
    for name, layer in layers.items():
        factor_config.check_dims(layer.in_features, layer.lora_rank, f"layer {name}")
    for name, layer in layers.items():
        set_submodule(model, name, SALORLinear.from_salr(layer, factor_config))
    return model


def salor_layers(model: nn.Module) -> dict[str, SALORLinear]:
    check_module(model)
    return {name: m for name, m in model.named_modules() if isinstance(m, SALORLinear)}


# ------------------------------------------------------------------------------- records (save/load)

def layer_record_fields(module: SALRLinear) -> dict[str, Any]:
    """The fields a SALOR layer adds to its salr.convert.save record (none for a SALR layer)."""
    check_module(module, "module")
    if not isinstance(module, SALORLinear):
        return {}
    return {"factor_config": module.factor_config.to_dict(), "factor_rank": module.factor_rank}


_SKELETON_FIELDS = ("in_features", "out_features", "bias", "svd_rank", "lora_rank", "alpha", "dropout",
                    "trainable_svd", "dtype")


def layer_skeleton(info: dict[str, Any]) -> SALRLinear:
    """An empty layer of the recorded kind and shape, for load_state_dict to fill."""
    missing = [f for f in _SKELETON_FIELDS if f not in info] if isinstance(info, dict) else list(_SKELETON_FIELDS)
    if missing:
        raise ValueError(f"info: a layer record needs the fields {missing}")
    if not isinstance(getattr(torch, str(info["dtype"]), None), torch.dtype):
        raise ValueError(f"info: field 'dtype' {info['dtype']!r} is not a torch dtype")
    kwargs = dict(bias=info["bias"], svd_rank=info["svd_rank"], lora_rank=info["lora_rank"], alpha=info["alpha"],
                  dropout=info["dropout"], trainable_svd=info["trainable_svd"], dtype=getattr(torch, info["dtype"]))
    if "factor_config" in info:
        return SALORLinear(info["in_features"], info["out_features"],
                           factor_config=FactorSparsityConfig.from_dict(info["factor_config"]),
                           factor_rank=info.get("factor_rank", 0), **kwargs)
    return SALRLinear(info["in_features"], info["out_features"], **kwargs)


"""SALOR: SALR with sparse LoRA factors (masks on a cubic schedule while training, BM8x8 once merged)."""

from salr.methods.salor.config import FactorSparsityConfig, SALORConfig
from salr.methods.salor.factors import SALORAdapter, SparseFactors, has_factor_masks, update_all_masks
from salr.methods.salor.layer import SALORLinear
from salr.methods.salor.model import apply_salor, salor_layers, to_salor

__all__ = ["FactorSparsityConfig", "SALORAdapter", "SALORConfig", "SALORLinear", "SparseFactors", "apply_salor",
           "has_factor_masks", "salor_layers", "to_salor", "update_all_masks"]

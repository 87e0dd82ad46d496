"""SALR: prune once (magnitude / Wanda / SparseGPT), add an SVD residual adapter and a LoRA, all in
one fused sparse + low-rank op per layer."""

from salr.methods.registry import register_layer
from salr.methods.salr.config import SALRConfig
from salr.methods.salr.layer import SALRLinear
from salr.methods.salr.model import apply_salr, freeze_all_but_adapters, prune_model, salr_layers

register_layer(SALRLinear)

__all__ = ["SALRConfig", "SALRLinear", "apply_salr", "freeze_all_but_adapters", "prune_model", "salr_layers"]

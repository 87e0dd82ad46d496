"""SALOR on a whole model: SALR's conversion with masked LoRA factors (the
:class:`~salr.methods.salor.config.SALORConfig` handler of :func:`salr.sparsify_`), and
:func:`to_salor` for a model that is already SALR.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from salr._checks import check_module
from salr.methods.registry import register
from salr.methods.salor.config import FactorSparsityConfig, SALORConfig
from salr.methods.salor.layer import SALORLinear
from salr.methods.salr.config import SALRConfig
from salr.methods.salr.layer import SALRLinear
from salr.methods.salr.model import convert_linears
from salr.nn.models import block_linears, layers_of, linear_dims, set_submodule


@register(SALORConfig)
def apply_salor(model: nn.Module, config: SALORConfig, calibration: Any = None, *,
                progress: bool = True) -> nn.Module:
    """Convert `model` in place to SALOR: SALR layers whose LoRA factors carry masks that follow
    ``config.factor_config``'s schedule (:func:`salr.methods.salor.factors.update_all_masks`)."""
    factor = config.factor_config
    check_targets(model, config, factor)
    return convert_linears(model, config, calibration, progress=progress, method="salor",
                           wrap=lambda layer: SALORLinear.from_salr(layer, factor))


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
    check_module(model)
    if not isinstance(factor_config, FactorSparsityConfig):
        raise ValueError(f"factor_config: expected a salr.FactorSparsityConfig, got {type(factor_config).__name__}")
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, SALRLinear) and not isinstance(m, SALORLinear)}
    for name, layer in layers.items():
        factor_config.check_dims(layer.in_features, layer.lora_rank, f"layer {name}")
    for name, layer in layers.items():
        set_submodule(model, name, SALORLinear.from_salr(layer, factor_config))
    return model


def salor_layers(model: nn.Module) -> dict[str, SALORLinear]:
    """Every SALORLinear of `model` by qualified name."""
    return layers_of(model, SALORLinear)

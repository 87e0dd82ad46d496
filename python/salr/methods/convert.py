"""The keyword API of salr 0.1, ``salr.convert.convert(model, config, calibration, method=...,
factor_config=..., **overrides)``, kept for one release as a thin wrapper over :func:`salr.sparsify_`
(it warns DeprecationWarning). It builds the config the new API takes: a
:class:`~salr.methods.salr.config.SALRConfig`, or for ``method="salor"`` a
:class:`~salr.methods.salor.config.SALORConfig` from the ``factor_*`` keywords / ``factor_config``.
"""

from __future__ import annotations

import warnings
from collections.abc import MutableMapping
from typing import Any

from torch import nn

from salr.methods.registry import sparsify_
from salr.methods.salor.config import FACTOR_FIELDS, FactorSparsityConfig, SALORConfig
from salr.methods.salor.model import check_targets
from salr.methods.salr.config import SALRConfig
from salr.methods.salr.model import make_config

METHODS = ("salr", "salor")


def convert(model: nn.Module, config: SALRConfig | None = None, calibration: Any = None, *,
            method: str = "salr", progress: bool = True, factor_config: Any = None, **overrides: Any) -> nn.Module:
    """Deprecated: ``salr.sparsify_(model, SALRConfig(...) | SALORConfig(...), calibration)``.

    ``config`` and/or keyword overrides of its fields (the old names ``alpha`` / ``dropout`` are
    read as ``lora_alpha`` / ``lora_dropout``); ``method="salor"`` with ``factor_config`` and/or
    ``factor_sparsity``, ``factor_pattern``, ``factor_start_step``, ``factor_end_step``,
    ``factor_update_every``."""
    warnings.warn("salr.convert.convert(model, ...) is deprecated; use salr.sparsify_(model, SALRConfig(...) or "
                  "SALORConfig(...), calibration)", DeprecationWarning, stacklevel=2)
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    factor = pop_factor_config(method, factor_config, overrides)
    config = make_config(config, overrides)
    if factor is not None:
        check_targets(model, config, factor)
        config = SALORConfig.from_parts(config, factor)
    return sparsify_(model, config, calibration, progress=progress)


def pop_factor_config(method: str, factor_config: FactorSparsityConfig | None,
                      overrides: MutableMapping[str, Any]) -> FactorSparsityConfig | None:
    """Take the ``factor_*`` keywords out of `overrides` (salr.convert's) and return the SALOR config:
    `factor_config` updated by them; None for other methods (which must not be given any)."""
    given = {FACTOR_FIELDS[k]: overrides.pop(k) for k in list(overrides) if k in FACTOR_FIELDS}
    if method != "salor":
        if given or factor_config is not None:
            names = sorted([f"factor_{k}" for k in given] + (["factor_config"] if factor_config else []))
            raise ValueError(f"{', '.join(names)}: factor sparsity is for method='salor', not {method!r}")
        return None
    if factor_config is not None and not isinstance(factor_config, FactorSparsityConfig):
        raise ValueError(f"factor_config: expected a salr.FactorSparsityConfig, got "
                         f"{type(factor_config).__name__}")
    data = factor_config.to_dict() if factor_config is not None else {}
    if "sparsity" in given and "pattern" not in given:
        data.pop("pattern", None)  # a new ratio alone replaces the base config's pattern
    data.update(given)
    if "sparsity" not in data and "pattern" not in data:
        raise ValueError("factor_sparsity: method='salor' needs factor_sparsity (or factor_pattern, or a "
                         "factor_config)")
    return FactorSparsityConfig.from_dict(data)

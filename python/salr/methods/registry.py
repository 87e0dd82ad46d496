"""One way to apply a method: :func:`sparsify_` looks up the handler registered for the config's type
(the way torchao's ``quantize_`` does), and :func:`merge_` folds the trained adapters of every
registered layer type into their inference form.

A method registers ``@register(ItsConfig)`` on a function ``handler(model, config, calibration, *,
progress) -> model`` and ``register_layer(ItsLayer)`` for a layer class with a ``merge()`` method.
A config subclass (SALORConfig of SALRConfig) finds its own handler first (the type's MRO order).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from salr._checks import check_module

Handler = Callable[..., nn.Module]
_HANDLERS: dict[type, Handler] = {}
_MERGEABLE: list[type] = []


def register(config_type: type) -> Callable[[Handler], Handler]:
    """Decorator: `handler` applies configs of `config_type` (and of its subclasses without one)."""
    if not isinstance(config_type, type):
        raise ValueError(f"config_type: expected a config class, got {config_type!r}")

    def decorate(handler: Handler) -> Handler:
        _HANDLERS[config_type] = handler
        return handler

    return decorate


def register_layer(layer_type: type) -> type:
    """`layer_type` (an nn.Module with ``merge()``) is merged by :func:`merge_`."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module) and callable(getattr(layer_type, "merge", None))):
        raise ValueError(f"layer_type: expected an nn.Module class with a merge() method, got {layer_type!r}")
    if layer_type not in _MERGEABLE:
        _MERGEABLE.append(layer_type)
    return layer_type


def handler_for(config: Any) -> Handler:
    for cls in type(config).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    known = ", ".join(sorted(c.__name__ for c in _HANDLERS))
    raise ValueError(f"config: no method is registered for {type(config).__name__}; expected one of {known}")


def sparsify_(model: nn.Module, config: Any, calibration: Any = None, *, progress: bool = True) -> nn.Module:
    """Apply the method `config` describes (a SALRConfig, SALORConfig, ...) to `model` in place and
    return it. `calibration`: token ids [n_windows, seq_len], needed by the criteria and SVDs that
    use activations (Wanda, SparseGPT, the activation-aware SVD). Afterwards the adapters are the
    only trainable parameters."""
    check_module(model)
    return handler_for(config)(model, config, calibration, progress=progress)


def merge_(model: nn.Module) -> int:
    """Fold every trained adapter of `model` into its layer's inference form (see each layer's
    ``merge``), in place; returns how many layers were merged."""
    check_module(model)
    layers = [m for m in model.modules() if isinstance(m, tuple(_MERGEABLE))]
    for layer in layers:
        layer.merge()
    return len(layers)

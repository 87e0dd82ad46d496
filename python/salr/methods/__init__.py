"""The methods that make a model sparse + low-rank, each as ``config.py`` (its settings) /
``layer.py`` (its module) / ``model.py`` (applying it to a whole model), and the one entry point:
``salr.sparsify_(model, config, calibration)`` dispatches on the config's type (:mod:`.registry`);
``salr.merge_(model)`` folds the trained adapters. LoSA trains while it prunes, so it is a procedure
above the training loop: :mod:`salr.losa`.
"""

from salr.methods.registry import handler_for, merge_, register, register_layer, sparsify_
from salr.methods.salr import SALRConfig, SALRLinear
from salr.methods.salor import FactorSparsityConfig, SALORConfig, SALORLinear

__all__ = ["FactorSparsityConfig", "SALORConfig", "SALORLinear", "SALRConfig", "SALRLinear", "handler_for",
           "merge_", "register", "register_layer", "sparsify_"]

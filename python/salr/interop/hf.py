"""The way back from salr to a plain transformers model: :func:`to_transformers` (the dense weights
of a salr model or saved directory in ``AutoModelForCausalLM.from_config``), :func:`dense_state_dict`.

salr's own directory layout (``save`` / ``load`` / ``read_record`` / ``is_saved_model``) moved to
:mod:`salr.io.saved_model`; the names are still importable from here.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from salr._checks import check_module
# save / load / read_record / is_saved_model / fill_tied_aliases and the format constants moved to
# salr.io.saved_model; importable from here too.
from salr.io.saved_model import (CONFIG_FILE, MODEL_FORMAT, MODEL_FORMAT_VERSION, SECTION,  # noqa: F401
                                 WEIGHTS_STEM, fill_tied_aliases, is_saved_model, load, read_record, save)
from salr.methods.salr.layer import SALRLinear
from salr.methods.salr.model import salr_layers
from salr.nn.models import is_conv1d


def conv1d_layers(model: nn.Module) -> set[str]:
    """Names of the SALRLinear layers that replaced a GPT-2 Conv1D (whose weight is stored [in, out]),
    found on a weightless (meta-device) copy of the original architecture."""
    check_module(model)
    import transformers

    cls = getattr(transformers, type(model).__name__, None)
    if cls is None or not hasattr(model, "config"):
        return set()
    with torch.device("meta"):
        fresh = cls(model.config)
    return {name for name in salr_layers(model) if is_conv1d(fresh.get_submodule(name))}


@torch.no_grad()
def dense_state_dict(model: nn.Module, merge_adapters: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of the plain transformers model `model` was converted from: every SALRLinear
    becomes ``<name>.weight`` (the decoded base, plus B·A of its adapters when `merge_adapters`, in
    the layer dtype; transposed for GPT-2's Conv1D) and ``<name>.bias``."""
    check_module(model)
    conv1d = conv1d_layers(model)
    state = {}
    for key, tensor in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if not isinstance(model.get_submodule(owner) if owner else model, SALRLinear):
            state[key] = tensor
    for name, module in salr_layers(model).items():
        weight = module.to_dense() if merge_adapters else module.base_dense().float()
        if name in conv1d:
            weight = weight.T
        state[f"{name}.weight"] = weight.to(module.compute_dtype).contiguous()
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().clone()
    return state


def to_transformers(model_or_directory: nn.Module | str | os.PathLike, merge_adapters: bool = True) -> nn.Module:
    """A plain transformers model with the dense weights of a salr model or saved directory, built
    the documented way (the directory's config.json is an HF config)::

        config = AutoConfig.from_pretrained(directory)
        del config.salr                                   # salr's section, not an HF setting
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(dense_state_dict(salr.load(directory)))
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(model_or_directory, nn.Module):
        model = model_or_directory
        config = type(model.config).from_dict({k: v for k, v in model.config.to_dict().items() if k != SECTION})
    else:
        model = load(model_or_directory)
        config = AutoConfig.from_pretrained(str(model_or_directory))
        if hasattr(config, SECTION):
            delattr(config, SECTION)
    dense = AutoModelForCausalLM.from_config(config)
    dtypes = {t.dtype for t in model.parameters()} | {m.compute_dtype for m in salr_layers(model).values()}
    if len(dtypes) == 1:
        dense.to(dtypes.pop())
    dense.load_state_dict(dense_state_dict(model, merge_adapters), strict=True)
    return dense.eval()

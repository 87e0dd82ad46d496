"""Architecture adapters: where a Hugging Face causal LM keeps its decoder blocks and linear layers.

The pruning and conversion code is architecture-agnostic: it needs only the list of decoder blocks
(run one at a time during calibration) and, inside each block, the linear layers with their weights
seen as [out_features, in_features]. This module finds both:

* Llama-family (Llama, Qwen2, Mistral, SmolLM2, Gemma, Phi-3 ...): ``model.model.layers``
* OPT: ``model.model.decoder.layers``
* GPT-2 / GPT-J style: ``model.transformer.h`` (GPT-2's ``Conv1D`` stores its weight transposed,
  [in, out]; :func:`weight_view` hides that)
* GPT-NeoX / Pythia: ``model.gpt_neox.layers``; Falcon / Bloom: ``model.transformer.h`` too.

An unknown architecture raises a ValueError that names the model class and the paths tried.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from salr._checks import check_module

# Attribute paths (from the top-level CausalLM module) of the decoder block list, tried in order.
BLOCK_PATHS = (
    "model.layers",           # Llama, Qwen2, Mistral, SmolLM2, Gemma, Phi-3 (…ForCausalLM.model)
    "model.decoder.layers",   # OPT
    "transformer.h",          # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",        # GPT-NeoX, Pythia
    "layers",                 # a bare decoder (LlamaModel) passed directly
    "decoder.layers",         # a bare OPTModel
    "h",                      # a bare GPT2Model
)


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is [in, out]."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(
        getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) or a GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an nn.Linear or a Conv1D."""
    if is_conv1d(module):
        k, n = module.weight.shape
        return n, k
    return module.out_features, module.in_features


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a transposed view for Conv1D; no copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(attribute path, block list) of a causal LM's decoder blocks.

    Raises ValueError naming the model class when none of :data:`BLOCK_PATHS` holds a non-empty
    ``nn.ModuleList``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for path in BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    raise ValueError(f"model: unknown architecture {type(model).__name__}: found no decoder block list at any of "
                     f"{', '.join(BLOCK_PATHS)} (supported: Llama/Qwen2/Mistral/SmolLM2, OPT, GPT-2, GPT-NeoX). "
                     f"Add its path to salr.nn.models.BLOCK_PATHS")


def iter_linears(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(qualified name, module) for every nn.Linear / Conv1D under `module`, in registration order."""
    for name, child in module.named_modules(prefix=prefix):
        if is_linear(child):
            yield name, child


def block_linears(model: nn.Module, targets: tuple[str, ...] | list[str] | None = None
                  ) -> list[tuple[int, dict[str, nn.Module]]]:
    """For every decoder block: (block index, {qualified name: linear}) of the linears to convert.

    `targets` (None = every linear in the blocks) keeps the linears whose qualified name equals a
    target or ends with ``"." + target`` (e.g. ``"q_proj"`` or ``"self_attn.q_proj"``). A target that
    matches nothing is an error (a typo would otherwise silently convert nothing).
    """
    path, blocks = find_blocks(model)
    out, matched = [], set()
    for index, block in enumerate(blocks):
        chosen = {}
        for name, lin in iter_linears(block, prefix=f"{path}.{index}"):
            if targets is None:
                chosen[name] = lin
                continue
            for t in targets:
                if name == t or name.endswith("." + t):
                    chosen[name] = lin
                    matched.add(t)
        out.append((index, chosen))
    if targets is not None:
        missing = [t for t in targets if t not in matched]
        if missing:
            names = sorted({n.split(".")[-1] for _, d in block_linears(model, None) for n in d})
            raise ValueError(f"target_modules: {missing} match no linear layer in the decoder blocks "
                             f"(linear names there: {names})")
    return out


def layers_of(model: nn.Module, *types: type) -> dict[str, nn.Module]:
    """Every submodule of `model` that is an instance of one of `types`, by qualified name (the one
    discovery helper behind salr_layers / salor_layers / losa_layers)."""
    check_module(model)
    return {name: m for name, m in model.named_modules() if isinstance(m, types)}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified `name` (``a.b.c``) with `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def vocab_size(model: nn.Module) -> int | None:
    """The input vocabulary size (rows of the input embedding), or None when unknown."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Embedding):
        return emb.num_embeddings
    cfg = getattr(model, "config", None)
    return getattr(cfg, "vocab_size", None)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")

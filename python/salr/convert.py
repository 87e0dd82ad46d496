"""Whole-model SALR: prune every target linear of a causal LM once, add the SVD residual adapter and
a LoRA (``convert``), or only prune in place (``prune_model``); save / load converted models.

``convert(model, config, calibration)`` replaces each nn.Linear / GPT-2 Conv1D inside the decoder
blocks by a :class:`~salr.salr_linear.SALRLinear` (embeddings and lm_head stay dense). Criteria
that need activations (Wanda, SparseGPT, the activation-aware SVD) calibrate sequentially, block by
block (:mod:`salr.calibration`). Afterwards only the adapters are trainable.

On disk (``save`` / ``load``): a ``save_pretrained``-style directory (HF config.json with a "salr"
section, safetensors shards, tokenizer, every file's sha256), written atomically; see
:mod:`salr.interop.hf`. A SALOR layer's record also holds ``factor_config`` and ``factor_rank``
(:mod:`salr.salor_linear`).

``salr.convert`` is this module, and the module is callable: ``salr.convert(model, ...)`` is
``salr.convert.convert(model, ...)`` (so both the issue's ``salr.convert(model, config, data)`` and
``from salr import convert; convert.save(...)`` work).
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from salr._checks import check_module
from salr.calibration import LinearStats, check_calibration, run_sequential
from salr.models import block_linears, find_blocks, linear_dims, set_submodule, vocab_size, weight_view
from salr.pruning import check_nm_width, parse_pattern, prune_weight
from salr.salor_linear import SALORLinear, check_targets, layer_record_fields, layer_skeleton, pop_factor_config
from salr.salr_linear import SALRConfig, SALRLinear
from salr.svd_adapter import check_rank

CONFIG_FILE = "config.json"
METHODS = ("salr", "salor")


def _make_config(config: SALRConfig | None, overrides: dict[str, Any]) -> SALRConfig:
    if config is not None and not isinstance(config, SALRConfig):
        raise ValueError(f"config: expected a salr.SALRConfig, got {type(config).__name__}")
    if config is None:
        return SALRConfig(**overrides)
    if overrides:
        data = config.to_dict()
        data.update(overrides)
        return SALRConfig.from_dict(data)
    return config


def _plan(model: nn.Module, config: SALRConfig) -> list[tuple[int, dict[str, nn.Module]]]:
    """The target linears per block, after checking every per-layer setting against them."""
    per_block = block_linears(model, config.target_modules)
    names = [name for _, linears in per_block for name in linears]
    if not names:
        raise ValueError("target_modules: no linear layer to convert in the decoder blocks")
    if isinstance(config.sparsity, tuple) and len(config.sparsity) != len(per_block):
        raise ValueError(f"sparsity: a per-block vector needs one ratio per decoder block ({len(per_block)}), "
                         f"got {len(config.sparsity)}")
    if isinstance(config.sparsity, dict):
        missing = sorted(set(names) - set(config.sparsity))
        unknown = sorted(set(config.sparsity) - set(names))
        if missing or unknown:
            raise ValueError(f"sparsity: a per-layer mapping must name exactly the target linears; missing "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unknown {unknown[:5]}")
    nm = parse_pattern(config.pattern)
    for _, linears in per_block:
        for name, lin in linears.items():
            n, k = linear_dims(lin)
            check_nm_width(k, nm, name)
            if config.svd_rank:
                check_rank(config.svd_rank, n, k, f"svd_rank (layer {name})")
            if config.lora_rank:
                check_rank(config.lora_rank, n, k, f"lora_rank (layer {name})")
    return per_block


def _run(model: nn.Module, config: SALRConfig, calibration: Any, progress: bool, desc: str,
         act) -> list[tuple[int, dict[str, nn.Module]]]:
    """Shared driver: validate, then call ``act(index, name, linear, stats)`` for every target
    linear, block by block (sequential calibration when the config needs activations)."""
    per_block = _plan(model, config)
    if config.needs_calibration and calibration is None:
        why = (f"criterion {config.criterion!r}" if config.criterion != "magnitude" else "activation_aware_svd")
        raise ValueError(f"calibration: {why} needs calibration token ids (an integer tensor [n_windows, seq_len])")

    def on_block(index: int, _block: nn.Module, linears: dict[str, nn.Module],
                 stats: dict[str, LinearStats]) -> None:
        for name, lin in linears.items():
            act(index, name, lin, stats.get(name))

    if config.needs_calibration:
        run_sequential(model, calibration, on_block, targets=config.target_modules,
                       hessian=config.criterion == "sparsegpt", progress=progress, desc=desc)
    else:
        if calibration is not None:
            check_calibration(calibration, vocab_size(model))
        blocks = find_blocks(model)[1]
        for index, linears in tqdm(per_block, desc=desc, unit="block", disable=not progress):
            on_block(index, blocks[index], linears, {})
    return per_block


def _stats_args(config: SALRConfig, stats: LinearStats | None) -> dict[str, Any]:
    if stats is None:
        return {}
    return {"input_norms": stats.column_norms(), "input_rms": stats.column_rms(),
            "hessian": stats.hessian() if config.criterion == "sparsegpt" else None}


def convert(model: nn.Module, config: SALRConfig | None = None, calibration: Any = None, *,
            method: str = "salr", progress: bool = True, factor_config: Any = None, **overrides: Any) -> nn.Module:
    """Convert `model` in place to SALR and return it.

    ``config`` (a :class:`SALRConfig`) and/or keyword overrides of its fields (``sparsity=0.5,
    criterion="wanda", pattern="2:4", svd_rank=64, lora_rank=16, ...``). ``calibration``: token ids
    [n_windows, seq_len] (needed by Wanda, SparseGPT and the activation-aware SVD). Afterwards the
    LoRA (and the SVD adapter if ``trainable_svd``) are the only trainable parameters.

    ``method="salor"``: the LoRA factors get masks (:class:`~salr.salor_linear.SALORLinear`), set by
    ``factor_config`` (a :class:`~salr.salor.FactorSparsityConfig`) and/or ``factor_sparsity``,
    ``factor_pattern``, ``factor_start_step``, ``factor_end_step``, ``factor_update_every``.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    factor = pop_factor_config(method, factor_config, overrides)
    config = _make_config(config, overrides)
    if factor is not None:
        check_targets(model, config, factor)

    def act(index: int, name: str, lin: nn.Module, stats: LinearStats | None) -> None:
        module = SALRLinear.from_linear(
            lin, sparsity=config.layer_sparsity(index, name), criterion=config.criterion, pattern=config.pattern,
            group=config.group, svd_rank=config.svd_rank, svd_method=config.svd_method,
            lora_rank=config.lora_rank, alpha=config.alpha, dropout=config.dropout,
            trainable_svd=config.trainable_svd, activation_aware=config.activation_aware_svd,
            dtype=config.dtype, blocksize=config.blocksize, damping=config.damping, **_stats_args(config, stats))
        if factor is not None:
            module = SALORLinear.from_salr(module, factor)
        module.train(lin.training)
        set_submodule(model, name, module)

    _run(model, config, calibration, progress, f"{method.upper()}: {config.criterion} {_ratio_text(config)}", act)
    freeze_all_but_adapters(model)
    model.salr_config = config
    model.salr_method = method
    return model


@torch.no_grad()
def prune_model(model: nn.Module, config: SALRConfig | None = None, calibration: Any = None, *,
                progress: bool = True, **overrides: Any) -> dict[str, float]:
    """Prune the target linears in place (dense layers keep their class, pruned weights become 0;
    SparseGPT also updates the survivors). SVD / LoRA settings are ignored. Returns the sparsity of
    every pruned layer by qualified name."""
    config = _make_config(config, {"svd_rank": 0, "lora_rank": 0, **overrides})
    report: dict[str, float] = {}

    def act(index: int, name: str, lin: nn.Module, stats: LinearStats | None) -> None:
        view = weight_view(lin)
        args = _stats_args(config, stats)
        args.pop("input_rms", None)
        pruned, keep = prune_weight(view.float(), config.criterion, config.layer_sparsity(index, name),
                                    pattern=config.pattern, group=config.group, blocksize=config.blocksize,
                                    damping=config.damping, **args)
        view.copy_(pruned.to(view.dtype))
        report[name] = 1.0 - keep.float().mean().item()

    _run(model, config, calibration, progress, f"prune: {config.criterion} {_ratio_text(config)}", act)
    return report


def _ratio_text(config: SALRConfig) -> str:
    if config.pattern:
        return config.pattern
    return f"{config.sparsity:.0%}" if isinstance(config.sparsity, float) else "per-layer"


def freeze_all_but_adapters(model: nn.Module) -> list[str]:
    """requires_grad only on LoRA factors (and SVD factors of trainable_svd layers); returns their names."""
    check_module(model)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = []
    for name, module in model.named_modules():
        if isinstance(module, SALRLinear):
            for pname in ("lora_a", "lora_b") + (("svd_a", "svd_b") if module.trainable_svd else ()):
                p = getattr(module, pname)
                if p is not None:
                    p.requires_grad_(True)
                    trainable.append(f"{name}.{pname}")
    return trainable


def salr_layers(model: nn.Module) -> dict[str, SALRLinear]:
    check_module(model)
    return {name: m for name, m in model.named_modules() if isinstance(m, SALRLinear)}


# ------------------------------------------------------------------------------------------ files
# The directory layout (format version 2: HF config.json + a "salr" section, safetensors shards,
# tokenizer, checksums) lives in salr.interop.hf; these are its entry points under salr.convert.

def save(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False, tokenizer: Any = None,
         max_shard_size: int | str = "2GB") -> Path:
    """Write a converted model to `directory` (safetensors shards + config.json; atomic; see
    :mod:`salr.interop.hf`). Returns the path."""
    from salr.interop import hf

    return hf.save(model, directory, overwrite=overwrite, tokenizer=tokenizer, max_shard_size=max_shard_size)


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    """The config.json of a saved model, checked for format, version, checksum and file digests."""
    from salr.interop import hf

    return hf.read_record(directory)


def is_saved_model(directory: str | os.PathLike) -> bool:
    from salr.interop import hf

    return hf.is_saved_model(directory)


def load(directory: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save` after verifying every file (ValueError naming the file
    and the field otherwise): SALRLinear layers at the recorded places, every tensor exact."""
    from salr.interop import hf

    return hf.load(directory, device)


class _CallableModule(types.ModuleType):
    """Lets ``salr.convert(model, ...)`` call :func:`convert` while ``salr.convert`` stays this module."""

    def __call__(self, *args: Any, **kwargs: Any) -> nn.Module:
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

"""SALR on a whole model: prune every target linear of a causal LM once, add the SVD residual adapter
and a LoRA (the :class:`~salr.methods.salr.config.SALRConfig` handler of :func:`salr.sparsify_`), or
only prune in place (:func:`prune_model`).

Every nn.Linear / GPT-2 Conv1D inside the decoder blocks becomes a
:class:`~salr.methods.salr.layer.SALRLinear` (embeddings and lm_head stay dense). Criteria that need
activations (Wanda, SparseGPT, the activation-aware SVD) calibrate sequentially, block by block
(:mod:`salr.prune.calibration`). Afterwards only the adapters are trainable. SALOR reuses this
driver with a layer wrapper (:mod:`salr.methods.salor.model`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from salr._checks import check_module
from salr.methods.registry import register
from salr.methods.salr.config import SALRConfig
from salr.methods.salr.layer import SALRLinear
from salr.nn.models import block_linears, find_blocks, layers_of, linear_dims, set_submodule, vocab_size, weight_view
from salr.nn.svd import check_rank
from salr.prune.calibration import LinearStats, check_calibration, run_sequential
from salr.prune.criteria import prune_weight
from salr.prune.masks import check_nm_width, parse_pattern
from salr.prune.owl import owl_block_sparsity
from salr.prune.type_allocation import typed_layer_sparsity
from salr.prune.quantize import check_group_size, check_quantize, quantize_int8


@register(SALRConfig)
def apply_salr(model: nn.Module, config: SALRConfig, calibration: Any = None, *, progress: bool = True) -> nn.Module:
    """Convert `model` in place to SALR (see the module doc) and return it."""
    return convert_linears(model, config, calibration, progress=progress, method="salr")


def convert_linears(model: nn.Module, config: SALRConfig, calibration: Any, *, progress: bool, method: str,
                    wrap: Callable[[SALRLinear], SALRLinear] | None = None) -> nn.Module:
    """The driver of SALR-like methods: every target linear becomes ``SALRLinear.from_linear`` (then
    ``wrap(layer)`` when given), the adapters alone stay trainable, and the model records
    ``salr_config`` (the SALR part of `config`) and ``salr_method``."""

    def act(index: int, name: str, lin: nn.Module, stats: LinearStats | None) -> None:
        module = SALRLinear.from_linear(
            lin, sparsity=config.layer_sparsity(index, name), criterion=config.criterion, pattern=config.pattern,
            group=config.group, svd_rank=config.svd_rank, svd_method=config.svd_method,
            lora_rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
            trainable_svd=config.trainable_svd, activation_aware=config.activation_aware_svd,
            dtype=config.dtype, blocksize=config.blocksize, damping=config.damping, quantize=config.quantize,
            quantize_group_size=config.quantize_group_size, **_stats_args(config, stats))
        if wrap is not None:
            module = wrap(module)
        module.train(lin.training)
        set_submodule(model, name, module)

    config = resolve_layerwise(model, config, calibration, progress)
    _run(model, config, calibration, progress, f"{method.upper()}: {config.criterion} {_ratio_text(config)}", act)
    freeze_all_but_adapters(model)
    model.salr_config = config if type(config) is SALRConfig else SALRConfig.from_dict(
        {k: v for k, v in config.to_dict().items() if k in SALRConfig.__dataclass_fields__})
    model.salr_method = method
    return model


def make_config(config: SALRConfig | None, overrides: dict[str, Any]) -> SALRConfig:
    """`config` (default: SALRConfig()) with keyword `overrides` of its fields applied."""
    if config is not None and not isinstance(config, SALRConfig):
        raise ValueError(f"config: expected a salr.SALRConfig, got {type(config).__name__}")
    if config is None:
        return SALRConfig.from_dict(overrides)
    if overrides:
        data = config.to_dict()
        data.update(overrides)
        return type(config).from_dict(data)
    return config


def resolve_layerwise(model: nn.Module, config: SALRConfig, calibration: Any, progress: bool = True) -> SALRConfig:
    """`config` with its ratios chosen: for layerwise='owl' with a global target, OWL's per-block ratios
    measured on `model` as it is now (dense, before any pruning); then, with a type_allocation, the
    per-layer mapping around the block ratios; otherwise `config` itself."""
    if not isinstance(config, SALRConfig):
        raise ValueError(f"resolve_layerwise: config must be a salr.SALRConfig, got {type(config).__name__}")
    if not (config.owl_pending or config.types_pending):
        return config
    _plan(model, config)  # the cheap checks before a calibration pass
    if config.owl_pending:
        if calibration is None:
            raise ValueError("calibration: layerwise='owl' needs calibration token ids (an integer tensor "
                             "[n_windows, seq_len]) to measure the activation outliers")
        ratios = owl_block_sparsity(model, calibration, config.sparsity, m=config.owl_m, lam=config.owl_lambda,
                                    targets=config.target_modules, progress=progress)
        config = dataclasses.replace(config, sparsity=ratios)
    if config.types_pending:
        config = dataclasses.replace(config, sparsity=typed_layer_sparsity(
            model, config.sparsity, targets=config.target_modules, strength=config.type_allocation))
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


@torch.no_grad()
def prune_model(model: nn.Module, config: SALRConfig | None = None, calibration: Any = None, *,
                progress: bool = True, **overrides: Any) -> dict[str, float]:
    """Prune the target linears in place (dense layers keep their class, pruned weights become 0;
    SparseGPT also updates the survivors). SVD / LoRA settings are ignored. Returns the sparsity of
    every pruned layer by qualified name."""
    config = resolve_layerwise(model, make_config(config, {"svd_rank": 0, "lora_rank": 0, **overrides}),
                               calibration, progress)
    if config.quantize is not None:
        raise ValueError("quantize: prune_model keeps dense nn.Linear layers, which hold no int8 base; "
                         "convert with salr.sparsify_ to store int8 bases")
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


@torch.no_grad()
def quantize_bases(model: nn.Module, quantize: str = "int8", quantize_group_size: int | None = None) -> int:
    """Round every float base of the model's SALRLinears to int8 in place (round-to-nearest,
    :func:`salr.prune.quantize.quantize_int8`; the mask is kept) and record it in ``model.salr_config``
    when there is one. Adapters are left as they are (an SVD adapter fitted before does not absorb
    the rounding: convert with ``SALRConfig(quantize=...)`` for that). This is how a model whose
    training changes its base (LoSA's merges) gets an int8 base: after its last merge. Returns the
    number of layers quantized (int8 bases already are skipped)."""
    check_module(model)
    if check_quantize(quantize) is None:
        raise ValueError("quantize: expected 'int8'")
    check_group_size(quantize_group_size)
    count = 0
    for layer in salr_layers(model).values():
        if layer.quantize is None:
            q, scales = quantize_int8(layer.base_dense().float(), quantize_group_size)
            layer.set_base(q, scales)
            count += 1
    config = getattr(model, "salr_config", None)
    if isinstance(config, SALRConfig):
        model.salr_config = dataclasses.replace(config, quantize=quantize, quantize_group_size=quantize_group_size)
    return count


def quantize_adapters_(model: nn.Module) -> int:
    """Store every merged SALR adapter of `model` as int8 with one scale per output row, in place
    (:meth:`SALRLinear.quantize_adapters`: after :func:`salr.merge_`); returns how many layers changed.
    The base (float or int8) is untouched; decoding then reads ~half the adapter bytes of bf16."""
    check_module(model)
    changed = 0
    for layer in salr_layers(model).values():
        before = layer.adapter_scales is None and layer.svd_a is not None
        layer.quantize_adapters()
        changed += before
    return changed


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
    """Every SALRLinear (SALOR layers included) of `model` by qualified name."""
    return layers_of(model, SALRLinear)

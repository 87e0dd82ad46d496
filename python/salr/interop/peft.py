"""PEFT LoRA adapters and salr layers, both ways.

* :func:`load_peft_adapter`: a PEFT LoRA directory (``adapter_config.json`` +
  ``adapter_model.safetensors``) becomes the trainable LoRA of the salr layers it targets. PEFT
  computes ``y += s·B·A·x`` with ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``);
  SALRLinear's scale is ``alpha / lora_rank``, so ``alpha = s·r``. Per-layer ``rank_pattern`` /
  ``alpha_pattern`` follow PEFT's matching. Options salr has no equivalent for (DoRA, LoRA bias,
  modules_to_save, layer filters) are refused, as are targets that are not SALRLinear layers and
  tensors whose names or shapes do not fit: ValueError naming the file and the field.
* :func:`export_peft_adapter`: every salr layer's adapters (SVD residual + scaled LoRA,
  concatenated exactly as SALRLinear's forward concatenates them) written as one standard PEFT
  LoRA of the combined rank (``lora_alpha = r``, so PEFT's scale is 1). A dense base holding the
  decoded sparse weights (:func:`salr.interop.hf.to_transformers` with ``merge_adapters=False``)
  plus this adapter, loaded by PEFT, computes what the salr model computes.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salr.io.files import check_destination, read_json, write_directory_atomically, write_json
from salr.methods.salr.layer import SALRLinear
from salr.methods.salr.model import freeze_all_but_adapters, salr_layers

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# adapter_config.json fields salr cannot honour: (field, the value that means "not used").
_UNSUPPORTED = (("use_dora", False), ("lora_bias", False), ("modules_to_save", None), ("layers_to_transform", None),
                ("layers_pattern", None), ("target_parameters", None), ("trainable_token_indices", None),
                ("exclude_modules", None), ("alora_invocation_tokens", None))


def _targets(target_modules: Any, name: str) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches a name equal
    to an entry or ending in "." + an entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{t}") for t in target_modules)


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json, checked to be a LoRA salr can load; ValueError naming the field."""
    path = Path(directory) / CONFIG_FILE
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: field 'peft_type' is {config.get('peft_type')!r}; salr loads 'LORA' adapters")
    for field, unused in _UNSUPPORTED:
        value = config.get(field, unused)
        if value is not unused and value not in ([], {}, ""):
            raise ValueError(f"{path}: field '{field}' is {value!r}; salr's LoRA has no equivalent")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: field 'bias' is {config['bias']!r}; salr loads adapters with bias 'none'")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{path}: field 'r' must be an integer >= 1, got {r!r}")
    alpha = config.get("lora_alpha", r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"{path}: field 'lora_alpha' must be a finite number > 0, got {alpha!r}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise ValueError(f"{path}: field 'target_modules' must be a regex or a non-empty list of names, got {targets!r}")
    dropout = config.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{path}: field 'lora_dropout' must be in [0, 1), got {dropout!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise ValueError(f"{path}: field '{field}' must be an object")
    return config


@torch.no_grad()
def load_peft_adapter(model: nn.Module, directory: str | os.PathLike, *, trainable: bool = True) -> list[str]:
    """Make the PEFT LoRA in `directory` the LoRA of every SALRLinear it targets (replacing any LoRA
    there; other layers are untouched); returns the names of the layers it went to. With
    `trainable`, the LoRA factors are then the model's only trainable parameters."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_adapter_config(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    targeted = {name: m for name, m in model.named_modules() if name and _targets(config["target_modules"], name)}
    if not targeted:
        raise ValueError(f"{config_path}: field 'target_modules' {config['target_modules']!r} matches no layer of "
                         f"the model")
    foreign = [f"{n} ({type(m).__name__})" for n, m in targeted.items() if not isinstance(m, SALRLinear)]
    if foreign:
        raise ValueError(f"{config_path}: field 'target_modules' matches layers that are not salr layers: "
                         f"{foreign[:3]}{'...' if len(foreign) > 3 else ''}")
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{weights_path}: cannot read the adapter weights: {exc}") from exc
    expected = {f"{PREFIX}{n}.lora_{ab}.weight" for n in targeted for ab in "AB"}
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise ValueError(f"{weights_path}: tensors do not match the layers targeted by {CONFIG_FILE} field "
                         f"'target_modules' (missing {missing[:3]}, unexpected {extra[:3]})")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    plans = {}
    for name, module in targeted.items():
        a, b = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
        r = _pattern_value(rank_pattern, name, config["r"])
        if tuple(a.shape) != (r, module.in_features) or tuple(b.shape) != (module.out_features, r):
            raise ValueError(f"{weights_path}: {PREFIX}{name}.lora_A/B.weight have shapes {tuple(a.shape)} and "
                             f"{tuple(b.shape)}; layer {name} with rank {r} ({CONFIG_FILE} fields 'r' / "
                             f"'rank_pattern') needs ({r}, {module.in_features}) and ({module.out_features}, {r})")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{weights_path}: {PREFIX}{name}.lora_A/B.weight hold NaN or inf")
        lora_alpha = _pattern_value(alpha_pattern, name, config.get("lora_alpha", config["r"]))
        scale = lora_alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        plans[name] = (a, b, scale * r)
    dropout = float(config.get("lora_dropout", 0.0))
    for name, (a, b, alpha) in plans.items():  # only after every layer checked: all or nothing
        module = targeted[name]
        dtype, device = module.compute_dtype, module.values.device
        module.lora_a = nn.Parameter(a.to(device=device, dtype=dtype))
        module.lora_b = nn.Parameter(b.to(device=device, dtype=dtype))
        module.alpha = float(alpha)
        module.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    if trainable:
        freeze_all_but_adapters(model)
    return sorted(plans)


def combined_adapter(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A [R, K], B [N, R]) in fp32 with B·A = every adapter the layer applies (B_svd·A_svd +
    s·B_lora·A_lora, and a SALOR layer's stored sparse factors), or None without adapters."""
    if not isinstance(module, SALRLinear):
        raise ValueError(f"module: expected a salr SALRLinear, got {type(module).__name__}")
    return module.combined_adapter()


def export_peft_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                        overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write every salr layer's adapters as one PEFT LoRA (see the module doc) to `directory`
    (atomic). `dtype`: the stored dtype (default: each layer's). Returns the path."""
    from safetensors.torch import save_file

    final = Path(directory)
    check_destination(final, overwrite)
    tensors, ranks = {}, {}
    for name, module in salr_layers(model).items():
        pair = combined_adapter(module)
        if pair is None:
            continue
        a, b = pair
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"model: layer {name} has NaN or inf in its adapters; refusing to export")
        out = dtype or module.compute_dtype
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.to(out).contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.to(out).contiguous().cpu()
        ranks[name] = a.shape[0]
    if not ranks:
        raise ValueError("model: no salr layer has an adapter to export")
    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(n): rank for n, rank in ranks.items() if rank != r}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
              "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
              "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, config)

    return write_directory_atomically(final, write, overwrite=overwrite)

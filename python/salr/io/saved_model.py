"""salr models in a ``save_pretrained``-style directory (format version 2): :func:`save`,
:func:`load` (also ``salr.save`` / ``salr.load``), the per-layer records.

A saved directory holds

* ``config.json``: the model's Hugging Face config (so ``AutoConfig.from_pretrained`` reads it) plus
  a ``"salr"`` section: format name and version, model class, method, overall sparsity, pattern,
  criterion, ranks, the SALRConfig, per-layer records, the shape and dtype of every stored tensor,
  the size and sha256 of every other file, and a checksum of config.json itself;
* ``salr-model.safetensors``, or ``salr-model-0000i-of-0000N.safetensors`` shards plus
  ``salr-model.safetensors.index.json`` (``max_shard_size``): the state dict, compressed bases as
  bitmap/values/offsets, tied weights stored once. The ``salr-`` prefix is deliberate: a plain
  ``AutoModelForCausalLM.from_pretrained(directory)`` then fails ("no model.safetensors") instead of
  loading random weights in place of the sparse layers;
* the tokenizer files when a tokenizer is given.

:func:`load` verifies the format version, the checksum and every file's size and sha256, then every
tensor's shape and dtype; anything off raises ValueError naming the file and the field. Format
version 1 directories (salr 0.1's single-file layout, no checksums) are refused with a message that
says so. Writes are atomic (a temporary directory renamed into place).

A layer record holds the constructor arguments of its layer (:func:`layer_skeleton` rebuilds an
empty layer from it, :func:`layer_record_fields` adds SALOR's ``factor_config`` / ``factor_rank``);
the SALRConfig is stored under the names salr 0.1 wrote (``alpha``, ``dropout``), so the bytes of a
saved directory did not change with the config's renaming. The way back to a plain transformers model
is :mod:`salr.interop.hf`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salr._checks import check_module, check_path
from salr.io.files import (check_destination, file_digest, parse_size, read_json, read_shards, unique_tensors,
                           verify_checksummed_json, verify_files, write_checksummed_json, write_directory_atomically,
                           write_shards)
from salr.methods.salor.config import FactorSparsityConfig
from salr.methods.salor.layer import SALORLinear
from salr.methods.salr.config import LEGACY_NAMES, SALRConfig
from salr.methods.salr.layer import SALRLinear
from salr.methods.salr.model import freeze_all_but_adapters, salr_layers
from salr.nn.models import set_submodule
from salr.ops import reference

MODEL_FORMAT = "salr.model"
MODEL_FORMAT_VERSION = 2
CONFIG_FILE = "config.json"
WEIGHTS_STEM = "salr-model"
SECTION = "salr"
DEFAULT_MAX_SHARD_SIZE = "2GB"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_record(module: SALRLinear) -> dict[str, Any]:
    # An int8 base adds "quantize" / "quantize_group_size" ("dtype" is then the compute dtype); float
    # layers keep the record format 2 always had, byte for byte.
    quantized = {"quantize": module.quantize, "quantize_group_size": module.quantize_group_size} if module.quantize else {}
    if module.adapter_quantize:  # int8 inference adapter: svd_a / svd_b int8 + adapter_scales
        quantized["adapter_quantize"] = module.adapter_quantize
    return {"in_features": module.in_features, "out_features": module.out_features,
            "bias": module.bias is not None, "svd_rank": module.svd_rank, "lora_rank": module.lora_rank,
            "alpha": module.alpha, "dropout": module.dropout, "trainable_svd": module.trainable_svd,
            "dtype": _dtype_name(module.compute_dtype), "nnz": module.values.numel(),
            "sparsity": round(module.sparsity, 6), **quantized,
            **layer_record_fields(module)}  # + SALOR's factor fields


def _summary(model: nn.Module, layers: dict[str, SALRLinear]) -> dict[str, Any]:
    config = getattr(model, "salr_config", None)
    weights = sum(m.in_features * m.out_features for m in layers.values())
    nnz = sum(m.values.numel() for m in layers.values())
    return {"method": getattr(model, "salr_method", "salr" if isinstance(config, SALRConfig) else None),
            "sparsity": round(1.0 - nnz / weights, 6) if weights else 0.0,
            "pattern": config.pattern if isinstance(config, SALRConfig) else None,
            "criterion": config.criterion if isinstance(config, SALRConfig) else None,
            "svd_ranks": sorted({m.svd_rank for m in layers.values()}),
            "lora_ranks": sorted({m.lora_rank for m in layers.values()}),
            **({"quantize": "int8"} if any(m.quantize for m in layers.values()) else {}),
            **({"adapter_quantize": "int8"} if any(m.adapter_quantize for m in layers.values()) else {})}


def _config_record(config: SALRConfig) -> dict[str, Any]:
    """The config as format 2 stores it: the field names salr 0.1 wrote."""
    new_to_old = {new: old for old, new in LEGACY_NAMES.items()}
    data = config.to_dict()
    if data["layerwise"] == "uniform":  # OWL's fields say nothing then; format 2 files stay as they were
        for key in ("layerwise", "owl_m", "owl_lambda"):
            del data[key]
    if not data["type_allocation"]:  # likewise without a per-type allocation
        del data["type_allocation"]
    if data["quantize"] is None:  # likewise for float bases
        for key in ("quantize", "quantize_group_size"):
            del data[key]
    return {new_to_old.get(k, k): v for k, v in data.items()}


def save(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False, tokenizer: Any = None,
         max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write `model` (a Hugging Face causal LM, converted or not) to `directory` (see the module
    doc); shards of at most `max_shard_size` ("2GB", or bytes). Returns the path."""
    final = Path(directory)
    max_bytes = parse_size(max_shard_size)
    check_destination(final, overwrite)
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        raise ValueError("model: expected a Hugging Face model (with .config) to save")
    layers = salr_layers(model)
    state = unique_tensors(model.state_dict())
    config = {k: v for k, v in hf_config.to_dict().items() if k != SECTION}
    config["architectures"] = [type(model).__name__]
    salr_config = getattr(model, "salr_config", None)
    section = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "model_class": type(model).__name__,
               **_summary(model, layers),
               "salr_config": _config_record(salr_config) if isinstance(salr_config, SALRConfig) else None,
               "layers": {name: _layer_record(m) for name, m in layers.items()},
               "tensors": {k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for k, t in state.items()}}

    def write(tmp: Path) -> None:
        write_shards(state, tmp, WEIGHTS_STEM, max_bytes, metadata={"format": MODEL_FORMAT})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        section["files"] = {p.name: file_digest(p) for p in sorted(tmp.iterdir())
                            if p.is_file() and p.name != CONFIG_FILE}
        write_checksummed_json(tmp / CONFIG_FILE, {**config, SECTION: section}, SECTION)

    return write_directory_atomically(final, write, overwrite=overwrite)


def is_saved_model(directory: str | os.PathLike) -> bool:
    """Whether `directory` looks like a salr-saved model (any format version); no verification."""
    check_path(directory, "directory")
    try:
        record = read_json(Path(directory) / CONFIG_FILE)
    except ValueError:
        return False
    return isinstance(record, dict) and (record.get("format") == MODEL_FORMAT or (
        isinstance(record.get(SECTION), dict) and record[SECTION].get("format") == MODEL_FORMAT))


def read_record(directory: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The parsed config.json of a saved model, checked for format and version, and (with `verify`)
    its checksum and the size and sha256 of every file it lists."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    record = read_json(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if record.get("format") == MODEL_FORMAT:  # version 1 kept everything at the top level
        raise ValueError(f"{path}: field 'format_version' is {record.get('format_version')!r} (salr 0.1's "
                         f"single-file layout, no checksums); this salr reads {MODEL_FORMAT_VERSION}: load it "
                         f"with salr 0.1 and save it again")
    section = record.get(SECTION)
    if not isinstance(section, dict) or section.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path}: not a saved salr model (no '{SECTION}' section with format {MODEL_FORMAT!r})")
    if section.get("format_version") != MODEL_FORMAT_VERSION:
        raise ValueError(f"{path}: field '{SECTION}.format_version' is {section.get('format_version')!r}; "
                         f"this salr reads {MODEL_FORMAT_VERSION}")
    if verify:
        verify_checksummed_json(path, record, SECTION)
        verify_files(directory, section.get("files"), path)
    return record


def _skeleton(record: dict[str, Any], path: Path) -> nn.Module:
    """The architecture from the HF config, with SALRLinear skeletons at the recorded places."""
    import transformers

    section = record[SECTION]
    cls = getattr(transformers, str(section.get("model_class")), None)
    if cls is None:
        raise ValueError(f"{path}: field '{SECTION}.model_class' {section.get('model_class')!r} is not in this "
                         f"transformers ({transformers.__version__})")
    hf = {k: v for k, v in record.items() if k != SECTION}
    try:
        model = cls(transformers.AutoConfig.for_model(hf.pop("model_type"), **hf))
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: the Hugging Face config does not build a {cls.__name__}: {exc}") from exc
    layers = section.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"{path}: field '{SECTION}.layers' must map layer names to records")
    for name, info in layers.items():
        try:
            module = layer_skeleton(info)  # a SALRLinear, or a SALORLinear when the record has factor fields
            model.get_submodule(name)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: field '{SECTION}.layers.{name}' is not a valid layer record: {exc}") from exc
        set_submodule(model, name, module)
    return model


def _check_tensors(state: dict[str, torch.Tensor], recorded: Any, path: Path) -> None:
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: field '{SECTION}.tensors' must map tensor names to dtype and shape")
    missing, extra = sorted(set(recorded) - set(state)), sorted(set(state) - set(recorded))
    if missing or extra:
        raise ValueError(f"{path}: field '{SECTION}.tensors' disagrees with the weights files "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for key, tensor in state.items():
        info = recorded[key]
        if info.get("dtype") != _dtype_name(tensor.dtype) or info.get("shape") != list(tensor.shape):
            raise ValueError(f"{path}: field '{SECTION}.tensors.{key}' records {info}, the file holds "
                             f"{_dtype_name(tensor.dtype)} {list(tensor.shape)}")


def fill_tied_aliases(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Tied tensors (e.g. lm_head = embed_tokens) are stored once: give every missing alias the
    tensor of its loaded partner, so ``load_state_dict(assign=True)`` ties them again."""
    check_module(model)
    if not isinstance(state, dict):
        raise ValueError(f"state: expected a dict of tensors, got {type(state).__name__}")
    shared: dict[int, list[str]] = {}
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        shared.setdefault(id(tensor), []).append(name)
    for names in shared.values():
        present = [n for n in names if n in state]
        for n in names:
            if present and n not in state:
                state[n] = state[present[0]]


def load(directory: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save` after verifying it (see the module doc), in eval mode
    with only the adapters trainable."""
    directory = Path(directory)
    path = directory / CONFIG_FILE
    record = read_record(directory)
    section = record[SECTION]
    model = _skeleton(record, path)
    state = read_shards(directory, WEIGHTS_STEM)
    _check_tensors(state, section.get("tensors"), path)
    fill_tied_aliases(model, state)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: the weights files do not match the recorded model: {exc}") from exc
    for name, module in salr_layers(model).items():
        try:
            reference.check_weight("load", module.bitmap, module.values, module.offsets, module.out_features,
                                   module.in_features)
            if (module.scales is None) != (module.values.dtype != torch.int8):
                raise ValueError(f"values are {module.values.dtype} but scales are "
                                 f"{'missing' if module.scales is None else 'present'}")
            if module.scales is not None:
                module.sparse_weight  # noqa: B018 - checks the scales (dtype, shape, finite, > 0)
            if module.adapter_scales is not None or (module.svd_a is not None and module.svd_a.dtype == torch.int8):
                if module.svd_a is None:
                    raise ValueError("adapter_scales without an adapter")
                reference.dequantized_adapter(module.svd_a, module.svd_b, module.adapter_scales, torch.float32,
                                              "load")  # int8 factors with finite, positive scales
        except ValueError as exc:
            raise ValueError(f"{path}: layer {name}: {exc}") from exc
    model.to(device)
    freeze_all_but_adapters(model)
    if section.get("salr_config") is not None:
        model.salr_config = SALRConfig.from_dict(section["salr_config"])
    if section.get("method") is not None:
        model.salr_method = section["method"]
    model.eval()
    return model


# ------------------------------------------------------------------------------------ layer records

def layer_record_fields(module: SALRLinear) -> dict[str, Any]:
    """The fields a SALOR layer adds to its record (none for a SALR layer)."""
    check_module(module, "module")
    if not isinstance(module, SALORLinear):
        return {}
    return {"factor_config": module.factor_config.to_dict(), "factor_rank": module.factor_rank}


_SKELETON_FIELDS = ("in_features", "out_features", "bias", "svd_rank", "lora_rank", "alpha", "dropout",
                    "trainable_svd", "dtype")


def layer_skeleton(info: dict[str, Any]) -> SALRLinear:
    """An empty layer of the recorded kind and shape, for load_state_dict to fill."""
    missing = [f for f in _SKELETON_FIELDS if f not in info] if isinstance(info, dict) else list(_SKELETON_FIELDS)
    if missing:
        raise ValueError(f"info: a layer record needs the fields {missing}")
    if not isinstance(getattr(torch, str(info["dtype"]), None), torch.dtype):
        raise ValueError(f"info: field 'dtype' {info['dtype']!r} is not a torch dtype")
    kwargs = dict(bias=info["bias"], svd_rank=info["svd_rank"], lora_rank=info["lora_rank"], alpha=info["alpha"],
                  dropout=info["dropout"], trainable_svd=info["trainable_svd"], dtype=getattr(torch, info["dtype"]),
                  quantize=info.get("quantize"), quantize_group_size=info.get("quantize_group_size"))
    if "factor_config" in info:
        return SALORLinear(info["in_features"], info["out_features"],
                           factor_config=FactorSparsityConfig.from_dict(info["factor_config"]),
                           factor_rank=info.get("factor_rank", 0), **kwargs)
    return SALRLinear(info["in_features"], info["out_features"], **kwargs)

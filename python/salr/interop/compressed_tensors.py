"""compressed-tensors' ``sparse-bitmask`` checkpoints (what llm-compressor writes for an
unstructured- or N:M-pruned model) to and from salr's BM8x8 layers.

The format, per compressed weight ``<layer>.weight`` of dense shape [R, C] (compressed-tensors
0.7+ names the tensors ``<layer>.<part>``, older releases ``<layer>.weight.<part>``; both are read,
the newer is written):

* ``shape``: int64 [2], the dense shape;
* ``compressed``: the nonzeros, 1-D, row-major (row by row, columns ascending);
* ``bitmask``: uint8 [R, ceil(C/8)], byte j of row r holds columns 8j..8j+7 with column 8j+b at
  bit b (numpy ``packbits(..., bitorder="little")``);
* ``row_offsets``: int64 [R], index in ``compressed`` of each row's first value;

and config.json carries ``quantization_config = {"quant_method": "compressed-tensors", "version",
"sparsity_config": {"format": "sparse-bitmask", "global_sparsity", "sparsity_structure",
"targets", "ignore"}, "transform_config": {}}``.

Byte j of row 8i+r is exactly byte r of BM8x8's tile word (i, j) (bit r·8+c = column 8j+c), so the
two masks are the same bytes in another order; the values only need a permutation between
row-major and tile order, computed from per-(row, tile) popcounts. Neither direction builds the
dense matrix (:func:`bitmask_to_bm8x8`, :func:`bm8x8_to_bitmask`).

Loading by the libraries: compressed-tensors up to 0.14 decompresses this format
(``ModelCompressor.decompress``, which unties a tied lm_head: call ``tie_weights()`` after it;
and transformers 4.x's ``from_pretrained`` through it);
compressed-tensors >= 0.15 keeps only its config class (``BitmaskConfig``) and its bit packing
(``pack_bitmasks`` / ``unpack_bitmasks``), and transformers 5 no longer decompresses sparsity
configs at all, so a transformers-5 ``from_pretrained`` of such a directory would leave the sparse
layers randomly initialised. :func:`import_compressed_tensors` is the loader that works with every
version.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from salr.ops import reference
from salr.ops.format import BitmapSparseWeight
from salr.io.files import (check_destination, parse_size, read_json, read_shards, unique_tensors,
                           write_directory_atomically, write_json, write_shards)
from salr.nn.models import is_conv1d, is_linear, linear_dims, set_submodule
from salr.interop.hf import conv1d_layers
from salr.io.saved_model import fill_tied_aliases
from salr.methods.salr.layer import SALRLinear
from salr.methods.salr.model import freeze_all_but_adapters, salr_layers

QUANT_METHOD = "compressed-tensors"
SPARSE_BITMASK = "sparse-bitmask"
# The last compressed-tensors release with the sparse-bitmask compressor, whose layout this writes.
FORMAT_VERSION = "0.14.0.1"
WEIGHTS_STEM = "model"
CONFIG_FILE = "config.json"
PARTS = ("shape", "compressed", "bitmask", "row_offsets")
_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------ the layout pair

def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    flat = counts.reshape(-1)
    return (torch.cumsum(flat, 0) - flat).reshape(counts.shape)


def _gather_index(src_start: torch.Tensor, dst_start: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """For segments listed in destination order: index into the source of every destination value."""
    total = int(counts.sum())
    shift = torch.repeat_interleave((src_start - dst_start).reshape(-1), counts.reshape(-1), output_size=total)
    return shift + torch.arange(total, device=counts.device)


def _segments(row_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values per (row, tile) [N8, T] -> (start of each segment in row-major order, its start in
    tile order), both [N8, T]."""
    n8, tiles = row_counts.shape
    row_major = _exclusive_cumsum(row_counts)
    tile_major = row_counts.view(n8 // 8, 8, tiles).permute(0, 2, 1)  # [bands, tiles, 8]
    tile_start = _exclusive_cumsum(tile_major).permute(0, 2, 1).reshape(n8, tiles)
    return row_major, tile_start


def _tile_order(x: torch.Tensor) -> torch.Tensor:
    """[N8, T] per (row, tile) -> flattened in BM8x8 order (band, tile, row in band)."""
    n8, tiles = x.shape
    return x.view(n8 // 8, 8, tiles).permute(0, 2, 1).reshape(-1)


def bitmask_to_bm8x8(compressed: torch.Tensor, bitmask: torch.Tensor, row_offsets: torch.Tensor | None,
                     shape: tuple[int, int] | torch.Tensor) -> BitmapSparseWeight:
    """A compressed-tensors bitmask weight (see the module doc) as a BM8x8 weight, without a dense
    matrix. `row_offsets` is checked against the bitmask when given. ValueError on any mismatch."""
    rows, cols = (int(v) for v in (shape.tolist() if isinstance(shape, torch.Tensor) else shape))
    tiles = reference.tiles_per_band(cols)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, tiles):
        raise ValueError(f"bitmask: expected uint8 of shape {(rows, tiles)} for a [{rows}, {cols}] weight, "
                         f"got {bitmask.dtype} {tuple(bitmask.shape)}")
    if compressed.dim() != 1 or compressed.dtype not in _FLOATS:
        raise ValueError(f"compressed: expected a 1-D float32/bfloat16/float16 tensor, got {compressed.dtype} "
                         f"{tuple(compressed.shape)}")
    n8 = reference.num_bands(rows) * 8
    counts = bitmask.new_zeros((n8, tiles), dtype=torch.int64)
    counts[:rows] = _POPCOUNT8.to(bitmask.device)[bitmask.long()]
    if int(counts.sum()) != compressed.numel():
        raise ValueError(f"compressed: the bitmask has {int(counts.sum())} set bits but there are "
                         f"{compressed.numel()} values")
    if row_offsets is not None and not torch.equal(row_offsets.reshape(-1).long().cpu(),
                                                   _exclusive_cumsum(counts[:rows].sum(1)).cpu()):
        raise ValueError("row_offsets: disagree with the bitmask's per-row counts")
    row_start, tile_start = _segments(counts)
    index = _gather_index(_tile_order(row_start), _tile_order(tile_start), _tile_order(counts))
    words = bitmask.new_zeros((n8, tiles), dtype=torch.int64)
    words[:rows] = bitmask.long()
    words = words.view(n8 // 8, 8, tiles)
    bitmap = torch.zeros(n8 // 8, tiles, dtype=torch.int64, device=bitmask.device)
    for r in range(8):  # row r of every tile is byte r of its word
        bitmap |= words[:, r] << (8 * r)
    offsets = reference.offsets_from_counts(reference.group_counts(counts.view(n8 // 8, 8, tiles).sum(1)))
    weight = BitmapSparseWeight(bitmap, compressed[index].contiguous(), offsets.to(bitmask.device), rows, cols)
    return weight.validate()  # padding bits of the last byte must be clear


def bm8x8_to_bitmask(weight: BitmapSparseWeight) -> dict[str, torch.Tensor]:
    """A BM8x8 weight as compressed-tensors' ``{"shape", "compressed", "bitmask", "row_offsets"}``
    (the tensors stored under ``<layer>.<part>``), without a dense matrix."""
    if not isinstance(weight, BitmapSparseWeight):
        raise ValueError(f"weight: expected a salr.BitmapSparseWeight, got {type(weight).__name__}")
    rows, cols = weight.shape
    bands, tiles = weight.bitmap.shape
    shifts = torch.arange(0, 64, 8, device=weight.device)
    row_bytes = ((weight.bitmap.unsqueeze(-1) >> shifts) & 0xFF).permute(0, 2, 1).reshape(bands * 8, tiles)
    counts = _POPCOUNT8.to(weight.device)[row_bytes]
    row_start, tile_start = _segments(counts)
    index = _gather_index(tile_start, row_start, counts)  # segments in row-major order
    return {"shape": torch.tensor([rows, cols], dtype=torch.int64),
            "compressed": weight.values[index].contiguous(),
            "bitmask": row_bytes[:rows].to(torch.uint8).contiguous(),
            "row_offsets": _exclusive_cumsum(counts[:rows].sum(1)).contiguous()}


# ------------------------------------------------------------------------------------- export

def _hf_config(model: nn.Module) -> dict[str, Any]:
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        raise ValueError("model: expected a Hugging Face model (with .config) to export")
    config = {k: v for k, v in hf_config.to_dict().items() if k not in ("salr", "quantization_config")}
    config["architectures"] = [type(model).__name__]
    return config


def export_compressed_tensors(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False,
                              tokenizer: Any = None, max_shard_size: int | str = "5GB",
                              adapters: str = "refuse") -> Path:
    """Write the sparse base of a salr model (every SALRLinear's BM8x8 weight, everything else
    dense) as a compressed-tensors sparse-bitmask checkpoint: ``model.safetensors`` (or shards +
    index) and config.json, as llm-compressor lays it out; atomic. The adapters are not part of the
    format: with ``adapters="refuse"`` a layer that has one is a ValueError (export them with
    :func:`salr.interop.peft.export_peft_adapter`, or merge LoSA first); ``adapters="drop"`` writes
    the base alone. Returns the path."""
    if adapters not in ("refuse", "drop"):
        raise ValueError(f"adapters: expected 'refuse' or 'drop', got {adapters!r}")
    final = Path(directory)
    max_bytes = parse_size(max_shard_size)
    check_destination(final, overwrite)
    config = _hf_config(model)
    layers = salr_layers(model)
    if not layers:
        raise ValueError("model: has no SALRLinear layer to export as sparse-bitmask")
    quantized = [n for n, m in layers.items() if m.quantize]
    if quantized:
        # The composition sparse-bitmask over int-quantized weights (int8 'compressed' + 'weight_scale',
        # described by 'quantization_config.config_groups') existed only in compressed-tensors releases
        # that also carried the bitmask compressor (<= 0.14); no loader of today reads it, so we do not
        # write it rather than write what nothing can check.
        raise ValueError(f"model: {len(quantized)} layers have int8 bases (first: {quantized[0]}); the sparse-bitmask "
                         f"export writes unquantized values only and does not write "
                         f"'quantization_config.config_groups' for int8 weights: convert without quantize, or "
                         f"keep the model in salr's own format (salr.save)")
    with_adapters = [n for n, m in layers.items() if m.adapter_rank]
    if with_adapters and adapters == "refuse":
        raise ValueError(f"adapters: {len(with_adapters)} layers carry adapters (first: {with_adapters[0]}); the "
                         f"sparse-bitmask format holds the sparse base only: export the adapters with "
                         f"salr.interop.peft.export_peft_adapter and pass adapters='drop'")
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in layers:
            if key == f"{owner}.bias":
                state[key] = tensor
            continue
        state[key] = tensor
    conv1d = conv1d_layers(model)
    for name, module in layers.items():
        weight = module.sparse_weight
        if name in conv1d:  # stored as the original [in, out] Conv1D weight: a dense transpose
            weight = BitmapSparseWeight.from_dense(weight.to_dense().T.contiguous())
        for part, tensor in bm8x8_to_bitmask(weight).items():
            state[f"{name}.{part}"] = tensor
    state = unique_tensors(state)
    weights = sum(m.in_features * m.out_features for m in layers.values())
    pattern = getattr(getattr(model, "salr_config", None), "pattern", None)
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD, "version": FORMAT_VERSION,
        "sparsity_config": {"format": SPARSE_BITMASK,
                            "global_sparsity": 1.0 - sum(m.values.numel() for m in layers.values()) / weights,
                            "sparsity_structure": pattern or "unstructured",
                            "targets": sorted(layers), "ignore": []},
        "transform_config": {}}

    def write(tmp: Path) -> None:
        write_shards(state, tmp, WEIGHTS_STEM, max_bytes, metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, config)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return write_directory_atomically(final, write, overwrite=overwrite)


# ------------------------------------------------------------------------------------- import

def read_sparsity_config(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the HF config, its sparsity_config) of a compressed-tensors checkpoint, checked to be an
    unquantized sparse-bitmask one; ValueError naming the file and the field otherwise."""
    path = Path(directory) / CONFIG_FILE
    config = read_json(path)
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict):
        raise ValueError(f"{path}: field 'quantization_config' is missing: not a compressed-tensors checkpoint")
    if qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path}: field 'quantization_config.quant_method' is {qc.get('quant_method')!r}, "
                         f"expected {QUANT_METHOD!r}")
    if qc.get("config_groups"):
        raise ValueError(f"{path}: field 'quantization_config.config_groups' describes quantized weights "
                         f"(format {qc.get('format')!r}); salr imports unquantized sparse-bitmask checkpoints only")
    sc = qc.get("sparsity_config")
    fmt = sc.get("format") if isinstance(sc, dict) else None
    if fmt != SPARSE_BITMASK:
        raise ValueError(f"{path}: field 'quantization_config.sparsity_config.format' is {fmt!r}; salr imports "
                         f"{SPARSE_BITMASK!r} only")
    return config, sc


def _build(config: dict[str, Any], path: Path) -> nn.Module:
    """The model class named by 'architectures' (AutoModelForCausalLM when absent), from the config."""
    import transformers

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, str(arch), None) if arch is not None else None
    if arch is not None and cls is None:
        raise ValueError(f"{path}: field 'architectures' {config.get('architectures')!r} names no transformers "
                         f"model class ({transformers.__version__})")
    hf = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
        return cls(hf_config) if cls is not None else transformers.AutoModelForCausalLM.from_config(hf_config)
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: the Hugging Face config does not build a model: {exc}") from exc


def import_compressed_tensors(directory: str | os.PathLike, device: torch.device | str = "cpu", *,
                              lora_rank: int = 0, alpha: float | None = None, dropout: float = 0.0) -> nn.Module:
    """A salr model from a compressed-tensors sparse-bitmask checkpoint: every compressed linear
    becomes a SALRLinear whose BM8x8 base holds exactly the stored values (converted without a dense
    matrix; GPT-2's Conv1D, stored [in, out], is transposed through a dense copy), with a fresh LoRA
    of `lora_rank` (0: none) ready to fine-tune; everything else loads as stored."""
    directory = Path(directory)
    config, _ = read_sparsity_config(directory)
    model = _build(config, directory / CONFIG_FILE)
    state = read_shards(directory, WEIGHTS_STEM)
    prefixes = sorted(k[:-len(".bitmask")] for k in state if k.endswith(".bitmask"))
    if not prefixes:
        raise ValueError(f"{directory}: the weights hold no '<layer>.bitmask' tensor to import")
    names = []
    for prefix in prefixes:
        name = prefix.removesuffix(".weight") if prefix.endswith(".weight") else prefix
        names.append(name)
        where = f"{directory}: layer {name}"
        parts = {p: state.pop(f"{prefix}.{p}", None) for p in PARTS}
        if any(t is None for t in parts.values()):
            raise ValueError(f"{where}: missing {[p for p, t in parts.items() if t is None]} of the bitmask weight")
        try:
            target = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{where}: no such module in {type(model).__name__}") from exc
        if not is_linear(target):
            raise ValueError(f"{where}: a compressed weight for a {type(target).__name__}, not a linear layer")
        try:
            weight = bitmask_to_bm8x8(parts["compressed"], parts["bitmask"], parts["row_offsets"], parts["shape"])
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc
        n, k = linear_dims(target)
        if is_conv1d(target):
            weight = BitmapSparseWeight.from_dense(weight.to_dense().T.contiguous())
        if weight.shape != (n, k):
            raise ValueError(f"{where}: stored shape {weight.shape} does not fit the layer's [{n}, {k}]")
        bias = state.pop(f"{name}.bias", None)
        module = SALRLinear(k, n, bias=bias is not None, lora_rank=lora_rank, alpha=alpha, dropout=dropout,
                            dtype=weight.dtype)
        module.bitmap, module.values, module.offsets = weight.bitmap, weight.values, weight.offsets
        if bias is not None:
            module.bias = bias.to(weight.dtype)
        set_submodule(model, name, module)
    fill_tied_aliases(model, state)
    result = model.load_state_dict(state, strict=False, assign=True)
    owned = tuple(f"{n}." for n in names)
    missing = [k for k in result.missing_keys if not k.startswith(owned)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{directory}: the weights do not match {type(model).__name__} (missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]})")
    freeze_all_but_adapters(model)
    model.salr_method = "compressed-tensors"
    return model.to(device).eval()

"""Safetensors shards with a Hugging Face index, file digests, and a self-checksummed config.json:
the file plumbing shared by salr's own layout (:mod:`salr.interop.hf`) and the compressed-tensors
export (:mod:`salr.interop.compressed_tensors`).

Shards follow ``save_pretrained``'s naming: one ``<stem>.safetensors``, or
``<stem>-00001-of-0000N.safetensors`` files plus ``<stem>.safetensors.index.json``
(``{"metadata": {"total_size"}, "weight_map": {tensor: file}}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
CHECKSUM_PLACEHOLDER = "0" * 64


def parse_size(size: int | str, what: str = "max_shard_size") -> int:
    """Bytes from an int or a string such as "500MB", "2GiB"; ValueError naming `what`."""
    if isinstance(size, bool):
        raise ValueError(f"{what}: expected a byte count or a string like '2GB', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(str(size))
        if not match:
            raise ValueError(f"{what}: expected a byte count or a string like '2GB', got {size!r}")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    if value < 1:
        raise ValueError(f"{what}: must be at least 1 byte, got {size!r}")
    return value


def check_destination(final: Path, overwrite: bool) -> None:
    """Refuse to write over a non-empty `final` unless `overwrite` (ValueError naming `directory`)."""
    if final.exists() and not overwrite and (not final.is_dir() or any(final.iterdir())):
        raise ValueError(f"directory: {final} exists and is not empty (pass overwrite=True to replace it)")


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the later aliases of tensors that share storage (tied weights), detached,
    contiguous and on the CPU: what safetensors can write."""
    seen: set[tuple[int, tuple[int, ...], torch.dtype]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().cpu().contiguous()
    return out


def write_shards(state: dict[str, torch.Tensor], directory: Path, stem: str, max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> list[str]:
    """Write `state` as one file or as shards of at most `max_shard_bytes` (a tensor larger than
    that gets a shard of its own) plus the index; returns the names of the files written."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        if shards[-1] and size + _nbytes(tensor) > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += _nbytes(tensor)
    if len(shards) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, str(directory / name), metadata=metadata)
    if len(shards) == 1:
        return names
    index = {"metadata": {"total_size": sum(_nbytes(t) for t in state.values())},
             "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
    index_name = f"{stem}.safetensors.index.json"
    write_json(directory / index_name, index)
    return names + [index_name]


def read_shards(directory: Path, stem: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of ``<stem>.safetensors`` or of the shards its index names; ValueError naming
    the file on any problem."""
    single, index_path = directory / f"{stem}.safetensors", directory / f"{stem}.safetensors.index.json"
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: field 'weight_map' must map tensor names to shard files")
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        weight_map, files = None, [single.name]
    else:
        raise ValueError(f"directory: {directory} holds neither {single.name} nor {index_path.name}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        try:
            with safe_open(str(path), framework="pt", device=device) as f:
                for key in f.keys():
                    state[key] = f.get_tensor(key)
        except (OSError, SafetensorError, RuntimeError) as exc:
            raise ValueError(f"{path}: cannot read the safetensors file: {exc}") from exc
    if weight_map is not None:
        misplaced = sorted(k for k, v in weight_map.items() if k not in state)
        if misplaced or len(state) != len(weight_map):
            raise ValueError(f"{index_path}: field 'weight_map' disagrees with the shards "
                             f"(missing {misplaced[:3]}, {len(state)} tensors found, {len(weight_map)} listed)")
    return state


def write_json(path: Path, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the JSON file: {exc}") from exc


def file_digest(path: Path) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex} of a file, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def verify_files(directory: Path, recorded: dict[str, dict[str, Any]], record_path: Path) -> None:
    """Check the size and sha256 of every file `recorded` (by `record_path`) in `directory`."""
    if not isinstance(recorded, dict):
        raise ValueError(f"{record_path}: field 'files' must map file names to their size and sha256")
    for name, expected in recorded.items():
        path = directory / name
        if Path(name).name != name:
            raise ValueError(f"{record_path}: field 'files' names {name!r}, not a plain file name")
        if not path.is_file():
            raise ValueError(f"{path}: missing (listed in {record_path.name} field 'files')")
        actual = file_digest(path)
        for field in ("size", "sha256"):
            if actual[field] != expected.get(field):
                raise ValueError(f"{path}: {field} is {actual[field]}, but {record_path.name} field "
                                 f"'files.{name}.{field}' records {expected.get(field)} (truncated or modified)")


def write_checksummed_json(path: Path, data: dict[str, Any], section: str) -> None:
    """Write `data` with ``data[section]["checksum"]`` = the sha256 of the file's own bytes taken with
    the checksum field holding 64 zeros, so any change to any byte is detected on reading."""
    data[section]["checksum"] = CHECKSUM_PLACEHOLDER
    text = json.dumps(data, indent=2) + "\n"
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(f'"checksum": "{CHECKSUM_PLACEHOLDER}"', f'"checksum": "{digest}"', 1))
        f.flush()
        os.fsync(f.fileno())


def verify_checksummed_json(path: Path, data: dict[str, Any], section: str) -> None:
    """The check matching :func:`write_checksummed_json` (`data` is the parsed file)."""
    digest = data.get(section, {}).get("checksum")
    if not isinstance(digest, str) or len(digest) != 64:
        raise ValueError(f"{path}: field '{section}.checksum' is missing or malformed")
    raw = path.read_bytes()
    field = f'"checksum": "{digest}"'.encode()
    if raw.count(field) != 1:
        raise ValueError(f"{path}: field '{section}.checksum' does not match the file (modified)")
    blanked = raw.replace(field, f'"checksum": "{CHECKSUM_PLACEHOLDER}"'.encode(), 1)
    if hashlib.sha256(blanked).hexdigest() != digest:
        raise ValueError(f"{path}: field '{section}.checksum' does not match the file's content (modified)")

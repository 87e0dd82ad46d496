"""The file plumbing every writer and reader of salr shares: the one atomic file writer
(:func:`atomic_write`, temp file + fsync + rename) and its directory form
(:func:`write_directory_atomically`), safetensors shards with a Hugging Face index, file digests, and
a self-checksummed config.json (salr's own layout :mod:`salr.io.saved_model`, the compressed-tensors
and PEFT exports, training checkpoints, run directories, BM8x8 weight files).

This module imports nothing else of salr: every layer may use it.

Shards follow ``save_pretrained``'s naming: one ``<stem>.safetensors``, or
``<stem>-00001-of-0000N.safetensors`` files plus ``<stem>.safetensors.index.json``
(``{"metadata": {"total_size"}, "weight_map": {tensor: file}}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
CHECKSUM_PLACEHOLDER = "0" * 64


def jsonable(value: Any) -> Any:
    """`value` made JSON-writable: dict keys as strings, tuples as lists, tensors as (nested) lists
    and 0-d tensors / NumPy scalars as Python numbers, dtypes / devices / paths as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return value.item()  # a NumPy scalar
    return value


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    # A rename is durable only once the directory holding it is synced.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, suffix: str = ".tmp") -> Path:
    """Run ``write(tmp)`` on a temporary file in `path`'s folder (named ``.<name>.*<suffix>``: keep
    the suffix when the writer infers the format from it), fsync it and rename it onto `path`. An
    interrupted or failed write leaves `path` as it was and no temporary file behind."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_directory_atomically(final: str | os.PathLike, write: Callable[[Path], None],
                               overwrite: bool = False) -> Path:
    """Run ``write(tmp)`` on a fresh directory next to `final`, then rename it into place.

    A `final` that exists (non-empty) is replaced when `overwrite`, else kept: the new directory is
    dropped (a concurrent writer finished first). A failed write leaves nothing behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        if final.exists() and overwrite:
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, final)  # also replaces an empty directory
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


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

"""Training checkpoints: trainable parameters, optimizer, scheduler, RNG and data position.

Layout of one checkpoint (a directory under ``<run_dir>/checkpoints/``)::

    step-00000042/
        trainable.safetensors     the parameters with requires_grad=True, by name
        train_state.safetensors   optimizer state tensors + RNG state tensors
        state.json                everything else: step, scheduler, data position, history, config,
                                  the byte size + sha256 of the two tensor files, and a sha256 of
                                  its own contents (key "sha256")

No pickle anywhere: tensors go to safetensors, the rest to JSON. A checkpoint is written into a
temporary directory next to its final place, every file is fsync'ed, then the directory is renamed
into place (atomic on POSIX). ``state.json`` is written last and lists the hashes of the other
files, so a directory whose files are missing, truncated or altered is never taken for complete:
:func:`find_latest_checkpoint` skips it and falls back to the newest one that verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from salr._checks import check_int, check_module, check_path
from salr.io.files import file_digest, fsync_dir, fsync_file
from salr.ops.format import tensors_sha256
from salr.train.state import (  # noqa: F401 (unwrap_model, full_tensor, save_trainable: part of this module's API)
    capture_rng_state, _cpu_copy, full_tensor, _join_optimizer_state, load_trainable, restore_rng_state,
    save_trainable, _split_optimizer_state, trainable_parameters, unwrap_model)

CHECKPOINT_FORMAT = "salr-train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_DIRNAME = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"
STATE_FILE = "state.json"
_STEP_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


def _state_sha256(state: dict[str, Any]) -> str:
    """sha256 of state.json's contents without its own "sha256" key (canonical JSON), so an edit
    that still parses (a flipped digit in the step, a learning rate) is caught too."""
    body = {k: v for k, v in state.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, allow_nan=True)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file(tensors, str(path), metadata=metadata)
    fsync_file(path)


# ----------------------------------------------------------------------------- save

def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(check_path(run_dir, "run_dir")) / CHECKPOINT_DIRNAME


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, *, data_state: dict[str, Any],
                    history: list[dict[str, Any]] | None = None, config: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None, keep: int = 2,
                    rng_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
                    write: bool = True) -> Path | None:
    """Writes ``<run_dir>/checkpoints/step-<step>/`` atomically and returns its path.

    write: False gathers the tensors (the part of a sharded save every rank must join) and returns
    None without touching the disk; the rank with write=True writes.

    keep: how many complete checkpoints to keep (the newest); 0 keeps all. Leftover temporary
    directories from an interrupted save are removed here too.
    rng_state: a :func:`capture_rng_state` taken earlier (at the end of the step being saved);
    None captures the generators as they are now.
    """
    check_int(step, "step")
    check_module(model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(write, bool):
        raise ValueError(f"write: expected True or False, got {write!r}")
    root = checkpoint_root(run_dir)
    params = trainable_parameters(model)
    trainable = {n: _cpu_copy(p) for n, p in params.items()}  # same order on every rank: collectives
    opt_tensors, opt_meta = _split_optimizer_state(optimizer)
    if not write:
        return None
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_STEP_PREFIX}{step:08d}"
    tmp = root / f"{_TMP_PREFIX}{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _save_tensors(trainable, tmp / TRAINABLE_FILE, {"format": "salr-trainable", "sha256": tensors_sha256(trainable)})
        rng_tensors, rng_meta = rng_state if rng_state is not None else capture_rng_state()
        _save_tensors({**opt_tensors, **rng_tensors}, tmp / TRAIN_STATE_FILE)
        digests = {name: file_digest(tmp / name) for name in (TRAINABLE_FILE, TRAIN_STATE_FILE)}
        files = {name: {"bytes": d["size"], "sha256": d["sha256"]} for name, d in digests.items()}
        state = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": int(step),
            "files": files, "trainable_names": list(params),
            "optimizer": opt_meta, "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_meta, "data": data_state, "history": history or [], "config": config or {},
            "extra": extra or {},
        }
        state["sha256"] = _state_sha256(state)
        _write_json(tmp / STATE_FILE, state)  # last: its presence + hashes mark the set complete
        fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. Ctrl-C right after a periodic save)
            stale = root / f"{_TMP_PREFIX}old-{final.name}.{uuid.uuid4().hex[:8]}"
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep, protect=final)
    return final


def _prune(root: Path, keep: int, protect: Path) -> None:
    for entry in root.iterdir():
        if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)  # debris of a save that never finished
    if keep <= 0:
        return
    complete = [p for p in _step_dirs(root) if verify_checkpoint(p, hashes=False) is None]
    for path in complete[:-keep]:
        if path != protect:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- find + verify

def _step_dirs(root: Path) -> list[Path]:
    """step-* directories, oldest first."""
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            suffix = entry.name[len(_STEP_PREFIX):]
            if entry.name.startswith(_STEP_PREFIX) and suffix.isdigit() and entry.is_dir():
                found.append((int(suffix), entry))
    return [p for _, p in sorted(found)]


def verify_checkpoint(path: str | os.PathLike, hashes: bool = True) -> str | None:
    """None when ``path`` is a complete checkpoint, else the reason it is not."""
    path = Path(check_path(path, "path"))
    try:
        with open(path / STATE_FILE, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({e})"
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        return f"{STATE_FILE} is not a {CHECKPOINT_FORMAT}"
    if state.get("version") != CHECKPOINT_VERSION:
        return f"version {state.get('version')} (this salr reads {CHECKPOINT_VERSION})"
    # Checkpoints of salr < 0.1.1 have no "sha256"; a damaged key leaves the contents intact.
    if "sha256" in state and state["sha256"] != _state_sha256(state):
        return f"{STATE_FILE} does not match its 'sha256' (altered)"
    if not isinstance(state.get("files"), dict) or not all(
            isinstance(info, dict) and {"bytes", "sha256"} <= set(info) for info in state["files"].values()):
        return f"{STATE_FILE} has no valid 'files' record"
    for name, info in state.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != info["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {info['bytes']} expected (truncated?)"
        if hashes and file_digest(file)["sha256"] != info["sha256"]:
            return f"{name} does not match its sha256"
    if set(state.get("files", {})) != {TRAINABLE_FILE, TRAIN_STATE_FILE}:
        return "the file list is incomplete"
    return None


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``<run_dir>/checkpoints``, or None.

    Incomplete ones (interrupted save, truncated or missing file) are skipped, with a warning.
    """
    import warnings
    for path in reversed(_step_dirs(checkpoint_root(run_dir))):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        warnings.warn(f"skipping incomplete checkpoint {path}: {reason}", stacklevel=2)
    return None


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON part of a checkpoint (step, data position, history, config, ...)."""
    file = Path(check_path(path, "path")) / STATE_FILE
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"path: cannot read {file}: {exc}") from exc


# ----------------------------------------------------------------------------- load

def load_checkpoint(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, restore_rng: bool = True) -> dict[str, Any]:
    """Restores a checkpoint into ``model`` (trainable params), ``optimizer``, ``scheduler`` and the
    RNGs; returns its JSON state (``step``, ``data``, ``history``, ``config``, ``extra``)."""
    path = Path(path)
    reason = verify_checkpoint(path)
    if reason is not None:
        raise ValueError(f"load_checkpoint: {path} is not a complete checkpoint: {reason}")
    state = read_checkpoint_state(path)
    names = list(trainable_parameters(model))
    if names != state["trainable_names"]:
        missing = sorted(set(state["trainable_names"]) - set(names))
        extra = sorted(set(names) - set(state["trainable_names"]))
        raise ValueError(f"load_checkpoint: {path}: the model's trainable parameters differ from the "
                         f"checkpoint's (only in checkpoint: {missing[:5]}, only in model: {extra[:5]}"
                         f"{', or their order' if not (missing or extra) else ''})")
    load_trainable(model, path / TRAINABLE_FILE, strict=True)
    tensors = load_file(str(path / TRAIN_STATE_FILE))
    if optimizer is not None:
        in_order = [p for group in optimizer.param_groups for p in group["params"]]
        optimizer.load_state_dict(_join_optimizer_state(tensors, state["optimizer"], in_order))
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        restore_rng_state(tensors, state["rng"])
    return state

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
import random
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from salr._checks import check_int, check_module, check_path
from salr.format import tensors_sha256
from salr.interop.files import file_digest

CHECKPOINT_FORMAT = "salr-train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_DIRNAME = "checkpoints"
TRAINABLE_FILE = "trainable.safetensors"
TRAIN_STATE_FILE = "train_state.safetensors"
STATE_FILE = "state.json"
_STEP_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"


# ----------------------------------------------------------------------------- small helpers

def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP / FSDP-style wrapper, so parameter names never carry 'module.'."""
    check_module(model)
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """name -> parameter for every parameter with requires_grad=True (shared ones once)."""
    return {name: p for name, p in unwrap_model(model).named_parameters() if p.requires_grad}


def _is_dtensor(t: torch.Tensor) -> bool:
    # A DTensor exists only once its module is loaded (FSDP loads it): importing it here would
    # cost every `import salr` most of a second.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (FSDP2 shard: a collective, every rank must call it); any
    other tensor as it is."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"t: expected a torch.Tensor, got {type(t).__name__}")
    return t.full_tensor() if _is_dtensor(t) else t


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like``: this rank's slice when ``like`` is a DTensor. Every rank
    holds the whole tensor (read from the file), so it is split locally, without communication."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses views and shared storage: an owned contiguous CPU copy is always safe.
    return full_tensor(t.detach()).to("cpu", copy=True).contiguous()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
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
    _fsync_file(path)


# ----------------------------------------------------------------------------- trainable params

def save_trainable(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Writes the trainable parameters (by name) to one safetensors file, atomically."""
    path = Path(path)
    params = trainable_parameters(model)
    if not params:
        raise ValueError("save_trainable: the model has no parameter with requires_grad=True")
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tensors = {n: _cpu_copy(p) for n, p in params.items()}
        _save_tensors(tensors, tmp, {"format": "salr-trainable", "sha256": tensors_sha256(tensors)})
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_trainable(model: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> list[str]:
    """Copies saved trainable parameters into ``model`` in place; returns the names loaded.

    strict: every trainable parameter of the model must be in the file and every tensor in the file
    must be a trainable parameter of the model, with the same shape.
    """
    try:
        saved = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            digest = (f.metadata() or {}).get("sha256")
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"load_trainable: {path}: cannot read the safetensors file: {exc}") from exc
    # Files of salr < 0.1.1 have no sha256; a damaged key leaves the contents intact.
    if digest is not None and digest != tensors_sha256(saved):
        raise ValueError(f"load_trainable: {path}: the tensors do not match the file's 'sha256' (truncated or altered)")
    params = trainable_parameters(model)
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if strict and (missing or unexpected):
        raise ValueError(f"load_trainable: {path}: parameters missing from the file {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, in the file but not trainable in the "
                         f"model {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    loaded = []
    with torch.no_grad():
        for name, p in params.items():
            if name not in saved:
                continue
            t = saved[name]
            if t.shape != p.shape:
                raise ValueError(f"load_trainable: {path}: '{name}' has shape {tuple(t.shape)} in the "
                                 f"file, {tuple(p.shape)} in the model")
            p.copy_(_shard_like(t, p))
            loaded.append(name)
    return loaded


# ----------------------------------------------------------------------------- RNG state

def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json) holding the torch CPU/CUDA, Python and NumPy generator states."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, mt_state, gauss = random.getstate()
    meta: dict[str, Any] = {"python": [version, list(mt_state), gauss]}
    try:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        meta["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    if not isinstance(tensors, dict) or not isinstance(tensors.get("rng.torch"), torch.Tensor):
        raise ValueError("tensors: expected the tensors of capture_rng_state() (with 'rng.torch')")
    if not isinstance(meta, dict):
        raise ValueError(f"meta: expected the dict of capture_rng_state(), got {type(meta).__name__}")
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                              key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    if "python" in meta:
        version, mt_state, gauss = meta["python"]
        random.setstate((version, tuple(mt_state), gauss))
    if "numpy" in meta:
        try:
            import numpy as np
            name, keys, pos, has_gauss, cached = meta["numpy"]
            np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        except ImportError:
            pass


# ----------------------------------------------------------------------------- optimizer state

def _split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """optimizer.state_dict() as (tensors for safetensors, the JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{key}"] = _cpu_copy(value)
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                          params: list[torch.Tensor]) -> dict[str, Any]:
    """The optimizer.state_dict() split by :func:`_split_optimizer_state`; ``params`` (the optimizer's
    parameters in state_dict order) give sharded ones their slice of the per-parameter tensors."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            param = params[int(idx)] if int(idx) < len(params) else None
            if param is not None and value.shape == param.shape:  # exp_avg, exp_avg_sq; not "step"
                value = _shard_like(value, param)
            state.setdefault(int(idx), {})[name] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])  # AdamW keeps betas as a tuple; JSON made it a list
        groups.append(g)
    return {"state": state, "param_groups": groups}


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
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. Ctrl-C right after a periodic save)
            stale = root / f"{_TMP_PREFIX}old-{final.name}.{uuid.uuid4().hex[:8]}"
            os.replace(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
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

"""What a training checkpoint holds besides its layout: the trainable parameters (gathered from
FSDP shards when needed) in a safetensors file of their own, the RNG streams, and the optimizer
state split into tensors (safetensors) and the rest (JSON). :mod:`salr.train.checkpoint` writes and
verifies the directories.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from salr._checks import check_module
from salr.io.files import atomic_write
from salr.ops.format import tensors_sha256


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


# ----------------------------------------------------------------------------- trainable params

def save_trainable(model: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Writes the trainable parameters (by name) to one safetensors file, atomically."""
    path = Path(path)
    params = trainable_parameters(model)
    if not params:
        raise ValueError("save_trainable: the model has no parameter with requires_grad=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {n: _cpu_copy(p) for n, p in params.items()}
    metadata = {"format": "salr-trainable", "sha256": tensors_sha256(tensors)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


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

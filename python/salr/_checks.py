"""Argument checks shared by the public functions: each raises ValueError naming the argument and
saying why (convention: "name: must be ..., got ...")."""

from __future__ import annotations

import os
from typing import Any

import torch


def check_module(value: Any, name: str = "model") -> torch.nn.Module:
    if not isinstance(value, torch.nn.Module):
        raise ValueError(f"{name}: expected a torch.nn.Module, got {type(value).__name__}")
    return value


def check_int(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


def check_fraction(value: Any, name: str, *, closed: bool = True) -> float:
    """A number in [0, 1] (or [0, 1) when not `closed`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok or (not closed and value == 1.0):
        raise ValueError(f"{name}: must be a number in [0, 1{']' if closed else ')'}, got {value!r}")
    return float(value)


def check_path(value: Any, name: str) -> str:
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{name}: expected a path (str or os.PathLike), got {type(value).__name__}")
    return os.fspath(value)


def check_tensor(value: Any, name: str, dim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name}: must be {dim}-D, got shape {tuple(value.shape)}")
    return value

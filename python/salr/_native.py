"""Loads salr's native pieces: ``lib/libsalr_ops.so`` (every ``torch.ops.salr`` op) and ``_C``
(build facts). ``import salr`` never fails because of them: without the library the pure-PyTorch
reference serves (convention 9) and :func:`native_error` says what is missing and how to fix it.
"""

from __future__ import annotations

import glob
import os

import torch

_LIB_DIR = os.path.join(os.path.dirname(__file__), "lib")
_error: str | None = None
_C = None


def _load() -> None:
    global _error, _C
    candidates = sorted(glob.glob(os.path.join(_LIB_DIR, "libsalr_ops*.so")))
    if not candidates:
        _error = (
            f"salr: the native library is missing (no libsalr_ops*.so in {_LIB_DIR}); "
            "build it with `pip install --no-build-isolation .` from the salr source tree. "
            "The pure-PyTorch reference path is used meanwhile."
        )
        return
    try:
        torch.ops.load_library(candidates[0])
        import salr._C as native_module  # noqa: PLC0415 - only after the library loaded (not `from salr
        # import _C`: that reads as an import of the salr package, which imports every layer)
    except (OSError, ImportError, RuntimeError) as exc:
        _error = (
            f"salr: could not load the native library {candidates[0]} with torch "
            f"{torch.__version__}: {exc}. It was probably built against another torch; rebuild "
            "with `pip install --no-build-isolation .`. The pure-PyTorch reference path is used meanwhile."
        )
        return
    _C = native_module


def native_available() -> bool:
    """True when ``torch.ops.salr`` kernels are loaded."""
    return _error is None


def native_error() -> str | None:
    """Why the native library is not loaded (``None`` when it is)."""
    return _error


def cpu_isa() -> str:
    """The CPU kernel path the next call takes: ``scalar``, ``avx2`` or ``avx512`` (honours
    ``SALR_CPU_ISA``), or ``reference`` when the native library is missing."""
    return _C.selected_cpu_isa() if _C is not None else "reference"


def available_cpu_isas() -> list[str]:
    """CPU kernel paths this build contains and this CPU runs (``SALR_CPU_ISA`` may force one)."""
    return list(_C.available_cpu_isas()) if _C is not None else []


_load()

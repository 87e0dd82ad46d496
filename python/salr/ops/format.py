"""``BitmapSparseWeight``: a BM8x8 weight as one value (design.md §1).

Holds ``bitmap`` / ``values`` / ``offsets`` and the logical shape, moves between devices, computes
``x·Wᵀ (+ adapters, bias)`` with the fused op, and saves/loads with safetensors (no pickle; writes
are atomic; loads verify the format name, version, shapes, dtypes, a sha256 of the contents and the
bitmap/offsets agreement).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from salr._checks import check_path, check_tensor
from salr.io.files import atomic_write
from salr.ops import reference, wrappers as ops

FORMAT_NAME = "salr.bm8x8"
FORMAT_VERSION = 1
_TENSOR_NAMES = ("bitmap", "values", "offsets")
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def tensors_sha256(tensors: dict[str, torch.Tensor], header: str = "") -> str:
    """sha256 of `header` and every tensor's name, dtype, shape and bytes, in name order: what a
    safetensors file of ours stores in its metadata so a load can tell altered contents (the
    safetensors format itself has no checksum)."""
    if not isinstance(tensors, dict):
        raise ValueError(f"tensors: expected a dict of name -> tensor, got {type(tensors).__name__}")
    for name, t in tensors.items():
        check_tensor(t, f"tensors[{name!r}]")
    digest = hashlib.sha256(header.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class BitmapSparseWeight:
    """A sparse weight of logical shape ``(rows, cols)`` = (out_features, in_features) in BM8x8."""

    bitmap: torch.Tensor
    values: torch.Tensor
    offsets: torch.Tensor
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.values.dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"BitmapSparseWeight: values must be float32, bfloat16 or float16, got {self.values.dtype}")
        if self.rows < 0 or self.cols < 0:
            raise ValueError(f"BitmapSparseWeight: rows and cols must be >= 0, got {self.rows}, {self.cols}")
        devices = {self.bitmap.device, self.values.device, self.offsets.device}
        if len(devices) != 1:
            raise ValueError(f"BitmapSparseWeight: bitmap, values and offsets must share a device, got {devices}")
        if tuple(self.bitmap.shape) != (reference.num_bands(self.rows), reference.tiles_per_band(self.cols)):
            raise ValueError(f"BitmapSparseWeight: bitmap shape {tuple(self.bitmap.shape)} does not fit a "
                             f"[{self.rows}, {self.cols}] weight")

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "BitmapSparseWeight":
        """Encode a dense [rows, cols] weight; its zeros become the sparsity pattern."""
        if dense.dim() != 2:
            raise ValueError(f"BitmapSparseWeight.from_dense: dense must be 2-D, got shape {tuple(dense.shape)}")
        bitmap, values, offsets = ops.bitmap_encode(dense.detach())
        return cls(bitmap, values, offsets, dense.shape[0], dense.shape[1])

    def to_dense(self) -> torch.Tensor:
        return ops.bitmap_decode(self.bitmap, self.values, self.offsets, self.rows, self.cols)

    def validate(self) -> "BitmapSparseWeight":
        """Full consistency check (offsets against popcounts, padding bits clear); returns self."""
        reference.check_weight("BitmapSparseWeight", self.bitmap, self.values, self.offsets, self.rows, self.cols)
        return self

    # ---- properties ----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.rows * self.cols)

    @property
    def index_bytes(self) -> int:
        """Bytes of bitmap + offsets: the format's overhead over the values."""
        return self.bitmap.numel() * 8 + self.offsets.numel() * 4

    @property
    def nbytes(self) -> int:
        return self.index_bytes + self.values.numel() * self.values.element_size()

    def bytes_per_weight(self) -> float:
        return self.nbytes / max(1, self.rows * self.cols)

    # ---- movement ------------------------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "BitmapSparseWeight":
        """Move to `device` and/or cast values to `dtype`. A cast that underflows a value to zero
        re-encodes, so the bitmap keeps meaning "nonzero"."""
        if dtype is not None and dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"BitmapSparseWeight.to: dtype: must be float32, bfloat16 or float16, got {dtype}")
        moved = BitmapSparseWeight(self.bitmap.to(device), self.values.to(device), self.offsets.to(device),
                                   self.rows, self.cols)
        if dtype is None or dtype == self.dtype:
            return moved
        cast = moved.values.to(dtype)
        if bool((cast == 0).any()):
            return BitmapSparseWeight.from_dense(moved.to_dense().to(dtype))
        return BitmapSparseWeight(moved.bitmap, cast, moved.offsets, self.rows, self.cols)

    # ---- compute -------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, adapter_a: torch.Tensor | None = None,
               adapter_b: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x·Wᵀ + (x·adapter_aᵀ)·adapter_bᵀ + bias`` through the fused op."""
        return ops.sparse_lowrank_gemm(x, self.bitmap, self.values, self.offsets, self.rows, self.cols,
                                       adapter_a, adapter_b, bias)

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (temp file in the same folder, then rename)."""
        path = check_path(path, "path")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"path: the folder of {path} does not exist")
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in _TENSOR_NAMES}
        metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                    "shape": json.dumps([self.rows, self.cols]), "dtype": str(self.dtype).removeprefix("torch.")}
        metadata["sha256"] = tensors_sha256(tensors, metadata["shape"] + metadata["dtype"])
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "BitmapSparseWeight":
        """Read a file written by :meth:`save`, verifying format, version, shapes and consistency."""
        path = check_path(path, "path")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
                names = set(f.keys())
                if metadata.get("format") != FORMAT_NAME:
                    raise ValueError(f"{path}: not a salr BM8x8 file (metadata 'format' is {metadata.get('format')!r})")
                if metadata.get("format_version") != str(FORMAT_VERSION):
                    raise ValueError(f"{path}: unsupported format_version {metadata.get('format_version')!r} "
                                     f"(this salr reads {FORMAT_VERSION})")
                if names != set(_TENSOR_NAMES):
                    raise ValueError(f"{path}: expected tensors {sorted(_TENSOR_NAMES)}, found {sorted(names)}")
                tensors = {name: f.get_tensor(name) for name in _TENSOR_NAMES}
                rows, cols = json.loads(metadata.get("shape", "null"))
        except (OSError, SafetensorError, RuntimeError, TypeError, ValueError, json.JSONDecodeError) as exc:
            if isinstance(exc, ValueError) and str(exc).startswith(path):
                raise
            raise ValueError(f"{path}: cannot read a salr BM8x8 file: {exc}") from exc
        # Files of salr < 0.1.1 have no sha256; a damaged key leaves the contents intact.
        if "sha256" in metadata and metadata["sha256"] != tensors_sha256(
                tensors, metadata.get("shape", "") + metadata.get("dtype", "")):
            raise ValueError(f"{path}: the contents do not match the file's 'sha256' (truncated or altered)")
        if metadata.get("dtype") != str(tensors["values"].dtype).removeprefix("torch."):
            raise ValueError(f"{path}: metadata dtype {metadata.get('dtype')!r} disagrees with values "
                             f"{tensors['values'].dtype}")
        try:
            weight = cls(tensors["bitmap"], tensors["values"], tensors["offsets"], int(rows), int(cols)).validate()
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        return weight.to(device)

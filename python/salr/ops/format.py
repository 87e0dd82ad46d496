"""``BitmapSparseWeight``: a BM8x8 weight as one value (design.md §1).

Holds ``bitmap`` / ``values`` / ``offsets`` and the logical shape, moves between devices, computes
``x·Wᵀ (+ adapters, bias)`` with the fused op, and saves/loads with safetensors (no pickle; writes
are atomic; loads verify the format name, version, shapes, dtypes, a sha256 of the contents and the
bitmap/offsets agreement).

An int8 weight (issue 21) also carries ``scales``: fp32, one per output row [N] or one per row and
64-column group [N, ceil(K/64)]; W[n, k] = scales[n] · q[n, k] (resp. scales[n, k // 64] · q[n, k]).
Files of int8 weights hold a fourth tensor ``scales`` and say ``format_version`` 2 (so a salr that
predates them refuses them by version); float weights are still written as version 1.
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
QUANTIZED_FORMAT_VERSION = 2  # a file with int8 values and scales
_TENSOR_NAMES = ("bitmap", "values", "offsets")
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GROUP_SIZE = reference.TILE * reference.TILES_PER_GROUP  # the offsets' column group: per-group scales


def check_scales(scales: object, rows: int, cols: int, name: str = "scales") -> torch.Tensor:
    """fp32 [rows] or [rows, ceil(cols/64)], every entry finite and > 0; ValueError naming `name`."""
    check_tensor(scales, name)
    if scales.dtype != torch.float32:
        raise ValueError(f"{name}: expected float32, got {scales.dtype}")
    shapes = ((rows,), (rows, reference.groups_per_band(cols)))
    if tuple(scales.shape) not in shapes:
        raise ValueError(f"{name}: expected shape {shapes[0]} (per row) or {shapes[1]} (per 64-column group) "
                         f"for a [{rows}, {cols}] weight, got {tuple(scales.shape)}")
    if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
        raise ValueError(f"{name}: every scale must be finite and > 0 (no zero, negative, NaN or inf)")
    return scales


def column_scales(scales: torch.Tensor, cols: int) -> torch.Tensor:
    """The scale of every weight, [N, cols], from per-row [N] or per-group [N, G] scales."""
    check_tensor(scales, "scales")
    if scales.dim() == 1:
        return scales.unsqueeze(1).expand(-1, cols)
    return scales.repeat_interleave(GROUP_SIZE, dim=1)[:, :cols]


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
    scales: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.values.dtype == torch.int8:
            if self.scales is None:
                raise ValueError("BitmapSparseWeight: scales: int8 values need scales (fp32 [rows] or "
                                 "[rows, ceil(cols/64)])")
        elif self.values.dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"BitmapSparseWeight: values must be float32, bfloat16, float16 or int8, "
                             f"got {self.values.dtype}")
        elif self.scales is not None:
            raise ValueError(f"BitmapSparseWeight: scales: only int8 values take scales, values are {self.values.dtype}")
        if self.rows < 0 or self.cols < 0:
            raise ValueError(f"BitmapSparseWeight: rows and cols must be >= 0, got {self.rows}, {self.cols}")
        if self.scales is not None:
            try:
                check_scales(self.scales, self.rows, self.cols)
            except ValueError as exc:
                raise ValueError(f"BitmapSparseWeight: {exc}") from None
        devices = {self.bitmap.device, self.values.device, self.offsets.device}
        if self.scales is not None:
            devices.add(self.scales.device)
        if len(devices) != 1:
            raise ValueError(f"BitmapSparseWeight: bitmap, values and offsets must share a device, got {devices}")
        if tuple(self.bitmap.shape) != (reference.num_bands(self.rows), reference.tiles_per_band(self.cols)):
            raise ValueError(f"BitmapSparseWeight: bitmap shape {tuple(self.bitmap.shape)} does not fit a "
                             f"[{self.rows}, {self.cols}] weight")

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: torch.Tensor, scales: torch.Tensor | None = None) -> "BitmapSparseWeight":
        """Encode a dense [rows, cols] weight; its zeros become the sparsity pattern. An int8 `dense`
        (the quantized grid q) needs its `scales` (see the module doc)."""
        if dense.dim() != 2:
            raise ValueError(f"BitmapSparseWeight.from_dense: dense must be 2-D, got shape {tuple(dense.shape)}")
        bitmap, values, offsets = ops.bitmap_encode(dense.detach())
        return cls(bitmap, values, offsets, dense.shape[0], dense.shape[1], scales)

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense [rows, cols] weight in `dtype` (default: the values' dtype; fp32 for int8, which
        is dequantized: scales · q)."""
        if dtype is not None and dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"BitmapSparseWeight.to_dense: dtype: must be float32, bfloat16 or float16, got {dtype}")
        dense = ops.bitmap_decode(self.bitmap, self.values, self.offsets, self.rows, self.cols)
        if self.scales is not None:
            dense = reference.dequantize(dense, self.scales, torch.float32)
        return dense if dtype is None else dense.to(dtype)

    @property
    def quantized(self) -> bool:
        return self.scales is not None

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
        scales = 0 if self.scales is None else self.scales.numel() * 4
        return self.index_bytes + self.values.numel() * self.values.element_size() + scales

    def bytes_per_weight(self) -> float:
        return self.nbytes / max(1, self.rows * self.cols)

    # ---- movement ------------------------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "BitmapSparseWeight":
        """Move to `device` and/or cast values to `dtype`. A cast that underflows a value to zero
        re-encodes, so the bitmap keeps meaning "nonzero". An int8 weight cast to a float dtype is
        dequantized; quantizing is :mod:`salr.prune.quantize`'s job, not a cast."""
        if dtype is not None and dtype not in _WEIGHT_DTYPES + (torch.int8,):
            raise ValueError(f"BitmapSparseWeight.to: dtype: must be float32, bfloat16 or float16, got {dtype}")
        if dtype == torch.int8 and not self.quantized:
            raise ValueError("BitmapSparseWeight.to: dtype: must be float32, bfloat16 or float16 (int8 needs "
                             "scales: quantize with salr.prune.quantize.quantize_int8, not a cast)")
        scales = None if self.scales is None else self.scales.to(device)
        moved = BitmapSparseWeight(self.bitmap.to(device), self.values.to(device), self.offsets.to(device),
                                   self.rows, self.cols, scales)
        if dtype is None or dtype == self.dtype:
            return moved
        if moved.quantized:
            return BitmapSparseWeight.from_dense(moved.to_dense(dtype))
        cast = moved.values.to(dtype)
        if bool((cast == 0).any()):
            return BitmapSparseWeight.from_dense(moved.to_dense().to(dtype))
        return BitmapSparseWeight(moved.bitmap, cast, moved.offsets, self.rows, self.cols)

    # ---- compute -------------------------------------------------------------------------------
    def linear(self, x: torch.Tensor, adapter_a: torch.Tensor | None = None,
               adapter_b: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x·Wᵀ + (x·adapter_aᵀ)·adapter_bᵀ + bias`` through the fused op."""
        return ops.sparse_lowrank_gemm(x, self.bitmap, self.values, self.offsets, self.rows, self.cols,
                                       adapter_a, adapter_b, bias, scales=self.scales)

    # ---- files ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically (temp file in the same folder, then rename)."""
        path = check_path(path, "path")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"path: the folder of {path} does not exist")
        names = _TENSOR_NAMES + (("scales",) if self.quantized else ())
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in names}
        version = QUANTIZED_FORMAT_VERSION if self.quantized else FORMAT_VERSION
        metadata = {"format": FORMAT_NAME, "format_version": str(version),
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
                version = metadata.get("format_version")
                if version not in (str(FORMAT_VERSION), str(QUANTIZED_FORMAT_VERSION)):
                    raise ValueError(f"{path}: unsupported format_version {version!r} "
                                     f"(this salr reads {FORMAT_VERSION} and {QUANTIZED_FORMAT_VERSION})")
                expected = set(_TENSOR_NAMES) | ({"scales"} if version == str(QUANTIZED_FORMAT_VERSION) else set())
                if names != expected:
                    raise ValueError(f"{path}: expected tensors {sorted(expected)}, found {sorted(names)}")
                tensors = {name: f.get_tensor(name) for name in sorted(expected)}
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
            weight = cls(tensors["bitmap"], tensors["values"], tensors["offsets"], int(rows), int(cols),
                         tensors.get("scales")).validate()
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        return weight.to(device)

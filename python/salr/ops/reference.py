"""Pure-PyTorch definitions of every salr op: the test oracle and the fallback when the native
library is missing (design.md §3). Written for clarity, not speed: they decode the whole weight.

BM8x8 in tensors: ``bitmap`` int64 [bands, tiles] (the 64-bit tile word; bit r*8+c is W[8i+r, 8j+c]
!= 0, bit 63 being the sign bit), ``values`` 1-D in tile order, ``offsets`` int32
[bands*groups + 1] (first value of every band at every 64-column group, then the value count).
int8 ``values`` come with fp32 ``scales``, [N] or [N, groups]: W[n, k] = scales[n] · q[n, k] (resp.
scales[n, k // 64] · q[n, k]); the products dequantize, then multiply (issue 21).
"""

from __future__ import annotations

import torch

TILE = 8
TILES_PER_GROUP = 8
_BIT_SHIFTS = torch.arange(64, dtype=torch.int64)
VALUES_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8)


def num_bands(rows: int) -> int:
    return (rows + TILE - 1) // TILE


def tiles_per_band(cols: int) -> int:
    return (cols + TILE - 1) // TILE


def groups_per_band(cols: int) -> int:
    return (tiles_per_band(cols) + TILES_PER_GROUP - 1) // TILES_PER_GROUP


def num_offsets(rows: int, cols: int) -> int:
    return num_bands(rows) * groups_per_band(cols) + 1


def popcount64(words: torch.Tensor) -> torch.Tensor:
    """Per-element popcount of an int64 tensor (SWAR; masks keep arithmetic shifts harmless)."""
    v = words - ((words >> 1) & 0x5555555555555555)
    v = (v & 0x3333333333333333) + ((v >> 2) & 0x3333333333333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0F
    return (v * 0x0101010101010101) >> 56


def to_tiles(dense: torch.Tensor) -> torch.Tensor:
    """[rows, cols] -> zero-padded tiles [bands, tiles, 64], each tile row-major."""
    rows, cols = dense.shape
    padded = dense.new_zeros(num_bands(rows) * TILE, tiles_per_band(cols) * TILE)
    padded[:rows, :cols] = dense
    bands, tiles = padded.shape[0] // TILE, padded.shape[1] // TILE
    return padded.view(bands, TILE, tiles, TILE).permute(0, 2, 1, 3).reshape(bands, tiles, 64)


def from_tiles(tiles: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`to_tiles`, cropped to [rows, cols]."""
    bands, n_tiles = tiles.shape[:2]
    dense = tiles.view(bands, n_tiles, TILE, TILE).permute(0, 2, 1, 3).reshape(bands * TILE, n_tiles * TILE)
    return dense[:rows, :cols]


def unpack_bitmap(bitmap: torch.Tensor) -> torch.Tensor:
    """int64 [bands, tiles] -> bool mask [bands, tiles, 64]."""
    return ((bitmap.unsqueeze(-1) >> _BIT_SHIFTS.to(bitmap.device)) & 1).bool()


def group_counts(tile_counts: torch.Tensor) -> torch.Tensor:
    """Values per (band, 64-column group) from values per tile [bands, tiles]."""
    bands, tiles = tile_counts.shape
    groups = (tiles + TILES_PER_GROUP - 1) // TILES_PER_GROUP
    padded = tile_counts.new_zeros(bands, groups * TILES_PER_GROUP)
    padded[:, :tiles] = tile_counts
    return padded.view(bands, groups, TILES_PER_GROUP).sum(-1)


def offsets_from_counts(counts: torch.Tensor) -> torch.Tensor:
    flat = counts.reshape(-1).to(torch.int64)
    return torch.cat([flat.new_zeros(1), torch.cumsum(flat, 0)]).to(torch.int32)


def check_weight(op: str, bitmap: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                 rows: int, cols: int) -> None:
    """Raise ValueError naming `op` and the argument unless the three tensors form a valid BM8x8
    weight of shape [rows, cols] (the full check: offsets against popcounts, padding bits clear)."""
    if bitmap.dtype != torch.int64 or offsets.dtype != torch.int32:
        raise ValueError(f"salr.{op}: bitmap must be int64 and offsets int32, got {bitmap.dtype} and {offsets.dtype}")
    if values.dim() != 1 or values.dtype not in VALUES_DTYPES:
        raise ValueError(f"salr.{op}: values must be a 1-D float or int8 tensor, got {values.dtype} "
                         f"of shape {tuple(values.shape)}")
    if tuple(bitmap.shape) != (num_bands(rows), tiles_per_band(cols)):
        raise ValueError(f"salr.{op}: bitmap must have shape {(num_bands(rows), tiles_per_band(cols))} "
                         f"for a [{rows}, {cols}] weight, got {tuple(bitmap.shape)}")
    if tuple(offsets.shape) != (num_offsets(rows, cols),):
        raise ValueError(f"salr.{op}: offsets must have {num_offsets(rows, cols)} entries, got {tuple(offsets.shape)}")
    expected = offsets_from_counts(group_counts(popcount64(bitmap)))
    if not torch.equal(expected.cpu(), offsets.cpu()) or int(expected[-1]) != values.numel():
        raise ValueError(f"salr.{op}: bitmap, values and offsets are inconsistent (popcounts give "
                         f"{int(expected[-1])} values, offsets end at {int(offsets[-1])}, values has {values.numel()})")
    padding = ~to_tiles(torch.ones(rows, cols, dtype=torch.bool, device=bitmap.device))
    if (unpack_bitmap(bitmap) & padding).any():
        raise ValueError(f"salr.{op}: bitmap has bits set in the zero padding of a [{rows}, {cols}] weight")


def bitmap_encode(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if dense.dim() != 2:
        raise ValueError(f"salr.bitmap_encode: dense must be 2-D, got shape {tuple(dense.shape)}")
    tiles = to_tiles(dense)
    mask = tiles != 0
    bitmap = (mask.to(torch.int64) << _BIT_SHIFTS.to(dense.device)).sum(-1)  # distinct bits: sum == or
    values = tiles[mask]
    offsets = offsets_from_counts(group_counts(mask.sum(-1)))
    return bitmap, values.contiguous(), offsets


def bitmap_decode(bitmap: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor,
                  rows: int, cols: int) -> torch.Tensor:
    check_weight("bitmap_decode", bitmap, values, offsets, rows, cols)
    mask = unpack_bitmap(bitmap)
    tiles = values.new_zeros(mask.shape)
    tiles[mask] = values
    return from_tiles(tiles, rows, cols).contiguous()


def check_scales(op: str, values: torch.Tensor, scales: torch.Tensor | None, rows: int, cols: int) -> None:
    """Raise ValueError naming `op` and `scales` unless they fit the values: required (float32,
    [rows] or [rows, groups], finite and > 0) with int8 values, None otherwise."""
    if values.dtype != torch.int8:
        if scales is not None:
            raise ValueError(f"salr.{op}: scales must be None with {values.dtype} values (scales dequantize int8 values)")
        return
    shapes = ((rows,), (rows, groups_per_band(cols)))
    if scales is None or scales.dtype != torch.float32 or tuple(scales.shape) not in shapes:
        got = None if scales is None else f"{scales.dtype} of shape {tuple(scales.shape)}"
        raise ValueError(f"salr.{op}: scales must be float32 of shape {shapes[0]} or {shapes[1]} with int8 values, got {got}")
    if not bool((torch.isfinite(scales) & (scales > 0)).all()):
        raise ValueError(f"salr.{op}: scales must be finite and > 0")


def dequantize(dense_q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scales · q for a decoded int8 [rows, cols] weight, in `dtype` (one rounding: the product)."""
    cols = dense_q.shape[1]
    if scales.dim() == 1:
        return dense_q.to(dtype) * scales.to(dtype).unsqueeze(1)
    per_column = scales.to(dtype).repeat_interleave(TILE * TILES_PER_GROUP, dim=1)[:, :cols]
    return dense_q.to(dtype) * per_column


def weight_in(compute: torch.dtype, bitmap, values, offsets, rows, cols, scales, op: str) -> torch.Tensor:
    """The dense weight in `compute`: decoded, and dequantized when the values are int8."""
    check_scales(op, values, scales, rows, cols)
    weight = bitmap_decode(bitmap, values, offsets, rows, cols)
    return dequantize(weight, scales, compute) if values.dtype == torch.int8 else weight.to(compute)


def dequantized_adapter(adapter_a: torch.Tensor, adapter_b: torch.Tensor, adapter_scales: torch.Tensor | None,
                        dtype: torch.dtype, op: str = "sparse_lowrank_gemm") -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in `dtype`; an int8 adapter (adapter_scales [N] fp32, finite, > 0) read as A = q_a,
    B = diag(adapter_scales)·q_b."""
    if adapter_scales is None:
        if adapter_a.dtype == torch.int8:
            raise ValueError(f"salr.{op}: adapter_scales is required with an int8 adapter_a")
        return adapter_a.to(dtype), adapter_b.to(dtype)
    if adapter_a.dtype != torch.int8 or adapter_b.dtype != torch.int8:
        raise ValueError(f"salr.{op}: adapter_scales needs int8 adapter_a and adapter_b, got {adapter_a.dtype} "
                         f"and {adapter_b.dtype}")
    if adapter_scales.dtype != torch.float32 or tuple(adapter_scales.shape) != (adapter_b.shape[0],):
        raise ValueError(f"salr.{op}: adapter_scales must be float32 [{adapter_b.shape[0]}], got "
                         f"{adapter_scales.dtype} {list(adapter_scales.shape)}")
    if not (torch.isfinite(adapter_scales).all() and (adapter_scales > 0).all()):
        raise ValueError(f"salr.{op}: adapter_scales must be finite and > 0")
    return scaled_adapter(adapter_a, adapter_b, adapter_scales, dtype)


def scaled_adapter(q_a: torch.Tensor, q_b: torch.Tensor, adapter_scales: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_a, diag(adapter_scales)·q_b) in `dtype`, B scaled in fp32 (or wider) and rounded once; unchecked
    (traceable: no data-dependent branch). No .to() that would return its input: the autograd setup
    calls this below the dispatcher's autograd key, where an op must not alias its input."""
    wide = torch.promote_types(dtype, torch.float32)
    scales = adapter_scales if adapter_scales.dtype == wide else adapter_scales.to(wide)
    b = q_b.to(wide) * scales.unsqueeze(1)
    return q_a.to(dtype), b if b.dtype == dtype else b.to(dtype)


def sparse_lowrank_gemm(x: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor,
                        offsets: torch.Tensor, out_features: int, in_features: int,
                        adapter_a: torch.Tensor | None = None, adapter_b: torch.Tensor | None = None,
                        bias: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                        adapter_scales: torch.Tensor | None = None) -> torch.Tensor:
    """y = x·W_sᵀ + (x·adapter_aᵀ)·adapter_bᵀ + bias, computed in at least fp32, returned in x's dtype
    (an int8 adapter dequantized first: :func:`dequantized_adapter`)."""
    if (adapter_a is None) != (adapter_b is None):
        raise ValueError("salr.sparse_lowrank_gemm: adapter_a and adapter_b must be given together")
    if adapter_scales is not None and adapter_a is None:
        raise ValueError("salr.sparse_lowrank_gemm: adapter_scales must be None without adapter_a and adapter_b")
    compute = torch.promote_types(x.dtype, torch.float32)
    weight = weight_in(compute, bitmap, values, offsets, out_features, in_features, scales, "sparse_lowrank_gemm")
    y = x.to(compute) @ weight.T
    if adapter_a is not None:
        a, b = dequantized_adapter(adapter_a, adapter_b, adapter_scales, compute)
        y = y + (x.to(compute) @ a.T) @ b.T
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def sparse_gemm_transposed(grad_out: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor,
                           offsets: torch.Tensor, out_features: int, in_features: int,
                           scales: torch.Tensor | None = None, adapter_a: torch.Tensor | None = None,
                           adapter_b: torch.Tensor | None = None) -> torch.Tensor:
    """dx = dy·(W_s + adapter_b·adapter_a), computed in at least fp32, returned in dy's dtype."""
    if (adapter_a is None) != (adapter_b is None):
        raise ValueError("salr.sparse_gemm_transposed: adapter_a and adapter_b must be given together")
    compute = torch.promote_types(grad_out.dtype, torch.float32)
    weight = weight_in(compute, bitmap, values, offsets, out_features, in_features, scales, "sparse_gemm_transposed")
    dx = grad_out.to(compute) @ weight
    if adapter_a is not None:
        dx = dx + (grad_out.to(compute) @ adapter_b.to(compute)) @ adapter_a.to(compute)
    return dx.to(grad_out.dtype)


def sampled_gemm(left: torch.Tensor, right: torch.Tensor, bitmap: torch.Tensor, values: torch.Tensor,
                 offsets: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """(leftᵀ·right) at the bitmap's nonzeros, shaped and typed like values (float values only)."""
    check_weight("sampled_gemm", bitmap, values, offsets, out_features, in_features)
    if values.dtype == torch.int8:
        raise ValueError("salr.sampled_gemm: values must be a float dtype, got int8: a quantized base is frozen "
                         "and has no values-gradient")
    compute = torch.promote_types(left.dtype, torch.float32)
    dense = left.to(compute).T @ right.to(compute)
    return to_tiles(dense)[unpack_bitmap(bitmap)].to(values.dtype)

"""``BitmapLinear``: the BM8x8-backed base every salr layer shares (SALRLinear, SALORLinear,
LoSALinear): the pruned weight W_s [out_features, in_features] as three buffers ``bitmap`` /
``values`` / ``offsets`` (docs/design.md §1), never as a dense tensor. Buffers, not parameters: the
base is frozen (LoSA changes its values through its own merge, not through the optimizer).

An int8 base (issue 21) holds int8 ``values`` and a fourth buffer ``scales`` (fp32 [N] or
[N, ceil(K/64)], W = scales · q); otherwise ``scales`` is None. The layer computes in
``compute_dtype`` (the values' dtype for a float base, the dtype the layer was built with for an
int8 one): x, adapters and bias are cast to it. ``module.to(dtype)`` changes the compute dtype and
leaves the int8 values and the fp32 scales exactly as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from salr import ops
from salr.ops import reference
from salr.ops.format import BitmapSparseWeight


class BitmapLinear(nn.Module):
    """Holds ``in_features``, ``out_features`` and the BM8x8 buffers of the base; subclasses add the
    adapters and the forward."""

    in_features: int
    out_features: int
    compute_dtype: torch.dtype

    def _register_base(self, weight: torch.Tensor, scales: torch.Tensor | None = None,
                       compute_dtype: torch.dtype | None = None) -> None:
        """Encode the dense [N, K] `weight` (its zeros are the mask) into the buffers: a float weight,
        or the int8 grid q with its `scales` and the layer's float `compute_dtype`."""
        bitmap, values, offsets = ops.bitmap_encode(weight.detach().contiguous())
        self.register_buffer("bitmap", bitmap)
        self.register_buffer("values", values)
        self.register_buffer("offsets", offsets)
        self.register_buffer("scales", None)
        self.compute_dtype = weight.dtype if compute_dtype is None else compute_dtype
        self._set_scales(weight, scales)

    def _set_scales(self, weight: torch.Tensor, scales: torch.Tensor | None) -> None:
        if (weight.dtype == torch.int8) != (scales is not None):
            raise ValueError(f"scales: an int8 base needs its scales and a float one takes none; got a "
                             f"{weight.dtype} weight and scales={'a tensor' if scales is not None else None}")
        if scales is not None:
            BitmapSparseWeight(self.bitmap, self.values, self.offsets, self.out_features, self.in_features,
                               scales.detach().to(self.values.device))  # checks the scales
            if self.compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"compute_dtype: an int8 base computes in float32, bfloat16 or float16, "
                                 f"got {self.compute_dtype}")
            self.scales = scales.detach().to(self.values.device).contiguous()
        else:
            self.scales = None
            self.compute_dtype = weight.dtype

    @torch.no_grad()
    def set_base(self, pruned_weight: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        """Re-encode the base from a dense [N, K] weight (its zeros are the mask): a float weight,
        or the int8 grid q with its `scales` (the compute dtype stays the layer's)."""
        if tuple(pruned_weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"pruned_weight: expected shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(pruned_weight.shape)}")
        bitmap, values, offsets = ops.bitmap_encode(pruned_weight.detach().contiguous())
        self.bitmap, self.values, self.offsets = bitmap, values, offsets
        self._set_scales(pruned_weight, scales)

    # fp32 buffers that hold scales (the int8 base's; an int8 adapter's, SALRLinear): a cast must not
    # touch their bits.
    _SCALE_BUFFERS = ("scales", "adapter_scales")

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast the fp32 scales (float buffers) and lose their bits; keep them,
        # move them only, and let the cast set the compute dtype instead.
        kept = {name: self._buffers[name] for name in self._SCALE_BUFFERS if self._buffers.get(name) is not None}
        for name in kept:
            self._buffers[name] = None
        try:
            out = super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)
        if kept:
            any_kept = next(iter(kept.values()))
            probe = fn(torch.zeros(1, dtype=self.compute_dtype, device=any_kept.device))
            for name, t in kept.items():
                self._buffers[name] = t.to(probe.device)
        if self._buffers.get("scales") is None:
            self.compute_dtype = self.values.dtype
        else:
            self.compute_dtype = probe.dtype
        return out

    @property
    def quantize(self) -> str | None:
        """"int8" for an int8 base, else None."""
        return None if self.scales is None else "int8"

    @property
    def quantize_group_size(self) -> int | None:
        """64 for per-group scales, None for per-row scales (or no quantization)."""
        return None if self.scales is None or self.scales.dim() == 1 else 64

    @property
    def sparse_weight(self) -> BitmapSparseWeight:
        return BitmapSparseWeight(self.bitmap, self.values, self.offsets, self.out_features, self.in_features,
                                  self.scales)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, self.out_features * self.in_features)

    def base_dense(self) -> torch.Tensor:
        """The pruned base W_s as a dense tensor of the compute dtype (dequantized for int8)."""
        return self.sparse_weight.to_dense(self.compute_dtype)

    def mask(self) -> torch.Tensor:
        """The base's mask as a dense bool [N, K] (for pruning decisions; not on the hot path)."""
        bands = reference.unpack_bitmap(self.bitmap)
        return reference.from_tiles(bands, self.out_features, self.in_features).contiguous()

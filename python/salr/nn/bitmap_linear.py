"""``BitmapLinear``: the BM8x8-backed base every salr layer shares (SALRLinear, SALORLinear,
LoSALinear): the pruned weight W_s [out_features, in_features] as three buffers ``bitmap`` /
``values`` / ``offsets`` (docs/design.md §1), never as a dense tensor. Buffers, not parameters: the
base is frozen (LoSA changes its values through its own merge, not through the optimizer).
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

    def _register_base(self, weight: torch.Tensor) -> None:
        """Encode the dense [N, K] `weight` (its zeros are the mask) into the three buffers."""
        bitmap, values, offsets = ops.bitmap_encode(weight.detach().contiguous())
        self.register_buffer("bitmap", bitmap)
        self.register_buffer("values", values)
        self.register_buffer("offsets", offsets)

    @torch.no_grad()
    def set_base(self, pruned_weight: torch.Tensor) -> None:
        """Re-encode the base from a dense [N, K] weight (its zeros are the mask)."""
        if tuple(pruned_weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"pruned_weight: expected shape {(self.out_features, self.in_features)}, "
                             f"got {tuple(pruned_weight.shape)}")
        bitmap, values, offsets = ops.bitmap_encode(pruned_weight.detach().contiguous())
        self.bitmap, self.values, self.offsets = bitmap, values, offsets

    @property
    def sparse_weight(self) -> BitmapSparseWeight:
        return BitmapSparseWeight(self.bitmap, self.values, self.offsets, self.out_features, self.in_features)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(1, self.out_features * self.in_features)

    def base_dense(self) -> torch.Tensor:
        """The pruned base W_s as a dense tensor of the base dtype."""
        return self.sparse_weight.to_dense()

    def mask(self) -> torch.Tensor:
        """The base's mask as a dense bool [N, K] (for pruning decisions; not on the hot path)."""
        bands = reference.unpack_bitmap(self.bitmap)
        return reference.from_tiles(bands, self.out_features, self.in_features).contiguous()

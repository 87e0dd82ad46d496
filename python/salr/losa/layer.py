"""LoSA's masked LoRA layer: y = x·(W_s + s·M⊙(BA))ᵀ + bias, with M the base weight's own mask.

The masked update has exactly the base's bitmap, so it never needs the dense N×K product:

* forward: Δ = (BA) at the mask positions, one SDDMM (``sampled_gemm(Bᵀ, A)``) into an array
  aligned with the base ``values``; w = values + s·Δ; then one sparse GEMM over w.
* backward: G = (dYᵀ·X) at the mask (``sampled_gemm(dY, X)``), the gradient of the effective values;
  then, reading G as the values of the same bitmap: dA = s·Bᵀ·G (``sparse_gemm_transposed``) and
  dB = s·G·Aᵀ (``sparse_lowrank_gemm`` with A as the input); dX = dY·w (``sparse_gemm_transposed``).

w is recomputed in the backward instead of being saved, so a whole model's autograd graph holds no
second copy of the weights: the extra memory is O(nnz) for one layer at a time (w, G), never N·K.
(LoSA's reference code materializes BA, a dense N×K, in every layer at every step.)

``merge()`` folds s·M⊙(BA) into the base values: the bitmap is untouched bit for bit, and the layer
becomes a plain BM8x8 sparse linear with no adapter.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import nn

from salr import ops
from salr._checks import check_int
from salr.nn.bitmap_linear import BitmapLinear
from salr.ops import reference

Tensor = torch.Tensor
_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class MaskedLoRAFunction(torch.autograd.Function):
    """Autograd of ``x·(W_s + s·M⊙(BA))ᵀ + bias`` over the BM8x8 base (see the module docstring).

    ``impl`` provides ``sampled_gemm``, ``sparse_gemm_transposed`` and ``sparse_lowrank_gemm``:
    :mod:`salr.ops` (native kernels) in training, :mod:`salr.ops.reference` for float64 gradchecks.
    x, values, lora_a, lora_b and bias must share one dtype.
    """

    @staticmethod
    def forward(ctx, x, bitmap, values, offsets, out_features, in_features, lora_a, lora_b, scale, bias, impl):
        w = _effective(impl, bitmap, values, offsets, out_features, in_features, lora_a, lora_b, scale)
        y = impl.sparse_lowrank_gemm(x.contiguous(), bitmap, w, offsets, out_features, in_features, None, None, bias)
        ctx.save_for_backward(x, bitmap, values, offsets, lora_a, lora_b)
        ctx.shape, ctx.scale, ctx.impl, ctx.has_bias = (out_features, in_features), scale, impl, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, bitmap, values, offsets, lora_a, lora_b = ctx.saved_tensors
        n, k = ctx.shape
        impl, scale = ctx.impl, ctx.scale
        need_x, _, need_values, _, _, _, need_a, need_b, _, need_bias, _ = ctx.needs_input_grad
        grad = grad.contiguous()
        grad_x = grad_values = grad_a = grad_b = grad_bias = None
        if need_x:
            # w is recomputed, not saved (the graph keeps no second copy of the layer's values), and
            # freed before G exists: one values-sized buffer at a time.
            w = _effective(impl, bitmap, values, offsets, n, k, lora_a, lora_b, scale)
            grad_x = impl.sparse_gemm_transposed(grad, bitmap, w, offsets, n, k)
            del w
        if need_values or need_a or need_b:
            # `values` only lends its shape and dtype here: G depends on the bitmap alone.
            g = impl.sampled_gemm(grad.reshape(-1, n), x.reshape(-1, k).contiguous(), bitmap, values, offsets, n, k)
            if need_a:  # s·Bᵀ·G: [r, N] times the sparse [N, K]
                grad_a = impl.sparse_gemm_transposed(lora_b.t().contiguous(), bitmap, g, offsets, n, k).mul_(scale)
            if need_b:  # s·G·Aᵀ = s·(A·Gᵀ)ᵀ: A [r, K] as the input of the sparse GEMM
                grad_b = impl.sparse_lowrank_gemm(lora_a.contiguous(), bitmap, g, offsets, n, k,
                                                  None, None, None).t().mul_(scale)
            grad_values = g if need_values else None
        if need_bias and ctx.has_bias:
            grad_bias = grad.reshape(-1, n).sum(0)
        return grad_x, None, grad_values, None, None, None, grad_a, grad_b, None, grad_bias, None


def _effective(impl, bitmap, values, offsets, n, k, lora_a, lora_b, scale) -> Tensor:
    """values + s·(BA at the mask): the effective weight's values, aligned with ``values``."""
    if lora_a.shape[0] == 0:
        return values
    delta = impl.sampled_gemm(lora_b.t().contiguous(), lora_a.contiguous(), bitmap, values, offsets, n, k)
    return delta.mul_(scale).add_(values)  # in place: one values-sized buffer


def masked_lora_linear(x: Tensor, bitmap: Tensor, values: Tensor, offsets: Tensor, out_features: int,
                       in_features: int, lora_a: Tensor, lora_b: Tensor, scale: float,
                       bias: Tensor | None = None, impl: ModuleType = ops) -> Tensor:
    """``x·(W_s + scale·M⊙(lora_b·lora_a))ᵀ + bias`` without a dense N×K, differentiable in x,
    values, lora_a [r, K], lora_b [N, r] and bias. ``impl=salr.ops.reference`` for float64."""
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"lora_a/lora_b: need [r, K] and [N, r], got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    if lora_a.shape[1] != in_features or lora_b.shape[0] != out_features:
        raise ValueError(f"lora_a/lora_b: shapes {tuple(lora_a.shape)}, {tuple(lora_b.shape)} do not fit a "
                         f"[{out_features}, {in_features}] weight")
    if x.shape[-1] != in_features:
        raise ValueError(f"x: last dimension {x.shape[-1]} != in_features {in_features}")
    return MaskedLoRAFunction.apply(x, bitmap, values, offsets, out_features, in_features, lora_a, lora_b,
                                    float(scale), bias, impl)


def _nonzero(values: Tensor) -> Tensor:
    """Replace exact zeros by the dtype's smallest normal, so a stored value keeps meaning "nonzero"
    (a merge that cancels a weight to 0.0 must not leave a set bit over a zero)."""
    tiny = torch.finfo(values.dtype).tiny
    return torch.where(values == 0, torch.full_like(values, tiny), values)


class LoSALinear(BitmapLinear):
    """A linear layer with a frozen BM8x8 base W_s and a LoRA (A: r×K, B: N×r) applied through the
    base's mask: ``y = x·(W_s + scale·M⊙(BA))ᵀ + bias``.

    ``masked=False`` gives a plain LoRA on the sparse base (``x·W_sᵀ + scale·(x·Aᵀ)·Bᵀ``, the fused
    op's own adapter path): the baseline whose merge densifies the weight. The factors are kept in
    ``adapter_dtype`` (fp32 by default) and cast to the base's dtype for the kernels.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None, rank: int = 8, scale: float = 1.0, *,
                 masked: bool = True, adapter_dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise ValueError(f"weight: expected a 2-D [out_features, in_features] tensor, got "
                             f"{type(weight).__name__} {getattr(weight, 'shape', '')}")
        if weight.dtype not in _VALUE_DTYPES:
            raise ValueError(f"weight: dtype must be float32, bfloat16 or float16, got {weight.dtype}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank: must be an integer >= 0, got {rank!r}")
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale: must be a finite number, got {scale!r}")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
            raise ValueError(f"bias: expected shape [{weight.shape[0]}], got {tuple(bias.shape)}")
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.scale = float(scale)
        self.masked = bool(masked)
        self.adapter_dtype = adapter_dtype
        self._register_base(weight)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().to(weight.dtype), requires_grad=False)
        device = weight.device
        self.lora_a = nn.Parameter(torch.empty(0, self.in_features, dtype=adapter_dtype, device=device))
        self.lora_b = nn.Parameter(torch.empty(self.out_features, 0, dtype=adapter_dtype, device=device))
        self.resize_rank(rank, generator=generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 8, scale: float = 1.0, mask: Tensor | None = None,
                    **kwargs) -> "LoSALinear":
        """Wrap an ``nn.Linear``; ``mask`` (bool [N, K], True = kept) prunes its weight first."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if mask is not None:
            if mask.shape != weight.shape or mask.dtype != torch.bool:
                raise ValueError(f"mask: expected a bool tensor of shape {tuple(weight.shape)}, got "
                                 f"{mask.dtype} {tuple(mask.shape)}")
            weight = weight * mask
        return cls(weight, linear.bias, rank, scale, **kwargs)

    # ---- properties ----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scale={self.scale:g}, sparsity={self.sparsity:.3f}, masked={self.masked}")

    # ---- compute -------------------------------------------------------------------------------
    def _factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_a.to(self.values.dtype), self.lora_b.to(self.values.dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.values.dtype)
        n, k = self.out_features, self.in_features
        if self.rank == 0:
            return ops.sparse_lowrank_gemm(x, self.bitmap, self.values, self.offsets, n, k, None, None, self.bias)
        a, b = self._factors()
        if not self.masked:
            return ops.sparse_lowrank_gemm(x, self.bitmap, self.values, self.offsets, n, k, a, b * self.scale,
                                           self.bias)
        return masked_lora_linear(x, self.bitmap, self.values, self.offsets, n, k, a, b, self.scale, self.bias)

    @torch.no_grad()
    def delta_values(self) -> Tensor:
        """s·(BA) at the mask, aligned with ``values`` (zeros at rank 0)."""
        if self.rank == 0:
            return torch.zeros_like(self.values)
        a, b = self._factors()
        delta = ops.sampled_gemm(b.t().contiguous(), a.contiguous(), self.bitmap, self.values, self.offsets,
                                 self.out_features, self.in_features)
        return self.scale * delta

    @torch.no_grad()
    def merged_values(self) -> Tensor:
        """The values of W_s + s·M⊙(BA) on the base's bitmap (never exactly zero)."""
        return _nonzero(self.values + self.delta_values())

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """The dense weight the layer applies: W_s + s·M⊙(BA), or W_s + s·BA when ``masked=False``.
        Off the hot path (pruning scores, reconstruction errors, baselines)."""
        n, k = self.out_features, self.in_features
        if self.masked or self.rank == 0:
            return ops.bitmap_decode(self.bitmap, self.merged_values(), self.offsets, n, k)
        dense = ops.bitmap_decode(self.bitmap, self.values, self.offsets, n, k)
        return dense + self.scale * (self.lora_b.to(dense.dtype) @ self.lora_a.to(dense.dtype))

    # ---- state changes -------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self) -> "LoSALinear":
        """Fold s·M⊙(BA) into the base values and drop the adapter (rank 0). The bitmap and offsets
        are unchanged bit for bit. With ``masked=False`` this *changes* the function (the off-mask
        part of BA is dropped): that is the masked-merged baseline. Refuses non-finite results."""
        merged = self.merged_values()
        if not bool(torch.isfinite(merged).all()):
            raise ValueError("merge: the merged values are not finite (NaN/inf in the adapter or base)")
        self.values = merged
        self._set_factors(self.lora_a.detach()[:0], self.lora_b.detach()[:, :0])
        return self

    @torch.no_grad()
    def apply_mask(self, keep: Tensor) -> None:
        """Prune the base to ``keep`` (bool [N, K]), which must lie inside the current mask (masks
        only grow). The adapter is kept, so the function becomes keep⊙(W_s + s·BA): the merged
        weight pruned, with the LoRA's trained directions still trainable."""
        if keep.shape != (self.out_features, self.in_features) or keep.dtype != torch.bool:
            raise ValueError(f"keep: expected a bool tensor of shape {(self.out_features, self.in_features)}, "
                             f"got {keep.dtype} {tuple(keep.shape)}")
        keep = keep.to(self.values.device)
        current = reference.unpack_bitmap(self.bitmap)
        if bool((reference.to_tiles(keep) & ~current).any()):
            raise ValueError("keep: marks positions outside the current mask (masks only grow: a pruned weight "
                             "never comes back)")
        survive = reference.to_tiles(keep)[current]  # per stored value (tile order): does it stay?
        bitmap, _, offsets = ops.bitmap_encode(keep.to(self.values.dtype))
        self.values = self.values[survive].contiguous()
        self.bitmap, self.offsets = bitmap, offsets

    @torch.no_grad()
    def resize_rank(self, rank: int, generator: torch.Generator | None = None) -> None:
        """Change the adapter's rank keeping the layer's function and its trained directions.

        Growing appends fresh rows to A (LoRA's uniform ±1/√K init) and zero columns to B, so BA is
        unchanged. Shrinking re-factors BA = (Q_B·U·S)(Vᵀ·Q_Aᵀ) through QR of both factors and an r×r
        SVD, keeps the top ``rank`` directions (A rows orthonormal, magnitudes in B) and merges the
        rest into the base values at the mask, so the masked layer's output is unchanged. Directions
        with no singular value (an untrained B) keep orthonormal A rows, so they still learn.
        """
        check_int(rank, "rank")
        old = self.rank
        a, b = self.lora_a.detach(), self.lora_b.detach()
        if rank > old:
            bound = 1.0 / math.sqrt(self.in_features)
            fresh = torch.rand(rank - old, self.in_features, generator=generator, dtype=torch.float32)
            fresh = ((fresh * 2 - 1) * bound).to(device=a.device, dtype=a.dtype)
            a = torch.cat([a, fresh], 0)
            b = torch.cat([b, b.new_zeros(self.out_features, rank - old)], 1)
        elif rank < old:
            if not self.masked:
                raise ValueError("rank: an unmasked LoRA cannot shrink without changing its function")
            qb, rb = torch.linalg.qr(b.double())
            qa, ra = torch.linalg.qr(a.double().t())
            u, s, vh = torch.linalg.svd(rb @ ra.t())
            b_full = (qb @ u) * s             # [N, old], columns by decreasing singular value
            a_full = vh @ qa.t()              # [old, K], orthonormal rows
            rest_a = a_full[rank:].to(self.values.dtype).contiguous()
            rest_b = b_full[:, rank:].to(self.values.dtype).t().contiguous()
            rest = ops.sampled_gemm(rest_b, rest_a, self.bitmap, self.values, self.offsets,
                                    self.out_features, self.in_features)
            self.values = _nonzero(self.values + self.scale * rest)
            a, b = a_full[:rank].to(a.dtype), b_full[:, :rank].to(b.dtype)
        self._set_factors(a, b)

    def _set_factors(self, a: Tensor, b: Tensor) -> None:
        self.lora_a = nn.Parameter(a.contiguous(), requires_grad=True)
        self.lora_b = nn.Parameter(b.contiguous(), requires_grad=True)

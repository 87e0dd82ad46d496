"""``SALRLinear``: a frozen BM8x8 sparse base + an SVD residual adapter + a trainable LoRA, served by
one call of ``salr.ops.sparse_lowrank_gemm``; (its settings are :class:`~salr.methods.salr.config.SALRConfig`).

    y = x·W_sᵀ + (x·A_svdᵀ)·B_svdᵀ + s·(x·A_loraᵀ)·B_loraᵀ + bias,      s = alpha / lora_rank

* Base: ``bitmap`` / ``values`` / ``offsets`` buffers (design.md §1). Buffers, not parameters: the
  pruned weights never change and never receive gradients. The dense weight is never kept.
* SVD adapter ``svd_a`` [r_svd, K], ``svd_b`` [N, r_svd]: parameters, frozen unless
  ``trainable_svd``.
* LoRA ``lora_a`` [r, K] (Kaiming-uniform, a=√5), ``lora_b`` [N, r] (zeros), as PEFT initialises them,
  so a fresh module computes exactly the base + SVD output.
* Forward: the adapters are concatenated, ``adapter_a = [A_svd; A_lora]`` and
  ``adapter_b = [B_svd, s·B_lora]``, and passed to ONE ``sparse_lowrank_gemm`` call (a frozen SVD
  adapter as its ``frozen_adapter``: the backward then forms no gradient products for its ranks).
  With LoRA dropout active (training and dropout > 0) the LoRA branch must see a dropped-out x that
  the base and SVD branches must not, so the op then carries base + SVD and the LoRA term
  ``s·(drop(x)·A_loraᵀ)·B_loraᵀ`` is added separately; in eval mode (or dropout 0) it is one call.
* Compute dtype: the base's dtype (for an int8 base, the `dtype` the layer was built with). x,
  adapters and bias are cast to it, the output back to x's dtype.
* int8 base (``quantize="int8"``, issue 21): int8 values + fp32 ``scales`` per row (or per row and
  64-column group) in the same op; the adapters stay in the compute dtype and train on the frozen
  int8 base (QLoRA's idea, with sparsity). The SVD residual is fitted against the dequantized base,
  so it absorbs quantization error as well as pruning error. :meth:`merge` leaves the base alone.
* :meth:`merge` folds the LoRA into the concatenated inference adapter (the SVD adapter becomes
  [A_svd; A_lora], [B_svd, s·B_lora], computed in fp32 and checked finite); the base is untouched.
  There is no unmerge: the LoRA factors are gone after a merge (save before merging to keep them).
* :meth:`quantize_adapters` (after the merge) stores that inference adapter as int8 (issue 21):
  ``svd_a`` / ``svd_b`` become int8 q_a / q_b and the buffer ``adapter_scales`` [N] fp32 holds one
  scale per output row, B·A = diag(adapter_scales)·q_b·q_a
  (:func:`salr.prune.quantize.quantize_adapter_int8`); the op reads the int8 rows directly. Frozen,
  like the merged adapter it replaces.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from salr import ops
from salr.methods.salr.config import _check_int, dtype_from_name
from salr.nn.bitmap_linear import BitmapLinear
from salr.nn.models import is_conv1d, linear_dims, weight_view
from salr.nn.svd import check_rank, residual_adapter
from salr.ops import reference
from salr.prune.criteria import prune_weight, prune_weight_int8
from salr.prune.quantize import check_group_size, check_quantize, dequantize, quantize_adapter_int8

def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`t` in `dtype` (None stays None); skips Tensor.to's argument parsing when nothing changes."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


class SALRLinear(BitmapLinear):
    """Sparse BM8x8 base + SVD residual adapter + LoRA; one fused op per forward (see module doc).

    Build with :meth:`from_linear` (prune + SVD an existing layer) or :meth:`from_weights` (an
    already pruned weight and given factors). The bare constructor makes an all-zero base of the
    right shape (what :func:`salr.load` fills from a file).
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, svd_rank: int = 0,
                 lora_rank: int = 0, alpha: float | None = None, dropout: float = 0.0,
                 trainable_svd: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, quantize: str | None = None,
                 quantize_group_size: int | None = None) -> None:
        super().__init__()
        _check_int(in_features, "in_features", 1)
        _check_int(out_features, "out_features", 1)
        dtype = dtype_from_name(dtype)
        for name, rank in (("svd_rank", svd_rank), ("lora_rank", lora_rank)):
            if _check_int(rank, name, 0):
                check_rank(rank, out_features, in_features, name)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.in_features, self.out_features = in_features, out_features
        self.trainable_svd = bool(trainable_svd)
        self.alpha = float(alpha) if alpha is not None else float(max(lora_rank, 1))
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha: expected a finite number > 0, got {alpha!r}")
        if check_quantize(quantize) is None:
            if check_group_size(quantize_group_size) is not None:
                raise ValueError("quantize_group_size: only an int8 base (quantize='int8') has scale groups")
            self._register_base(torch.zeros(out_features, in_features, dtype=dtype, device=device))
        else:
            shape = (out_features,) if check_group_size(quantize_group_size) is None else (
                out_features, reference.groups_per_band(in_features))
            self._register_base(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                torch.ones(shape, dtype=torch.float32, device=device), dtype)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("adapter_scales", None)  # an int8 inference adapter's (quantize_adapters)
        for name in ("svd_a", "svd_b", "lora_a", "lora_b"):
            self.register_parameter(name, None)
        if svd_rank:
            self.svd_a = nn.Parameter(torch.zeros(svd_rank, in_features, dtype=dtype, device=device),
                                      requires_grad=self.trainable_svd)
            self.svd_b = nn.Parameter(torch.zeros(out_features, svd_rank, dtype=dtype, device=device),
                                      requires_grad=self.trainable_svd)
        if lora_rank:
            self.lora_a = nn.Parameter(torch.empty(lora_rank, in_features, dtype=dtype, device=device))
            self.lora_b = nn.Parameter(torch.zeros(out_features, lora_rank, dtype=dtype, device=device))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_weights(cls, pruned_weight: torch.Tensor, bias: torch.Tensor | None = None,
                     svd_a: torch.Tensor | None = None, svd_b: torch.Tensor | None = None, *,
                     lora_rank: int = 0, alpha: float | None = None, dropout: float = 0.0,
                     trainable_svd: bool = False, dtype: torch.dtype | str | None = None,
                     scales: torch.Tensor | None = None) -> "SALRLinear":
        """A module whose base is `pruned_weight` [N, K] (its zeros are the mask) and whose SVD
        adapter is (svd_a [r, K], svd_b [N, r]); everything is stored in `dtype` (default: the
        weight's). An int8 base: `pruned_weight` is the int8 grid q and `scales` its fp32 scales
        ([N] or [N, ceil(K/64)]); `dtype` (default float32) is then the compute dtype of the rest."""
        if pruned_weight.dim() != 2:
            raise ValueError(f"pruned_weight: expected [out_features, in_features], got {tuple(pruned_weight.shape)}")
        if (svd_a is None) != (svd_b is None):
            raise ValueError("svd_a, svd_b: give both SVD factors or neither")
        if (pruned_weight.dtype == torch.int8) != (scales is not None):
            raise ValueError(f"scales: an int8 pruned_weight needs its scales and a float one takes none; got "
                             f"{pruned_weight.dtype} and scales={'a tensor' if scales is not None else None}")
        quantized = scales is not None
        dtype = dtype_from_name(dtype) or (torch.float32 if quantized else pruned_weight.dtype)
        n, k = pruned_weight.shape
        rank = 0 if svd_a is None else svd_a.shape[0]
        if svd_a is not None and (svd_a.shape != (rank, k) or svd_b.shape != (n, rank)):
            raise ValueError(f"svd_a, svd_b: expected shapes [r, {k}] and [{n}, r], got {tuple(svd_a.shape)} "
                             f"and {tuple(svd_b.shape)}")
        module = cls(k, n, bias=bias is not None, svd_rank=rank, lora_rank=lora_rank, alpha=alpha,
                     dropout=dropout, trainable_svd=trainable_svd, dtype=dtype, device=pruned_weight.device,
                     quantize="int8" if quantized else None,
                     quantize_group_size=64 if quantized and scales.dim() == 2 else None)
        with torch.no_grad():
            module.set_base(pruned_weight if quantized else pruned_weight.to(dtype), scales)
            if bias is not None:
                module.bias.copy_(bias.detach())
            if rank:
                module.svd_a.copy_(svd_a.detach())
                module.svd_b.copy_(svd_b.detach())
        return module

    @classmethod
    def from_linear(cls, linear: nn.Module, *, sparsity: float | None = 0.0, criterion: str = "magnitude",
                    pattern: str | None = None, group: str | None = None, svd_rank: int = 0,
                    svd_method: str = "exact", lora_rank: int = 0, alpha: float | None = None,
                    dropout: float = 0.0, trainable_svd: bool = False, input_norms: torch.Tensor | None = None,
                    hessian: torch.Tensor | None = None, activation_aware: bool = False,
                    input_rms: torch.Tensor | None = None, dtype: torch.dtype | str | None = None,
                    blocksize: int = 128, damping: float = 0.01, quantize: str | None = None,
                    quantize_group_size: int | None = None) -> "SALRLinear":
        """Prune an nn.Linear / GPT-2 Conv1D with `criterion`, fit the SVD residual adapter of rank
        `svd_rank` on W − W_s (activation-aware with `input_rms` when `activation_aware`), add a
        LoRA of `lora_rank`. The residual is taken against W_s as stored (after the cast to `dtype`,
        or dequantized). `quantize="int8"` stores an int8 base (per row, or per 64-column group with
        `quantize_group_size=64`): SparseGPT folds the rounding into its update, the other criteria
        round to nearest after pruning (:func:`salr.prune.criteria.prune_weight_int8`)."""
        if not (isinstance(linear, nn.Linear) or is_conv1d(linear)):
            raise ValueError(f"linear: expected nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        n, k = linear_dims(linear)
        dtype = dtype_from_name(dtype) or linear.weight.dtype
        if svd_rank:
            check_rank(svd_rank, n, k, "svd_rank")
        if check_quantize(quantize) is None and check_group_size(quantize_group_size) is not None:
            raise ValueError("quantize_group_size: only an int8 base (quantize='int8') has scale groups")
        weight = weight_view(linear).detach().float()
        args = dict(pattern=pattern, group=group, input_norms=input_norms, hessian=hessian, blocksize=blocksize,
                    damping=damping)
        scales = None
        if quantize is None:
            pruned, _ = prune_weight(weight, criterion, sparsity, **args)
            stored = pruned.to(dtype)
        else:
            q, scales = prune_weight_int8(weight, criterion, sparsity, group_size=quantize_group_size, **args)
            stored = dequantize(q, scales)
        a = b = None
        if svd_rank:
            if activation_aware and input_rms is None:
                raise ValueError("input_rms: the activation-aware SVD needs the calibration input magnitudes")
            a, b = residual_adapter(weight, stored.float(), svd_rank, method=svd_method,
                                    input_scale=input_rms if activation_aware else None)
            a, b = a.to(dtype), b.to(dtype)
        bias = getattr(linear, "bias", None)
        return cls.from_weights(stored if scales is None else q, bias.detach().to(dtype) if bias is not None else None,
                                a, b, lora_rank=lora_rank, alpha=alpha, dropout=dropout,
                                trainable_svd=trainable_svd, dtype=dtype, scales=scales)

    # ---- properties ----------------------------------------------------------------------------
    @property
    def svd_rank(self) -> int:
        return 0 if self.svd_a is None else self.svd_a.shape[0]

    @property
    def lora_rank(self) -> int:
        return 0 if self.lora_a is None else self.lora_a.shape[0]

    @property
    def adapter_rank(self) -> int:
        """The rank of every low-rank product this layer adds to its base (SVD + LoRA)."""
        return self.svd_rank + self.lora_rank

    @property
    def adapter_quantize(self) -> str | None:
        """"int8" once :meth:`quantize_adapters` stored the inference adapter as int8, else None."""
        return None if self.adapter_scales is None else "int8"

    @property
    def scale(self) -> float:
        return self.alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def compressed_bytes(self) -> int:
        """Bytes of the stored tensors (base + adapters + bias)."""
        tensors = [self.bitmap, self.values, self.offsets, self.scales, self.bias, self.svd_a, self.svd_b, self.lora_a,
                   self.lora_b, self.adapter_scales]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # ---- compute -------------------------------------------------------------------------------
    def _lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_lora, B_lora) as the forward uses them, unscaled (SALORLinear masks them here)."""
        return self.lora_a, self.lora_b

    def _adapters(self, dtype: torch.dtype, with_lora: bool
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None, torch.Tensor | None]:
        """(frozen, adapter_a, adapter_b) for the op: a frozen SVD adapter goes in `frozen` (stacked
        first by the op, which then forms no gradient products for it), a trainable one in front of
        the LoRA."""
        params = self._parameters
        frozen, a_parts, b_parts = None, [], []
        if params["svd_a"] is not None:
            svd_a, svd_b = _cast(params["svd_a"], dtype), _cast(params["svd_b"], dtype)
            if svd_a.requires_grad or svd_b.requires_grad:
                a_parts.append(svd_a)
                b_parts.append(svd_b)
            else:
                frozen = (svd_a, svd_b)
        if with_lora and params["lora_a"] is not None:
            lora_a, lora_b = self._lora_factors()
            a_parts.append(_cast(lora_a, dtype))
            b_parts.append((lora_b * self.scale).to(dtype))
        if not a_parts:
            return frozen, None, None
        if len(a_parts) == 1:
            return frozen, a_parts[0], b_parts[0]
        return frozen, torch.cat(a_parts, 0), torch.cat(b_parts, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Tensors are read from the module's dicts once: each nn.Module attribute read of a buffer or
        # parameter costs ~0.4 µs, and at M = 1 a dozen of them weighed as much as a small layer's GEMV.
        buffers = self._buffers
        dtype = self.compute_dtype
        xc = _cast(x, dtype)
        if buffers["adapter_scales"] is not None:  # the int8 inference adapter: read as stored
            params = self._parameters
            y = ops.sparse_lowrank_gemm(xc, buffers["bitmap"], buffers["values"], buffers["offsets"], self.out_features,
                                        self.in_features, params["svd_a"], params["svd_b"], _cast(buffers["bias"], dtype),
                                        scales=buffers["scales"], adapter_scales=buffers["adapter_scales"])
            return _cast(y, x.dtype)
        separate_lora = self._parameters["lora_a"] is not None and self.training and self.dropout > 0
        frozen, a, b = self._adapters(dtype, with_lora=not separate_lora)
        y = ops.sparse_lowrank_gemm(xc, buffers["bitmap"], buffers["values"], buffers["offsets"], self.out_features,
                                    self.in_features, a, b, _cast(buffers["bias"], dtype), scales=buffers["scales"],
                                    frozen_adapter=frozen)
        if separate_lora:
            lora_a, lora_b = self._lora_factors()
            y = y + (self.lora_dropout(xc) @ lora_a.to(dtype).t()) @ (lora_b * self.scale).to(dtype).t()
        return _cast(y, x.dtype)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The effective dense weight W_s + B_svd·A_svd + s·B_lora·A_lora in fp32 (for checks)."""
        w = self.sparse_weight.to_dense().float()
        if self.svd_a is not None:
            svd_a, svd_b = self.svd_factors()
            w = w + svd_b @ svd_a
        if self.lora_a is not None:
            lora_a, lora_b = self._lora_factors()
            w = w + self.scale * (lora_b.float() @ lora_a.float())
        return w

    @torch.no_grad()
    def combined_adapter(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A [R, K], B [N, R]) in fp32 with B·A = every low-rank product the layer adds to its base
        (B_svd·A_svd + s·B_lora·A_lora, concatenated in that order); None without adapters."""
        parts_a, parts_b = [], []
        if self.svd_a is not None:
            svd_a, svd_b = self.svd_factors()
            parts_a.append(svd_a)
            parts_b.append(svd_b)
        if self.lora_a is not None:
            lora_a, lora_b = self._lora_factors()
            parts_a.append(lora_a.float())
            parts_b.append(lora_b.float() * self.scale)
        if not parts_a:
            return None
        return torch.cat(parts_a, 0), torch.cat(parts_b, 1)

    def svd_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_svd, B_svd) in fp32, an int8 adapter dequantized."""
        if self.adapter_scales is None:
            return self.svd_a.float(), self.svd_b.float()
        return reference.dequantized_adapter(self.svd_a, self.svd_b, self.adapter_scales, torch.float32)

    @torch.no_grad()
    def quantize_adapters(self) -> "SALRLinear":
        """Store the merged inference adapter as int8 with one fp32 scale per output row (module doc).
        ValueError before :meth:`merge` (a LoRA still trains) or with a trainable SVD adapter; a no-op
        without an adapter or when already int8. Returns self."""
        if self.lora_a is not None or self.trainable_svd:
            raise ValueError("quantize_adapters: merge the LoRA first (an int8 adapter is an inference form: "
                             "frozen, no LoRA beside it)")
        if self.svd_a is None or self.adapter_scales is not None:
            return self
        q_a, q_b, b_scales = quantize_adapter_int8(self.svd_a, self.svd_b)
        self.svd_a = nn.Parameter(q_a, requires_grad=False)
        self.svd_b = nn.Parameter(q_b, requires_grad=False)
        self.adapter_scales = b_scales.to(q_a.device)
        return self

    @torch.no_grad()
    def merge(self) -> "SALRLinear":
        """Fold the LoRA into the SVD adapter: A ← [A_svd; A_lora], B ← [B_svd, s·B_lora] (fp32, then
        the module dtype). The base is not touched. ValueError if the result is not finite. The
        merged adapter is frozen (an inference form); returns self."""
        if self.lora_a is None:
            return self
        a, b = self.combined_adapter()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError("merge: the adapters hold NaN or inf; refusing to merge")
        dtype = self.compute_dtype
        self.svd_a = nn.Parameter(a.to(dtype), requires_grad=False)
        self.svd_b = nn.Parameter(b.to(dtype), requires_grad=False)
        self.trainable_svd = False
        self.lora_a = self.lora_b = None
        self.lora_dropout = nn.Identity()
        return self

    # ---- state dict: shapes come from the file ---------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The nnz (values) and the adapter ranks are data, not architecture: adopt the incoming
        # shapes and dtypes so that a skeleton module loads any saved SALRLinear bit-exactly.
        for name in ("bitmap", "values", "offsets", "scales", "bias", "adapter_scales"):
            key = prefix + name
            if key in state_dict and name in self._buffers:
                src = state_dict[key]
                self._buffers[name] = torch.empty(src.shape, dtype=src.dtype, device=self._device())
        for name in ("svd_a", "svd_b", "lora_a", "lora_b"):
            key = prefix + name
            if key in state_dict:
                src = state_dict[key]
                old = getattr(self, name)
                grad = old.requires_grad if old is not None else (name.startswith("lora") or self.trainable_svd)
                grad = grad and src.dtype.is_floating_point  # an int8 adapter is frozen
                setattr(self, name, nn.Parameter(torch.empty(src.shape, dtype=src.dtype, device=self._device()),
                                                 requires_grad=grad))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.bitmap.shape != (reference.num_bands(self.out_features), reference.tiles_per_band(self.in_features)):
            error_msgs.append(f"{prefix}bitmap: shape {tuple(self.bitmap.shape)} does not fit a "
                              f"[{self.out_features}, {self.in_features}] weight")

    def _device(self) -> torch.device:
        return self.bitmap.device

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"sparsity={self.sparsity:.3f}, dtype={str(self.compute_dtype).removeprefix('torch.')}, "
                f"{'quantize=int8' + (', group_size=64, ' if self.quantize_group_size else ', ') if self.quantize else ''}"
                f"svd_rank={self.svd_rank}{' (trainable)' if self.trainable_svd else ''}, "
                f"lora_rank={self.lora_rank}, alpha={self.alpha:g}, dropout={self.dropout:g}, "
                f"bias={self.bias is not None}")

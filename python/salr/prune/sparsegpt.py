"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and update the surviving weights so that the
layer output on the calibration inputs changes as little as possible.

Written from the paper's description (Algorithm 1):

* H = 2/n·XᵀX is the Hessian of ‖XWᵀ − XŴᵀ‖² for each output row. Inputs that are always zero
  ("dead", H_jj = 0) carry no information: their weights are set to zero and H_jj to 1.
* Damping λ = 0.01·mean(diag H) is added to the diagonal so H is safely positive definite.
* The sequence of inverse Hessians that Optimal Brain Surgeon needs when columns are eliminated
  left to right is read off the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU): after columns < j are
  fixed, the row j of U, divided by U_jj, is the OBS update direction, and U_jj² is [H_F⁻¹]_jj.
* Columns are processed in blocks of 128. At the start of a block the mask of the whole block is
  chosen from the current (already updated) weights with the OBS saliency w²/U_jj² (adaptive mask
  selection); for N:M the mask of every group of M columns is chosen when the group starts.
* Pruning column j sets the pruned weights to 0 and spreads the error e = (w − q)/U_jj over the
  remaining columns of the block (w_k −= e·U_jk); the accumulated block errors update all later
  columns with one matrix product (lazy batch updates).

Mask counts are exact: with ``group="row"`` every row loses round(s·K) weights, with
``group="layer"`` the matrix loses round(s·N·K) (each block takes its share of the running total,
over all rows as in the paper).

Joint sparsify + int8 quantize (:func:`sparsegpt_quantize`; the paper's joint mode, GPTQ's update):
a first pass prunes in float and fixes the mask and the int8 grid (the scales RTN would choose for
the updated survivors); a second pass runs the same column loop on the dense weight with that mask
fixed and rounds every surviving weight of column j to its grid when column j is fixed, so
e = (w − q)/U_jj carries the quantization error of the survivors, as well as the pruning error of
the rest, into the later columns. Fixing the grid from the dense weight instead (the paper's code)
lets the OBS updates push survivors past ±127·scale; the clamping error then grows worse than
round-to-nearest (measured on planted problems), hence the float pass first.
"""

from __future__ import annotations

import warnings

import torch

from salr.ops.format import column_scales
from salr.prune.masks import count
from salr.prune.quantize import check_group_size, int8_scales, quantize_to_grid, round_to_grid


def _inverse_cholesky_upper(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹, λ = damping·mean(diag H); retries with 10× more
    damping (up to 4 times) if H is numerically indefinite."""
    h = hessian.clone()
    mean_diag = h.diagonal().mean().item()
    for attempt in range(5):
        damped = h.clone()
        damped.diagonal().add_(damping * (10 ** attempt) * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            if attempt:
                warnings.warn(f"SparseGPT: the Hessian needed {damping * 10 ** attempt:g}·mean(diag) damping "
                              f"(asked {damping:g}) to be positive definite", RuntimeWarning, stacklevel=3)
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("hessian: not positive definite even with 10000× the requested damping; "
                     "is the calibration data degenerate?")


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, group: str = "layer", blocksize: int = 128,
                    damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on one [N, K] weight with input Hessian [K, K].

    Returns ``(pruned and updated weight in fp32, keep-mask)``; the inputs are not modified.
    `group` is "row" or "layer" for unstructured masks ("nm" or anything with `nm` given is N:M).
    """
    w, u = _prepare(weight, hessian, blocksize, nm, damping)
    w, keep = _sweep(w, u, sparsity, nm, group, blocksize)
    return w.to(weight.device), keep.to(weight.device)


@torch.no_grad()
def sparsegpt_quantize(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                       nm: tuple[int, int] | None = None, group: str = "layer", blocksize: int = 128,
                       damping: float = 0.01, group_size: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SparseGPT with int8 quantization folded into its column loop (module doc): returns
    ``(q int8 [N, K], scales fp32 [N] or [N, ceil(K/64)], keep-mask)``; arguments as
    :func:`sparsegpt_prune`, `group_size` None (per row) or 64 as :func:`salr.prune.quantize.int8_scales`."""
    check_group_size(group_size, "group_size")
    w, u = _prepare(weight, hessian, blocksize, nm, damping)
    pruned, keep = _sweep(w.clone(), u, sparsity, nm, group, blocksize)
    scales = int8_scales(pruned, group_size)
    grid = column_scales(scales, pruned.shape[1])
    folded, _ = _sweep(w, u, sparsity, nm, group, blocksize, fixed_keep=keep, grid=grid)
    # A survivor the second pass sets to exactly 0 leaves the bitmap, as in the float path.
    q = quantize_to_grid(folded, scales)
    return q.to(weight.device), scales.to(weight.device), (q != 0).to(weight.device)


def _prepare(weight: torch.Tensor, hessian: torch.Tensor, blocksize: int, nm: tuple[int, int] | None,
             damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks; then (the fp32 weight with its dead columns zeroed, U)."""
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian: expected shape ({cols}, {cols}) for a weight with in_features={cols}, "
                         f"got {tuple(hessian.shape)}")
    if blocksize < 1:
        raise ValueError(f"blocksize: must be >= 1, got {blocksize}")
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"blocksize: must be a multiple of M={nm[1]} for an N:M pattern, got {blocksize}")
    if not damping > 0:
        raise ValueError(f"damping: must be > 0, got {damping}")
    w = weight.detach().to(device=hessian.device, dtype=torch.float32).clone()
    h = hessian.detach().to(torch.float32).clone()
    if not torch.isfinite(h).all():
        raise ValueError("hessian: contains NaN or inf")
    dead = h.diagonal() <= 0
    if bool(dead.all()):
        h = torch.eye(cols, dtype=torch.float32, device=h.device)  # no signal at all: plain magnitude
    else:
        h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    return w, _inverse_cholesky_upper(h, damping)


def _sweep(w: torch.Tensor, u: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, group: str,
           blocksize: int, fixed_keep: torch.Tensor | None = None, grid: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The column loop on `w` (updated in place): choose the mask block by block (or take
    `fixed_keep`), zero the pruned weights, round the survivors to `grid` (per-weight scales [N, K])
    when given, spread every column's error over the later columns. Returns (w, keep)."""
    rows, cols = w.shape
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        width = b1 - b0
        wb = w[:, b0:b1].clone(memory_format=torch.contiguous_format)
        ub = u[b0:b1, b0:b1]
        diag = ub.diagonal()
        errors = torch.zeros_like(wb)
        block_keep = torch.ones(rows, width, dtype=torch.bool, device=w.device)
        if fixed_keep is not None:
            block_keep = fixed_keep[:, b0:b1].clone()
        elif nm is None:
            saliency = wb.square() / diag.square().unsqueeze(0)
            if group == "row":
                k = count(sparsity, b1) - count(sparsity, b0)
                if k > 0:
                    block_keep.scatter_(1, torch.topk(saliency, k, dim=1, largest=False).indices, False)
            elif group == "layer":
                k = count(sparsity, rows * b1) - count(sparsity, rows * b0)
                if k > 0:
                    flat = block_keep.view(-1)
                    flat[torch.topk(saliency.reshape(-1), k, largest=False).indices] = False
            else:
                raise ValueError(f"group: expected 'row' or 'layer', got {group!r}")
        for j in range(width):
            if fixed_keep is None and nm is not None and j % nm[1] == 0:
                n, m = nm
                saliency = wb[:, j:j + m].square() / diag[j:j + m].square().unsqueeze(0)
                drop = torch.topk(saliency, m - n, dim=1, largest=False).indices
                block_keep[:, j:j + m].scatter_(1, drop, False)
            col = wb[:, j]
            kept = col if grid is None else round_to_grid(col, grid[:, b0 + j]) * grid[:, b0 + j]
            q = torch.where(block_keep[:, j], kept, torch.zeros((), dtype=col.dtype, device=col.device))
            err = (col - q) / diag[j]
            wb[:, j:].sub_(err.unsqueeze(1) * ub[j, j:].unsqueeze(0))
            wb[:, j] = q
            errors[:, j] = err
        w[:, b0:b1] = wb
        keep[:, b0:b1] = block_keep
        if b1 < cols:
            w[:, b1:].sub_(errors @ u[b0:b1, b1:])
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device)), keep

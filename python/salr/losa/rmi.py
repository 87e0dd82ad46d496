"""Representation Mutual Information (LoSA §3.2): layer importance from the similarity of the decoder
blocks' input features, and the layer-wise sparsity it implies.

* Linear CKA between every pair of blocks, computed *streaming*: each calibration window (a
  minibatch of tokens) contributes an unbiased HSIC estimate per pair (Song et al. 2012; the
  minibatch CKA of Nguyen, Raghu & Kornblith 2021), so memory holds the features of one window for
  all blocks (L·n² Gram entries), never all blocks' full sequences.
* t_i = Σ_{j≠i} CKA(i, j); t̃ = t / Σ_j t_j (normalized over blocks); importance I_i = exp(−β·t̃_i):
  a block whose representation is redundant with the others matters less.
* Layer-wise sparsity: minimize Σ I_i·x_i subject to mean(x) = target and lo_i ≤ x_i ≤ hi_i (by
  default |x_i − target| ≤ δ). A linear program with box constraints and one equality is solved
  exactly by a greedy fill (:func:`solve_box_lp`): start every x_i at its lower bound and raise the
  cheapest (least important) ones to their upper bound until the mean is met. For β > 0 the
  ordering of I, hence the solution, does not depend on β: β only matters for exact ties.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- CKA

def _centered(x: Tensor) -> Tensor:
    x = x.reshape(-1, x.shape[-1]).double()
    return x - x.mean(0, keepdim=True)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of two representations of the same n samples ([n, d1], [n, d2]; leading dims are
    flattened): ‖ỸᵀX̃‖²_F / (‖X̃ᵀX̃‖_F·‖ỸᵀỸ‖_F) with column-centered X̃, Ỹ (the feature-space form)."""
    xc, yc = _centered(x), _centered(y)
    if xc.shape[0] != yc.shape[0]:
        raise ValueError(f"x, y: need the same number of samples, got {xc.shape[0]} and {yc.shape[0]}")
    cross = torch.linalg.matrix_norm(yc.t() @ xc) ** 2
    denom = torch.linalg.matrix_norm(xc.t() @ xc) * torch.linalg.matrix_norm(yc.t() @ yc)
    return float(cross / denom) if float(denom) > 0 else 0.0


class StreamingCKA:
    """Pairwise linear CKA of ``num_blocks`` representations, accumulated window by window.

    ``update(features)`` takes one minibatch: a list of ``num_blocks`` tensors [n, d_i] (leading
    dims flattened) for the same n ≥ 4 tokens, optionally subsampled to ``max_tokens`` tokens. It
    adds the unbiased HSIC₁ of every pair; ``matrix()`` returns
    CKA_ij = ΣHSIC_ij / sqrt(ΣHSIC_ii · ΣHSIC_jj), which is 1 on the diagonal and invariant to
    orthogonal transforms and isotropic scaling of any block's features.
    """

    def __init__(self, num_blocks: int, max_tokens: int | None = None, seed: int = 0) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks: must be an integer >= 1, got {num_blocks!r}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 4):
            raise ValueError(f"max_tokens: must be None or an integer >= 4, got {max_tokens!r}")
        self.num_blocks = num_blocks
        self.max_tokens = max_tokens
        self.hsic = torch.zeros(num_blocks, num_blocks, dtype=torch.float64)
        self.batches = 0
        self._gen = torch.Generator().manual_seed(seed)

    def update(self, features: Sequence[Tensor]) -> None:
        if len(features) != self.num_blocks:
            raise ValueError(f"features: expected {self.num_blocks} tensors (one per block), got {len(features)}")
        flat = [f.detach().reshape(-1, f.shape[-1]) for f in features]
        n = flat[0].shape[0]
        if any(f.shape[0] != n for f in flat):
            raise ValueError(f"features: every block needs the same tokens, got counts {[f.shape[0] for f in flat]}")
        if n < 4:
            raise ValueError(f"features: the unbiased HSIC needs at least 4 tokens per minibatch, got {n}")
        if self.max_tokens is not None and n > self.max_tokens:
            pick = torch.randperm(n, generator=self._gen)[:self.max_tokens].to(flat[0].device)
            flat = [f.index_select(0, pick) for f in flat]
            n = self.max_tokens
        self.hsic += unbiased_hsic_matrix(flat).cpu()
        self.batches += 1

    def matrix(self) -> Tensor:
        """CKA [num_blocks, num_blocks] in float64 (a representation with zero variance gets 0)."""
        if self.batches == 0:
            raise ValueError("StreamingCKA: no minibatch was added (call update first)")
        diag = self.hsic.diagonal().clamp_min(0)
        denom = torch.sqrt(diag[:, None] * diag[None, :])
        cka = torch.where(denom > 0, self.hsic / denom.clamp_min(1e-300), torch.zeros_like(self.hsic))
        cka.fill_diagonal_(1.0)
        return cka


def unbiased_hsic_matrix(features: Sequence[Tensor]) -> Tensor:
    """HSIC₁ (unbiased, linear kernel) between every pair of [n, d_i] feature sets, as [L, L].

    With K̃_i = X_i·X_iᵀ with its diagonal zeroed, HSIC₁(i, j) = [tr(K̃_iK̃_j) + 1ᵀK̃_i1·1ᵀK̃_j1/((n−1)(n−2))
    − 2/(n−2)·1ᵀK̃_iK̃_j1] / (n(n−3)); all pairs come from one [L, n²] Gram product.
    """
    n = features[0].shape[0]
    grams = []
    for f in features:
        f = f.double()
        k = f @ f.t()
        k.fill_diagonal_(0.0)
        grams.append(k)
    stack = torch.stack(grams)                           # [L, n, n]
    flat = stack.reshape(len(grams), -1)
    trace = flat @ flat.t()                              # tr(K̃_i K̃_j) (symmetric Grams)
    rows = stack.sum(-1)                                 # K̃_i 1, [L, n]
    totals = rows.sum(-1)                                # 1ᵀ K̃_i 1
    hsic = trace + torch.outer(totals, totals) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rows @ rows.t())
    return hsic / (n * (n - 3))


# ----------------------------------------------------------------------------- importance

def block_importance(cka: Tensor, beta: float = 1.0) -> Tensor:
    """I_i = exp(−β·t̃_i) with t_i = Σ_{j≠i} CKA_ij and t̃ = t / Σ t (uniform t̃ when Σ t = 0)."""
    if not isinstance(cka, Tensor) or cka.dim() != 2 or cka.shape[0] != cka.shape[1]:
        raise ValueError(f"cka: expected a square [L, L] tensor, got {getattr(cka, 'shape', type(cka).__name__)}")
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta: must be a finite number > 0, got {beta!r}")
    cka = cka.double()
    if not bool(torch.isfinite(cka).all()):
        raise ValueError("cka: contains NaN or inf")
    t = cka.sum(1) - cka.diagonal()
    total = float(t.sum())
    t_norm = t / total if total > 0 else torch.full_like(t, 1.0 / t.numel())
    return torch.exp(-beta * t_norm)


# ----------------------------------------------------------------------------- the LP

def solve_box_lp(cost: Tensor, total: float, lower: Tensor, upper: Tensor) -> Tensor:
    """Exact minimizer of Σ cost_i·x_i subject to Σ x_i = total and lower ≤ x ≤ upper (float64).

    Greedy by cost: x = lower, then raise the cheapest coordinates to their upper bound until the
    sum is reached (the last one fractionally). Ties break by index. Optimal because the program is
    a continuous knapsack: any feasible point can move mass from a dearer to a cheaper coordinate
    without raising the cost. ValueError when the box and the sum are incompatible.
    """
    cost, lower, upper = (torch.as_tensor(t, dtype=torch.float64).flatten() for t in (cost, lower, upper))
    if not (cost.numel() == lower.numel() == upper.numel()) or cost.numel() == 0:
        raise ValueError(f"cost/lower/upper: need equal non-zero lengths, got {cost.numel()}, {lower.numel()}, "
                         f"{upper.numel()}")
    for name, t in (("cost", cost), ("lower", lower), ("upper", upper)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or inf")
    if not math.isfinite(total):
        raise ValueError(f"total: must be finite, got {total!r}")
    if bool((lower > upper).any()):
        i = int(torch.nonzero(lower > upper)[0])
        raise ValueError(f"lower/upper: infeasible box at index {i} (lower {float(lower[i]):g} > upper "
                         f"{float(upper[i]):g})")
    lo_sum, hi_sum = float(lower.sum()), float(upper.sum())
    slack = 1e-12 * max(1.0, abs(total))
    if total < lo_sum - slack or total > hi_sum + slack:
        raise ValueError(f"total: {total:g} is outside [{lo_sum:g}, {hi_sum:g}], the sums the box allows: "
                         f"the program is infeasible")
    x = lower.clone()
    remaining = total - lo_sum
    order = sorted(range(cost.numel()), key=lambda i: (float(cost[i]), i))
    for i in order:
        if remaining <= 0:
            break
        step = min(float(upper[i] - lower[i]), remaining)
        x[i] += step
        remaining -= step
    return x


def sparsity_delta(target: float) -> float:
    """LoSA's deviation bound δ for a mean sparsity: 0.01 up to 50%, 0.02 up to 60%, 0.03 up to 70%,
    and 0.05 above 70% (our choice: the paper stops at 70%; wider room as the budget tightens)."""
    _check_target(target)
    if target <= 0.5:
        return 0.01
    if target <= 0.6:
        return 0.02
    if target <= 0.7:
        return 0.03
    return 0.05


def _check_target(target: float) -> None:
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
        raise ValueError(f"target: the sparsity must be a number in [0, 1), got {target!r}")


def layerwise_sparsity(importance: Tensor, target: float, delta: float | None = None,
                       current: Tensor | None = None, max_sparsity: float = 0.99) -> Tensor:
    """Per-block sparsity x minimizing Σ I_i·x_i with mean(x) = target, |x_i − target| ≤ δ and
    0 ≤ x_i ≤ max_sparsity (δ = :func:`sparsity_delta` when None).

    ``current`` (per-block sparsity already reached) raises the lower bounds, since masks only grow:
    lower_i = max(target − δ, current_i). ValueError when δ < 0 or the bounds admit no solution.
    """
    _check_target(target)
    importance = torch.as_tensor(importance, dtype=torch.float64).flatten()
    if delta is None:
        delta = sparsity_delta(target)
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta):
        raise ValueError(f"delta: must be a finite number, got {delta!r}")
    if delta < 0:
        raise ValueError(f"delta: {delta:g} < 0 leaves |x_i - target| <= delta no solution (infeasible program)")
    if not 0.0 < max_sparsity <= 1.0:
        raise ValueError(f"max_sparsity: must be in (0, 1], got {max_sparsity!r}")
    n = importance.numel()
    lower = torch.full((n,), max(0.0, target - delta), dtype=torch.float64)
    upper = torch.full((n,), min(max_sparsity, target + delta), dtype=torch.float64)
    if current is not None:
        current = torch.as_tensor(current, dtype=torch.float64).flatten()
        if current.numel() != n:
            raise ValueError(f"current: expected {n} per-block sparsities, got {current.numel()}")
        lower = torch.maximum(lower, current)
        upper = torch.maximum(upper, lower)
    try:
        return solve_box_lp(importance, n * target, lower, upper)
    except ValueError as exc:
        raise ValueError(f"delta: with target {target:g}, delta {delta:g}"
                         f"{' and the sparsity already reached' if current is not None else ''} the "
                         f"layer-wise program is infeasible ({exc})") from exc

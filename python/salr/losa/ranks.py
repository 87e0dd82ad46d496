"""Error-based rank allocation (LoSA §3.3) and the per-block reconstruction error it reads.

After a pruning round, block l's reconstruction error E_l compares the dense and the sparse block's
outputs on the same inputs, normalized per output feature (so wide and narrow features weigh the
same): E_l = mean_j Σ_t (Y_dense − Y_sparse)²_tj / Σ_t (Y_dense)²_tj. The rank budget R̄·L is split in
proportion: r_l = round(E_l / ΣE · R̄·L), clipped to [1, r_max], then repaired so Σ r_l = R̄·L exactly
(one unit at a time, to the block whose rank is furthest below / above its unrounded share).
``r_max`` is a real bound: LoSA's reference code silently caps at its LoRA rank; here a budget that
[1, r_max] cannot meet is an error.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


class ErrorAccumulator:
    """Streams E for one block: per output feature Σ(dense − sparse)² and Σ dense², window by window."""

    def __init__(self) -> None:
        self.err: Tensor | None = None
        self.ref: Tensor | None = None

    @torch.no_grad()
    def add(self, dense: Tensor, sparse: Tensor) -> None:
        if dense.shape != sparse.shape:
            raise ValueError(f"dense/sparse: outputs must share a shape, got {tuple(dense.shape)} and "
                             f"{tuple(sparse.shape)}")
        d = dense.reshape(-1, dense.shape[-1]).double()
        s = sparse.reshape(-1, sparse.shape[-1]).double()
        err, ref = ((d - s) ** 2).sum(0), (d * d).sum(0)
        self.err = err if self.err is None else self.err + err
        self.ref = ref if self.ref is None else self.ref + ref

    def value(self) -> float:
        if self.err is None:
            raise ValueError("ErrorAccumulator: no output was added")
        keep = self.ref > 0  # a feature that is identically zero in the dense block carries no signal
        if not bool(keep.any()):
            return 0.0
        return float((self.err[keep] / self.ref[keep]).mean())


def reconstruction_error(dense: Tensor, sparse: Tensor) -> float:
    """E for one batch of outputs (see :class:`ErrorAccumulator`)."""
    acc = ErrorAccumulator()
    acc.add(dense, sparse)
    return acc.value()


def allocate_ranks(errors, mean_rank: int, r_max: int) -> list[int]:
    """Integer ranks r_l ∈ [1, r_max] with Σ r_l = mean_rank·L, proportional to the errors.

    errors: L non-negative finite numbers (all zero → uniform). ValueError when mean_rank·L cannot be
    met within [1, r_max]^L (mean_rank < 1 or mean_rank > r_max) or an argument is malformed.
    """
    e = torch.as_tensor(errors, dtype=torch.float64).flatten()
    count = e.numel()
    if count == 0:
        raise ValueError("errors: need at least one block")
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise ValueError(f"errors: must be finite and >= 0, got {e.tolist()}")
    for name, v in (("mean_rank", mean_rank), ("r_max", r_max)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}: must be an integer, got {v!r}")
    budget = mean_rank * count
    if r_max < 1:
        raise ValueError(f"r_max: must be >= 1, got {r_max}")
    if budget < count or budget > count * r_max:
        raise ValueError(f"mean_rank: the budget {mean_rank}·{count} = {budget} cannot be met with every rank in "
                         f"[1, r_max={r_max}] (needs 1 <= mean_rank <= r_max)")
    total = float(e.sum())
    share = e / total * budget if total > 0 else torch.full_like(e, float(mean_rank))
    ranks = [min(r_max, max(1, int(math.floor(float(q) + 0.5)))) for q in share]
    diff = budget - sum(ranks)
    while diff != 0:
        if diff > 0:  # grow the block furthest below its share (ties: lowest index)
            room = [i for i in range(count) if ranks[i] < r_max]
            pick = max(room, key=lambda i: (float(share[i]) - ranks[i], -i))
            ranks[pick] += 1
            diff -= 1
        else:
            room = [i for i in range(count) if ranks[i] > 1]
            pick = max(room, key=lambda i: (ranks[i] - float(share[i]), -i))
            ranks[pick] -= 1
            diff += 1
    return ranks

"""Sparsity per projection type: within each decoder block, prune the types that carry little of the
pruning error harder and the sensitive ones less, keeping the block's (and so the model's) sparsity.

`bench/layer_sensitivity.py` measured on SmolLM2-135M (bench/RESULTS.md, "Which layers carry the
pruning error") how much of the pruned model's perplexity gap each projection type closes per weight
when restored to dense: v_proj 3.3, the MLP projections 1.1–1.5, q / k / o 0.3–0.5.
:data:`SENSITIVITY_OFFSETS` turns that ranking into offsets from the block's ratio; a block's ratios
are ``clamp(block ratio + offset + c, lo, hi)`` with the one shift c that brings their weight-weighted
mean back to the block's ratio (:func:`salr.prune.owl.clipped_at_mean`), so the offsets combine with
any per-block ratios (uniform, or OWL's).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from salr.nn.models import block_linears, linear_dims
from salr.prune.owl import clipped_at_mean

# Offsets from the block ratio by the last component of a linear's name (others get 0), from the
# per-weight sensitivity ranking above: q / k / o +0.10, v −0.15, up −0.04, gate −0.02, down −0.01.
SENSITIVITY_OFFSETS = {"q_proj": 0.10, "k_proj": 0.10, "o_proj": 0.10, "v_proj": -0.15,
                       "gate_proj": -0.02, "up_proj": -0.04, "down_proj": -0.01}
MAX_SPARSITY = 0.95


def typed_layer_sparsity(model: nn.Module, block_ratios: float | Sequence[float],
                         offsets: Mapping[str, float] = SENSITIVITY_OFFSETS,
                         targets: Sequence[str] | None = None, strength: float = 1.0) -> dict[str, float]:
    """{qualified linear name: sparsity} for every target linear of `model` (SALRConfig's per-layer
    mapping): each block's `block_ratios` entry (one number: every block) moved apart by type
    `offsets` × `strength`, the block's weight-weighted mean unchanged, every ratio within
    [0, MAX_SPARSITY]."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 4:
        raise ValueError(f"typed_layer_sparsity: strength must be a number in [0, 4], got {strength!r}")
    per_block = block_linears(model, targets)
    if isinstance(block_ratios, (int, float)) and not isinstance(block_ratios, bool):
        block_ratios = [float(block_ratios)] * len(per_block)
    if len(block_ratios) != len(per_block):
        raise ValueError(f"typed_layer_sparsity: block_ratios needs one ratio per decoder block "
                         f"({len(per_block)}), got {len(block_ratios)}")
    for name, offset in offsets.items():
        if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not -1.0 < offset < 1.0:
            raise ValueError(f"typed_layer_sparsity: offsets[{name!r}] must be a number in (-1, 1), got {offset!r}")
    out: dict[str, float] = {}
    for (_, linears), ratio in zip(per_block, block_ratios):
        if not 0.0 <= ratio <= MAX_SPARSITY:
            raise ValueError(f"typed_layer_sparsity: block_ratios must lie in [0, {MAX_SPARSITY}], got {ratio!r}")
        names = list(linears)
        sizes = torch.tensor([math.prod(linear_dims(linears[n])) for n in names], dtype=torch.float64)
        raw = torch.tensor([ratio + strength * offsets.get(n.rsplit(".", 1)[-1], 0.0) for n in names],
                           dtype=torch.float64)
        out.update(zip(names, clipped_at_mean(raw, sizes / sizes.sum(), ratio, 0.0, MAX_SPARSITY)))
    return out

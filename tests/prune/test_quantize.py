"""int8 quantization of pruned weights (issue 21): the grid round trip is exact, the mask is kept
(survivors that round to 0 become ±1), scales per row and per 64-column group, and SparseGPT's
folded variant reconstructs the layer output better than round-to-nearest after SparseGPT."""

from __future__ import annotations

import math

import pytest
import torch

from salr.ops.format import BitmapSparseWeight
from salr.prune.criteria import prune_weight, prune_weight_int8
from salr.prune.quantize import (dequantize, int8_scales, quantize_int8, quantize_to_grid, round_to_grid)
from salr.prune.sparsegpt import sparsegpt_prune, sparsegpt_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


def _grid(rows, cols, group_size, seed=0, density=0.5):
    """A random int8 grid q (zeros at 1 - density, ±127 present in every row/group) and scales."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (rows, cols), generator=gen, dtype=torch.int16)
    q[torch.rand(rows, cols, generator=gen) >= density] = 0
    width = cols if group_size is None else group_size
    q[:, ::width] = 127  # every row (group) reaches the top of the range: int8_scales gives the scale back
    shape = (rows,) if group_size is None else (rows, math.ceil(cols / 64))
    scales = torch.rand(shape, generator=gen) * 0.1 + 1e-3
    return q.to(torch.int8), scales


@pytest.mark.parametrize("rows,cols", [(1, 1), (7, 9), (16, 64), (13, 130)])
@pytest.mark.parametrize("group_size", [None, 64])
def test_round_trip_on_the_grid_is_exact(rows, cols, group_size):
    q, scales = _grid(rows, cols, group_size)
    weight = dequantize(q, scales)
    assert torch.equal(quantize_to_grid(weight, scales), q)
    assert torch.allclose(int8_scales(weight, group_size), scales, rtol=1e-6, atol=0)
    again, again_scales = quantize_int8(weight, group_size)
    assert torch.equal(again, q)
    # the BM8x8 weight with int8 values decodes to the same dequantized weight
    sparse = BitmapSparseWeight.from_dense(q, scales)
    assert sparse.dtype == torch.int8 and sparse.nnz == int((q != 0).sum())
    assert torch.equal(sparse.to_dense(), weight)
    assert torch.equal(sparse.to_dense(torch.bfloat16), weight.to(torch.bfloat16))


def test_rtn_error_is_at_most_half_a_step_and_the_mask_is_kept():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 200, generator=gen)
    w[torch.rand(32, 200, generator=gen) < 0.5] = 0.0
    w[0, 5] = 1e-6 * w[0].abs().max()  # a survivor far below one step: stored as +1, not dropped
    w[1, 7] = -1e-6 * w[1].abs().max()
    for group_size in (None, 64):
        q, scales = quantize_int8(w, group_size)
        assert q.dtype == torch.int8 and torch.equal(q != 0, w != 0)
        assert q[0, 5] == 1 and q[1, 7] == -1
        step = scales.unsqueeze(1).expand_as(w) if group_size is None else scales.repeat_interleave(64, 1)[:, :200]
        error = (dequantize(q, scales) - w).abs()
        regular = w.abs() >= step / 2
        assert bool((error[regular] <= step[regular] / 2 * (1 + 1e-5)).all())
        assert int(q.abs().max()) == 127


def test_per_group_scales_follow_each_group():
    w = torch.ones(2, 130)
    w[:, 64:128] = 100.0
    q, scales = quantize_int8(w, 64)
    assert scales.shape == (2, 3)
    assert torch.allclose(scales[:, 1], torch.full((2,), 100.0 / 127))
    assert torch.allclose(scales[:, 0], torch.full((2,), 1.0 / 127))
    assert torch.equal(dequantize(q, scales), torch.where(w > 1, 100.0, 1.0) * torch.ones_like(w))
    # per row: the small columns lose everything but their sign... and are still kept as ±1
    q_row, scales_row = quantize_int8(w)
    assert torch.equal(q_row != 0, w != 0) and int(q_row[0, 0]) == 1


def test_all_zero_rows_get_scale_one_and_zeros_stay_zero():
    w = torch.zeros(3, 70)
    w[1, 3] = -2.0
    q, scales = quantize_int8(w, 64)
    assert torch.equal(scales[0], torch.ones(2)) and bool((scales > 0).all())
    assert int(q[1, 3]) == -127 and int((q != 0).sum()) == 1
    assert torch.equal(round_to_grid(torch.tensor([0.0, -0.0]), torch.tensor(1.0)), torch.zeros(2))


@pytest.mark.parametrize("bad,fragment", [
    (torch.zeros(4), "scales: every scale must be finite and > 0"),
    (-torch.ones(4), "scales: every scale must be finite and > 0"),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0]), "scales: every scale must be finite"),
    (torch.tensor([1.0, float("inf"), 1.0, 1.0]), "scales: every scale must be finite"),
    (torch.ones(5), "scales: expected shape (4,)"),
    (torch.ones(4, 3), "scales: expected shape"),
    (torch.ones(4, dtype=torch.float64), "scales: expected float32"),
])
def test_bad_scales_are_refused(bad, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        quantize_to_grid(torch.ones(4, 100), bad)
    with pytest.raises(ValueError, match="scales"):
        dequantize(torch.ones(4, 100, dtype=torch.int8), bad)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="weight: contains NaN"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="group_size: expected None"):
        quantize_int8(torch.ones(2, 2), 32)
    with pytest.raises(ValueError, match="q: expected int8"):
        dequantize(torch.ones(2, 2), torch.ones(2))
    with pytest.raises(ValueError, match="group_size: expected None"):
        sparsegpt_quantize(torch.ones(2, 8), torch.eye(8), 0.5, group_size=16)


def _planted_layer(seed=1, rows=64, cols=256, tokens=4096):
    """Correlated inputs (a rank-16 common part on top of white noise): OBS has something to exploit."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=gen)
    x = x + 0.5 * torch.randn(tokens, 16, generator=gen) @ torch.randn(16, cols, generator=gen)
    weight = torch.randn(rows, cols, generator=gen)
    return weight, x, (2.0 / tokens) * x.T @ x


def _output_error(x, weight, approx):
    return (x @ weight.T - x @ approx.T).norm().item()


@pytest.mark.parametrize("group_size", [None, 64])
def test_folded_sparsegpt_beats_rtn_after_sparsegpt(group_size):
    weight, x, hessian = _planted_layer()
    pruned, keep = sparsegpt_prune(weight, hessian, 0.5)
    rtn = dequantize(*quantize_int8(pruned, group_size))
    q, scales, keep_q = sparsegpt_quantize(weight, hessian, 0.5, group_size=group_size)
    folded = dequantize(q, scales)
    assert torch.equal(keep_q, keep)  # the float pass fixes the mask
    float_error = _output_error(x, weight, pruned)
    rtn_error, folded_error = _output_error(x, weight, rtn), _output_error(x, weight, folded)
    # Measured (seed 1, ||X(W - Ŵ)||): float 2673.03; per row RTN 2676.12, folded 2674.10; per group
    # RTN 2674.08, folded 2673.76. What rounding adds to the squared float error: folded / RTN = 0.35
    # per row, 0.69 per group (seeds 2 and 3: 0.81 / 0.60 and -0.05 / 0.55).
    assert folded_error < rtn_error
    assert folded_error ** 2 - float_error ** 2 < 0.8 * (rtn_error ** 2 - float_error ** 2)


def test_folded_sparsegpt_without_pruning_is_gptq():
    """At sparsity 0 the folded variant is GPTQ on an int8 grid: it must beat round-to-nearest clearly
    (measured, seed 2: 70.7 against 137.6)."""
    weight, x, hessian = _planted_layer(seed=2)
    rtn = dequantize(*quantize_int8(weight))
    q, scales, keep = sparsegpt_quantize(weight, hessian, 0.0)
    assert bool(keep.all())
    assert _output_error(x, weight, dequantize(q, scales)) < 0.8 * _output_error(x, weight, rtn)


def test_prune_weight_int8_dispatches_on_the_criterion():
    weight, x, hessian = _planted_layer(rows=16, cols=128, tokens=512)
    norms = x.norm(dim=0)
    pruned, _ = prune_weight(weight, "wanda", 0.5, input_norms=norms)
    q, scales = prune_weight_int8(weight, "wanda", 0.5, input_norms=norms)
    assert torch.equal((q, scales)[0], quantize_int8(pruned)[0])
    q, scales = prune_weight_int8(weight, "sparsegpt", 0.5, hessian=hessian, group_size=64)
    assert scales.shape == (16, 2) and torch.equal(q, sparsegpt_quantize(weight, hessian, 0.5, group_size=64)[0])
    with pytest.raises(ValueError, match="hessian"):
        prune_weight_int8(weight, "sparsegpt", 0.5)

"""SparseGPT: lower layer reconstruction error than Wanda and magnitude on correlated inputs, exact
masks, OBS updates equal to an explicit-inverse reference, dead inputs, bad arguments, and the
warning for a Hessian from fewer tokens than inputs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch


from salr.prune.calibration import LinearStats
from salr.prune.criteria import prune_weight
from salr.prune.sparsegpt import sparsegpt_prune

pytestmark = pytest.mark.usefixtures("one_thread")


def _correlated_layer(rows=48, cols=160, tokens=1024, seed=0):
    """Inputs with strongly correlated features (low-rank mixing + small noise), so the OBS updates
    have something to exploit; scales vary per feature, as LLM activations do."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, cols // 4, generator=gen)
    x = latent @ torch.randn(cols // 4, cols, generator=gen) + 0.1 * torch.randn(tokens, cols, generator=gen)
    x = x * (torch.rand(cols, generator=gen) * 2 + 0.2)
    weight = torch.randn(rows, cols, generator=gen) / math.sqrt(cols)
    hessian = (2.0 / tokens) * x.T @ x
    return weight, x, hessian, (x * x).sum(0).sqrt()


def _error(x, weight, pruned):
    return ((x @ weight.T - x @ pruned.T).norm() / (x @ weight.T).norm()).item()


@pytest.mark.parametrize("sparsity,pattern", [(0.5, None), (0.7, None), (0.5, "2:4"), (0.5, "4:8")])
def test_sparsegpt_beats_wanda_and_magnitude(sparsity, pattern):
    weight, x, hessian, norms = _correlated_layer()
    errors = {}
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        pruned, _ = prune_weight(weight, criterion, sparsity, pattern=pattern, input_norms=norms, hessian=hessian)
        errors[criterion] = _error(x, weight, pruned)
    assert errors["sparsegpt"] < 0.8 * errors["wanda"], errors
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"], errors


@pytest.mark.parametrize("group", ["row", "layer"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("blocksize", [128, 32, 7])
def test_exact_unstructured_counts(group, sparsity, blocksize):
    weight, _, hessian, _ = _correlated_layer(rows=20, cols=150)
    pruned, keep = sparsegpt_prune(weight, hessian, sparsity, group=group, blocksize=blocksize)
    if group == "row":
        assert torch.all((~keep).sum(1) == math.floor(sparsity * 150 + 0.5))
    else:
        assert int((~keep).sum()) == math.floor(sparsity * 20 * 150 + 0.5)
    assert torch.all(pruned[~keep] == 0)


@pytest.mark.parametrize("pattern,nm", [("2:4", (2, 4)), ("4:8", (4, 8))])
def test_exact_nm(pattern, nm):
    weight, _, hessian, _ = _correlated_layer(rows=16, cols=128)
    pruned, keep = prune_weight(weight, "sparsegpt", None, pattern=pattern, hessian=hessian)
    assert torch.all(keep.reshape(16, -1, nm[1]).sum(-1) == nm[0])
    assert torch.all(pruned[~keep] == 0)


def _obs_reference(weight, hessian, keep, damping=0.01):
    """Optimal Brain Surgeon with an explicit inverse, column by column, in float64: with the mask
    fixed, eliminating column j moves the remaining weights by −(w_j − q_j)/[H⁻¹]_jj · H⁻¹[j, :] and
    removes j from the inverse. SparseGPT's Cholesky + lazy-block form must give the same weights."""
    w = weight.double().clone()
    h = hessian.double().clone()
    h.diagonal().add_(damping * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    for j in range(w.shape[1]):
        q = torch.where(keep[:, j], w[:, j], torch.zeros((), dtype=w.dtype))
        err = (w[:, j] - q) / hinv[j, j]
        w[:, j:] -= err.unsqueeze(1) * hinv[j, j:].unsqueeze(0)
        w[:, j] = q
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return w


@pytest.mark.parametrize("blocksize", [128, 16])
def test_updates_match_explicit_obs(blocksize):
    weight, _, hessian, _ = _correlated_layer(rows=8, cols=64, tokens=512, seed=3)
    pruned, keep = sparsegpt_prune(weight, hessian, 0.5, group="row", blocksize=blocksize)
    reference = _obs_reference(weight, hessian, keep)
    assert torch.allclose(pruned.double(), reference, rtol=1e-3, atol=1e-4 * reference.abs().max().item())


def test_zero_sparsity_keeps_weights():
    weight, _, hessian, _ = _correlated_layer(rows=8, cols=64)
    pruned, keep = sparsegpt_prune(weight, hessian, 0.0)
    assert keep.all() and torch.allclose(pruned, weight, atol=1e-6)


def test_dead_inputs():
    weight, x, _, _ = _correlated_layer(rows=16, cols=64)
    x[:, [3, 10, 11, 40]] = 0.0
    hessian = (2.0 / x.shape[0]) * x.T @ x
    pruned, keep = sparsegpt_prune(weight, hessian, 0.5, group="row")
    assert torch.isfinite(pruned).all()
    assert torch.all((~keep).sum(1) == 32)
    assert torch.all(pruned[:, [3, 10, 11, 40]] == 0), "weights of always-zero inputs carry nothing"
    pruned_all_dead, _ = sparsegpt_prune(weight, torch.zeros(64, 64), 0.5, group="row")
    assert torch.isfinite(pruned_all_dead).all()


def test_bad_arguments():
    weight, _, hessian, _ = _correlated_layer(rows=8, cols=64)
    with pytest.raises(ValueError, match=r"hessian: expected shape \(64, 64\)"):
        sparsegpt_prune(weight, hessian[:32, :32], 0.5)
    with pytest.raises(ValueError, match="blocksize: must be a multiple of M=8"):
        sparsegpt_prune(weight, hessian, 0.5, nm=(4, 8), blocksize=12)
    with pytest.raises(ValueError, match="damping"):
        sparsegpt_prune(weight, hessian, 0.5, damping=0.0)
    bad = hessian.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="hessian: contains NaN"):
        sparsegpt_prune(weight, bad, 0.5)


def test_hessian_from_fewer_tokens_than_inputs_warns():
    """XᵀX from fewer tokens than inputs is rank-deficient: the calibration says so, naming the counts;
    with enough tokens it is silent."""
    stats = LinearStats(in_features=64, with_hessian=True)
    stats.add(torch.randn(2, 20, 64))  # 40 tokens
    with pytest.warns(RuntimeWarning, match="40 calibration tokens for 64 inputs"):
        hessian = stats.hessian()
    assert torch.linalg.matrix_rank(hessian).item() <= 40
    stats.add(torch.randn(24, 64))  # 64 tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.linalg.matrix_rank(stats.hessian()).item() == 64

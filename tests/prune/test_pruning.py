"""Pruning masks: exact sparsity per comparison group, N:M patterns, Wanda against a brute force,
and the ValueErrors of bad arguments."""

from __future__ import annotations

import math

import pytest
import torch


from salr.prune.criteria import DEFAULT_GROUP, magnitude_scores, prune_weight, wanda_scores
from salr.prune.masks import count, mask_from_scores, parse_pattern, resolve_sparsity

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(8, 16), (13, 40), (64, 96), (3, 1000)]
RATIOS = [0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.99]


def _layer(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    norms = torch.rand(cols, generator=gen) * 10 + 0.01
    return weight, norms


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", RATIOS)
@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_row_group_prunes_exactly_per_row(shape, sparsity, criterion):
    weight, norms = _layer(*shape, seed=1)
    pruned, keep = prune_weight(weight, criterion, sparsity, group="row", input_norms=norms)
    per_row = (~keep).sum(1)
    assert torch.all(per_row == math.floor(sparsity * shape[1] + 0.5)), per_row
    assert torch.equal(pruned, torch.where(keep, weight, torch.zeros(()))), "kept weights must be unchanged"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", RATIOS)
@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_layer_group_prunes_exactly_per_layer(shape, sparsity, criterion):
    weight, norms = _layer(*shape, seed=2)
    _, keep = prune_weight(weight, criterion, sparsity, group="layer", input_norms=norms)
    assert int((~keep).sum()) == math.floor(sparsity * shape[0] * shape[1] + 0.5)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "3:8"])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_nm_pattern_exact_in_every_group(pattern, criterion):
    n, m = parse_pattern(pattern)
    weight, norms = _layer(24, 64, seed=3)
    pruned, keep = prune_weight(weight, criterion, None, pattern=pattern, input_norms=norms)
    groups = keep.reshape(24, 64 // m, m).sum(-1)
    assert torch.all(groups == n)
    assert torch.all((pruned != 0) == keep)


def test_magnitude_layer_keeps_the_largest():
    weight, _ = _layer(32, 48, seed=4)
    _, keep = prune_weight(weight, "magnitude", 0.6, group="layer")
    assert weight.abs()[keep].min() > weight.abs()[~keep].max()


def _wanda_brute_force(weight, norms, sparsity, group):
    """Sun et al. 2023 as written: score_ij = |W_ij|·‖X_j‖₂; drop the lowest scores per row."""
    rows, cols = weight.shape
    keep = [[True] * cols for _ in range(rows)]
    if group == "row":
        k = math.floor(sparsity * cols + 0.5)
        for i in range(rows):
            scores = sorted((abs(float(weight[i, j])) * float(norms[j]), j) for j in range(cols))
            for _, j in scores[:k]:
                keep[i][j] = False
    else:
        k = math.floor(sparsity * rows * cols + 0.5)
        scores = sorted((abs(float(weight[i, j])) * float(norms[j]), i, j) for i in range(rows) for j in range(cols))
        for _, i, j in scores[:k]:
            keep[i][j] = False
    return torch.tensor(keep)


@pytest.mark.parametrize("group", ["row", "layer"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_wanda_equals_brute_force(group, sparsity):
    weight, norms = _layer(12, 20, seed=5)
    _, keep = prune_weight(weight, "wanda", sparsity, group=group, input_norms=norms)
    assert torch.equal(keep, _wanda_brute_force(weight.double(), norms.double(), sparsity, group))


def test_wanda_uses_activations():
    # Same weights, one input feature 100x louder: Wanda keeps that column, magnitude does not care.
    weight = torch.full((4, 8), 1.0)
    weight[:, 3] = 0.5
    norms = torch.ones(8)
    norms[3] = 100.0
    _, keep_w = prune_weight(weight, "wanda", 0.5, group="row", input_norms=norms)
    _, keep_m = prune_weight(weight, "magnitude", 0.5, group="row")
    assert keep_w[:, 3].all() and not keep_m[:, 3].any()
    assert torch.equal(wanda_scores(weight, norms)[:, 3], torch.full((4,), 50.0))


def test_default_groups_follow_the_papers():
    assert DEFAULT_GROUP == {"magnitude": "layer", "wanda": "row", "sparsegpt": "layer"}
    weight, norms = _layer(16, 32, seed=6)
    _, keep = prune_weight(weight, "wanda", 0.5, input_norms=norms)
    assert torch.all((~keep).sum(1) == 16)
    _, keep = prune_weight(weight, "magnitude", 0.5)
    assert torch.equal(keep, mask_from_scores(magnitude_scores(weight), 0.5, "layer"))


def test_input_weight_is_not_modified():
    weight, norms = _layer(8, 16, seed=7)
    before = weight.clone()
    prune_weight(weight, "wanda", 0.5, input_norms=norms)
    assert torch.equal(weight, before)


# ------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_bad_sparsity(sparsity):
    weight, _ = _layer(8, 16, seed=8)
    with pytest.raises(ValueError, match="sparsity"):
        prune_weight(weight, "magnitude", sparsity)


@pytest.mark.parametrize("pattern", ["4:2", "2:2", "0:4", "a:b", "2-4", "2:4:8", 24])
def test_bad_pattern(pattern):
    weight, _ = _layer(8, 16, seed=9)
    with pytest.raises(ValueError, match="pattern"):
        prune_weight(weight, "magnitude", None, pattern=pattern)


def test_pattern_contradicting_ratio():
    weight, _ = _layer(8, 16, seed=10)
    with pytest.raises(ValueError, match=r"sparsity: pattern '2:4'.*contradicts sparsity=0.7"):
        prune_weight(weight, "magnitude", 0.7, pattern="2:4")
    assert resolve_sparsity(0.5, "2:4") == 0.5 and resolve_sparsity(None, "4:8") == 0.5


def test_nm_needs_divisible_width():
    weight, _ = _layer(8, 18, seed=11)
    with pytest.raises(ValueError, match="pattern: 2:4 needs the in_features.*in_features=18"):
        prune_weight(weight, "magnitude", 0.5, pattern="2:4")


def test_unknown_criterion_and_group():
    weight, norms = _layer(8, 16, seed=12)
    with pytest.raises(ValueError, match="criterion: unknown criterion 'obs'"):
        prune_weight(weight, "obs", 0.5)
    with pytest.raises(ValueError, match="group: expected one of row, layer"):
        prune_weight(weight, "magnitude", 0.5, group="column")
    with pytest.raises(ValueError, match="group: an N:M pattern"):
        prune_weight(weight, "magnitude", 0.5, pattern="2:4", group="row")


def test_missing_statistics():
    weight, _ = _layer(8, 16, seed=13)
    with pytest.raises(ValueError, match="input_norms: Wanda needs"):
        prune_weight(weight, "wanda", 0.5)
    with pytest.raises(ValueError, match=r"input_norms: expected shape \(16,\)"):
        prune_weight(weight, "wanda", 0.5, input_norms=torch.ones(15))
    with pytest.raises(ValueError, match="hessian: SparseGPT needs"):
        prune_weight(weight, "sparsegpt", 0.5)


def test_count_rounds_half_up():
    assert [count(0.5, n) for n in (1, 3, 5, 7)] == [1, 2, 3, 4]
    assert count(0.7, 10) == 7 and count(0.0, 10) == 0

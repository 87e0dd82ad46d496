"""LoSA's allocations: streaming CKA, the closed-form layer-wise LP (vs scipy's linprog), error-based
ranks, the cubic schedule, and their bad-input errors."""

from __future__ import annotations

import math

import pytest
import torch

from salr.losa.ranks import ErrorAccumulator, allocate_ranks, reconstruction_error
from salr.losa.rmi import (StreamingCKA, block_importance, layerwise_sparsity, linear_cka, solve_box_lp,
                           sparsity_delta, unbiased_hsic_matrix)
from salr.losa.schedule import cubic_sparsity, sparsity_schedule, split_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def _orthogonal(d, gen):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q


# ----------------------------------------------------------------------------- CKA

def test_cka_of_a_representation_with_itself_is_one_and_invariant():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=gen, dtype=torch.float64) @ torch.randn(24, 24, generator=gen,
                                                                               dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(24, 16, generator=gen, dtype=torch.float64))
    q = _orthogonal(24, gen)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    base = linear_cka(x, y)
    assert 0.05 < base < 0.95  # a real, non-trivial value that the invariances must reproduce
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(7.5 * x, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, 0.01 * y @ _orthogonal(16, gen)) == pytest.approx(base, abs=1e-10)
    # Not invariant to a general (non-orthogonal, anisotropic) linear map: the test can fail.
    assert abs(linear_cka(x * torch.linspace(0.1, 10, 24, dtype=torch.float64), y) - base) > 1e-3


def test_streaming_cka_is_one_on_the_diagonal_invariant_and_near_the_full_data_value():
    gen = torch.Generator().manual_seed(1)
    d = 20
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    q = _orthogonal(d, gen)
    proj = torch.randn(d, 12, generator=gen, dtype=torch.float64)
    cka = StreamingCKA(4)
    xs, ys = [], []
    for _ in range(8):  # 8 windows of 250 tokens
        x = torch.randn(250, d, generator=gen, dtype=torch.float64) @ mix
        y = torch.relu(x @ proj + 3 * torch.randn(250, 12, generator=gen, dtype=torch.float64))
        noise = torch.randn(250, d, generator=gen, dtype=torch.float64)
        cka.update([x, 3.0 * x @ q, y, noise])
        xs.append(x)
        ys.append(y)
    m = cka.matrix()
    assert torch.allclose(m.diagonal(), torch.ones(4, dtype=torch.float64))
    assert float(m[0, 1]) == pytest.approx(1.0, abs=1e-9)   # orthogonal map + isotropic scale
    assert float(m[0, 2]) == pytest.approx(float(m[1, 2]), abs=1e-9)
    assert torch.allclose(m, m.T)
    full = linear_cka(torch.cat(xs), torch.cat(ys))
    assert float(m[0, 2]) == pytest.approx(full, abs=0.05)
    assert abs(float(m[0, 3])) < 0.05  # independent noise: near zero (unbiased estimator)


def test_unbiased_hsic_matches_the_explicit_formula():
    gen = torch.Generator().manual_seed(2)
    n = 9
    a = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    k, l = a @ a.T, b @ b.T
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, dtype=torch.float64)
    want = (torch.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))
    got = unbiased_hsic_matrix([a, b])
    assert float(got[0, 1]) == pytest.approx(float(want), rel=1e-12)


def test_streaming_cka_subsamples_tokens_and_checks_its_input():
    cka = StreamingCKA(2, max_tokens=16)
    x = torch.randn(100, 4)
    cka.update([x, x])
    assert cka.batches == 1 and float(cka.matrix()[0, 1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="features"):
        cka.update([x])
    with pytest.raises(ValueError, match="features"):
        cka.update([x, x[:50]])
    with pytest.raises(ValueError, match="no minibatch"):
        StreamingCKA(2).matrix()


def test_importance_decreases_with_redundancy():
    cka = torch.tensor([[1.0, 0.9, 0.8], [0.9, 1.0, 0.2], [0.8, 0.2, 1.0]])
    imp = block_importance(cka, beta=2.0)
    t = torch.tensor([1.7, 1.1, 1.0], dtype=torch.float64)
    assert torch.allclose(imp, torch.exp(-2.0 * t / t.sum()))
    assert int(imp.argmin()) == 0  # the most redundant block is the least important
    with pytest.raises(ValueError, match="beta"):
        block_importance(cka, beta=0.0)


# ----------------------------------------------------------------------------- the LP

@pytest.mark.parametrize("seed", range(25))
def test_closed_form_allocation_equals_linprog(seed):
    optimize = pytest.importorskip("scipy.optimize")
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 40, (1,), generator=gen))
    cost = torch.rand(n, generator=gen, dtype=torch.float64) * 3 - 1  # negative costs too
    lower = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5
    upper = lower + torch.rand(n, generator=gen, dtype=torch.float64) * 0.5
    total = float(lower.sum() + torch.rand(1, generator=gen, dtype=torch.float64) * (upper - lower).sum())
    x = solve_box_lp(cost, total, lower, upper)
    res = optimize.linprog(cost.numpy(), A_eq=torch.ones(1, n, dtype=torch.float64).numpy(), b_eq=[total],
                           bounds=list(zip(lower.tolist(), upper.tolist())), method="highs")
    assert res.status == 0
    assert float(cost @ x) == pytest.approx(res.fun, abs=1e-9)
    assert torch.allclose(x, torch.as_tensor(res.x), atol=1e-7)  # distinct costs: unique optimum
    assert float(x.sum()) == pytest.approx(total, abs=1e-9)
    assert bool((x >= lower - 1e-12).all() and (x <= upper + 1e-12).all())


@pytest.mark.parametrize("target,delta", [(0.5, 0.01), (0.6, 0.02), (0.7, 0.03), (0.8, 0.05), (0.3, 0.01)])
def test_layerwise_sparsity_meets_the_mean_and_the_band_and_matches_linprog(target, delta):
    optimize = pytest.importorskip("scipy.optimize")
    gen = torch.Generator().manual_seed(int(target * 100))
    imp = block_importance(torch.rand(30, 30, generator=gen, dtype=torch.float64), beta=1.0)
    x = layerwise_sparsity(imp, target)
    assert sparsity_delta(target) == delta
    assert float(x.mean()) == pytest.approx(target, abs=1e-12)
    assert float((x - target).abs().max()) <= delta + 1e-12
    order = torch.argsort(imp)  # least important blocks are pruned most
    assert float(x[order[0]]) == pytest.approx(target + delta) and float(x[order[-1]]) == pytest.approx(target - delta)
    res = optimize.linprog(imp.numpy(), A_eq=[[1.0] * 30], b_eq=[30 * target],
                           bounds=[(target - delta, target + delta)] * 30, method="highs")
    assert float(imp @ x) == pytest.approx(res.fun, abs=1e-9)


def test_layerwise_sparsity_respects_masks_that_only_grow():
    imp = torch.tensor([1.0, 0.5, 0.9, 0.2])
    current = torch.tensor([0.52, 0.40, 0.40, 0.40])
    x = layerwise_sparsity(imp, 0.45, delta=0.05, current=current)
    assert bool((x >= current).all())
    assert float(x.mean()) == pytest.approx(0.45)


def test_lp_bad_input():
    with pytest.raises(ValueError, match="target"):
        layerwise_sparsity(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="target"):
        layerwise_sparsity(torch.ones(3), -0.1)
    with pytest.raises(ValueError, match="delta: .*infeasible"):
        layerwise_sparsity(torch.ones(3), 0.5, delta=-0.01)
    with pytest.raises(ValueError, match="delta: .*infeasible"):  # masks only grow: mean can't be met
        layerwise_sparsity(torch.ones(3), 0.5, delta=0.01, current=torch.tensor([0.9, 0.9, 0.9]))
    with pytest.raises(ValueError, match="total: .*infeasible"):
        solve_box_lp(torch.ones(2), 5.0, torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="lower/upper"):
        solve_box_lp(torch.ones(2), 0.5, torch.ones(2), torch.zeros(2))


# ----------------------------------------------------------------------------- ranks

@pytest.mark.parametrize("seed", range(20))
def test_ranks_sum_exactly_to_the_budget_within_bounds(seed):
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=gen))
    mean_rank = int(torch.randint(1, 16, (1,), generator=gen))
    r_max = mean_rank + int(torch.randint(0, 20, (1,), generator=gen))
    errors = torch.rand(n, generator=gen) ** 4  # skewed: clipping at 1 and r_max both happen
    ranks = allocate_ranks(errors, mean_rank, r_max)
    assert sum(ranks) == mean_rank * n
    assert all(1 <= r <= r_max for r in ranks)
    # Monotone in the error: a block with more error never gets a smaller rank.
    for i in range(n):
        for j in range(n):
            if errors[i] > errors[j]:
                assert ranks[i] >= ranks[j]


def test_ranks_follow_the_proportional_rule_and_honour_r_max():
    assert allocate_ranks([1.0, 1.0, 2.0], 4, 32) == [3, 3, 6]
    assert allocate_ranks([0.0, 0.0], 5, 8) == [5, 5]
    # r_max is real: the share 0.9·24 = 21.6 is capped at 10 and the rest spread over the others.
    ranks = allocate_ranks([9.0, 0.5, 0.5], 8, 10)
    assert ranks[0] == 10 and sum(ranks) == 24 and ranks[1] == ranks[2] == 7
    # r_max above LoSA's LoRA rank is allowed (their code caps silently at the LoRA rank).
    assert allocate_ranks([10.0, 1.0], 8, 64)[0] == 15


def test_ranks_bad_input():
    with pytest.raises(ValueError, match="mean_rank: .*cannot be met"):
        allocate_ranks([1.0, 2.0], 9, 8)
    with pytest.raises(ValueError, match="mean_rank: .*cannot be met"):
        allocate_ranks([1.0, 2.0], 0, 8)
    with pytest.raises(ValueError, match="errors"):
        allocate_ranks([1.0, float("nan")], 4, 8)
    with pytest.raises(ValueError, match="errors"):
        allocate_ranks([-1.0, 2.0], 4, 8)
    with pytest.raises(ValueError, match="r_max"):
        allocate_ranks([1.0], 1, 0)


def test_reconstruction_error_is_normalized_per_output_feature():
    dense = torch.tensor([[1.0, 100.0], [1.0, 100.0]])
    sparse = torch.tensor([[0.5, 50.0], [0.5, 50.0]])
    assert reconstruction_error(dense, sparse) == pytest.approx(0.25)  # both features off by half
    acc = ErrorAccumulator()
    acc.add(dense[:1], sparse[:1])
    acc.add(dense[1:], dense[1:])
    assert acc.value() == pytest.approx(0.125)
    assert reconstruction_error(dense, dense) == 0.0


# ----------------------------------------------------------------------------- schedule

def test_cubic_schedule():
    s = sparsity_schedule(0.7, 5)
    assert s == pytest.approx([0.7 - 0.7 * (1 - t / 5) ** 3 for t in range(1, 6)])
    assert s[-1] == 0.7 and all(a < b for a, b in zip(s, s[1:]))
    assert s[0] == pytest.approx(0.7 * (1 - 0.8 ** 3))
    assert cubic_sparsity(0, 5, 0.5) == 0.0
    assert sparsity_schedule(0.5, 1) == [0.5]
    assert split_steps(11, 3) == [4, 4, 3]
    with pytest.raises(ValueError, match="rounds"):
        sparsity_schedule(0.5, 0)
    with pytest.raises(ValueError, match="target"):
        sparsity_schedule(1.0, 5)
    with pytest.raises(ValueError, match="total_steps"):
        split_steps(2, 3)
    assert math.isclose(sum(split_steps(100, 7)), 100)


def test_final_share_split():
    # The last round gets round(f·total), the rest is split evenly (earlier rounds take the remainder).
    assert split_steps(30, 5, 0.6) == [3, 3, 3, 3, 18]
    assert split_steps(31, 5, 0.6) == [3, 3, 3, 3, 19]  # 0.6·31 = 18.6 -> 19
    assert split_steps(30, 3, 0.5) == [8, 7, 15]
    assert split_steps(5, 5, 0.2) == [1, 1, 1, 1, 1]
    assert split_steps(7, 1, 0.3) == [7]  # one round: it gets everything
    assert split_steps(30, 5, None) == split_steps(30, 5) == [6] * 5
    for total, rounds, share in [(100, 7, 0.55), (13, 4, 0.1), (9, 2, 0.9)]:
        steps = split_steps(total, rounds, share)
        assert sum(steps) == total and min(steps) >= 1 and steps[-1] == max(1, round(share * total))
    with pytest.raises(ValueError, match="final_share.*every round needs"):
        split_steps(5, 5, 0.5)  # 3 for the last round leaves 2 for 4 rounds
    with pytest.raises(ValueError, match="final_share.*every round needs"):
        split_steps(10, 2, 0.01)  # the last round would get 0
    for bad in (0.0, 1.0, -0.2, True, "0.5"):
        with pytest.raises(ValueError, match="final_share"):
            split_steps(30, 5, bad)

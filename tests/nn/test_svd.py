"""SVD residual adapter: the Eckart–Young MSE reduction on random and real weights, the B = U√S,
A = √S·Vᵀ split, randomized SVD accuracy, the activation-aware variant, rank checks."""

from __future__ import annotations

import pytest
import torch
from salr_helpers import missing_model_assets

from salr.prune.criteria import prune_weight
from salr.nn.svd import eckart_young_bound, randomized_svd, residual_adapter, svd_factors

pytestmark = pytest.mark.usefixtures("one_thread")


def _mse(t: torch.Tensor) -> float:
    return t.double().square().mean().item()


def _check_eckart_young(weight: torch.Tensor, pruned: torch.Tensor, rank: int, **kwargs) -> float:
    """Asserts MSE(R − BA) ≤ (1 − r/min(d, k))·MSE(R); returns the achieved ratio."""
    residual = weight.float() - pruned.float()
    a, b = residual_adapter(weight, pruned, rank, **kwargs)
    assert a.shape == (rank, weight.shape[1]) and b.shape == (weight.shape[0], rank)
    ratio = _mse(residual - b @ a) / _mse(residual)
    assert ratio <= eckart_young_bound(rank, *weight.shape) + 1e-6, (ratio, eckart_young_bound(rank, *weight.shape))
    return ratio


@pytest.mark.parametrize("shape", [(64, 64), (96, 40), (40, 130)])
@pytest.mark.parametrize("rank", [1, 4, 16, 40])
@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_eckart_young_on_random_weights(shape, rank, criterion):
    gen = torch.Generator().manual_seed(rank)
    weight = torch.randn(*shape, generator=gen)
    pruned, _ = prune_weight(weight, criterion, 0.5, input_norms=torch.rand(shape[1], generator=gen) + 0.1)
    _check_eckart_young(weight, pruned, rank)
    _check_eckart_young(weight, pruned, rank, method="randomized")


def test_full_rank_recovers_the_weight():
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    pruned, _ = prune_weight(weight, "magnitude", 0.7)
    a, b = residual_adapter(weight, pruned, 16)
    assert torch.allclose(pruned + b @ a, weight, atol=1e-5)


def test_balanced_split_is_the_truncated_svd():
    residual = torch.randn(50, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    a, b = svd_factors(residual, 7)
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    best = (u[:, :7] * s[:7]) @ vh[:7]
    assert torch.allclose((b @ a).double(), best, atol=1e-4)
    # B = U·√S and A = √S·Vᵀ: column norms of B equal row norms of A equal √σ.
    assert torch.allclose(b.norm(dim=0).double(), s[:7].sqrt(), rtol=1e-4)
    assert torch.allclose(a.norm(dim=1).double(), s[:7].sqrt(), rtol=1e-4)


def test_randomized_matches_exact_on_decaying_spectrum():
    gen = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(300, 200, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen))
    matrix = (u * (0.9 ** torch.arange(200.0))) @ v.T
    for rank in (8, 32):
        a, b = svd_factors(matrix, rank)
        ra, rb = svd_factors(matrix, rank, method="randomized")
        exact, approx = (matrix - b @ a).norm().item(), (matrix - rb @ ra).norm().item()
        assert approx <= 1.01 * exact, (rank, exact, approx)


def test_randomized_is_seeded():
    m = torch.randn(80, 60, generator=torch.Generator().manual_seed(3))
    u1, s1, v1 = randomized_svd(m, 5, generator=torch.Generator().manual_seed(7))
    u2, s2, v2 = randomized_svd(m, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2) and torch.equal(u1, u2) and torch.equal(v1, v2)


def test_activation_aware_lowers_the_output_error():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(64, 96, generator=gen)
    scale = torch.rand(96, generator=gen) ** 4 * 10 + 0.01  # a few loud input features
    pruned, _ = prune_weight(weight, "wanda", 0.5, input_norms=scale)
    residual = weight - pruned
    plain_a, plain_b = svd_factors(residual, 8)
    aware_a, aware_b = svd_factors(residual, 8, input_scale=scale)
    plain = ((residual - plain_b @ plain_a) * scale).norm().item()
    aware = ((residual - aware_b @ aware_a) * scale).norm().item()
    assert aware < 0.9 * plain, (aware, plain)
    # Eckart–Young holds in the weighted norm it optimises.
    assert _mse((residual - aware_b @ aware_a) * scale) <= eckart_young_bound(8, 64, 96) * _mse(residual * scale) + 1e-6
    # Dead inputs (scale 0) do not produce inf/NaN.
    scale[:10] = 0
    dead_a, dead_b = svd_factors(residual, 8, input_scale=scale)
    assert torch.isfinite(dead_a).all() and torch.isfinite(dead_b).all()


@pytest.mark.parametrize("rank", [0, -1, 41, 2.0, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        svd_factors(torch.randn(40, 60), rank)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method: expected one of exact, randomized"):
        svd_factors(torch.randn(8, 8), 2, method="lanczos")
    with pytest.raises(ValueError, match=r"input_scale: expected shape \(8,\)"):
        svd_factors(torch.randn(8, 8), 2, input_scale=torch.ones(7))
    with pytest.raises(ValueError, match="pruned: shape"):
        residual_adapter(torch.randn(8, 8), torch.randn(8, 4), 2)


def test_eckart_young_on_real_weights():
    """The SALR bound on SmolLM2-135M projections (every kind, one block), magnitude and Wanda-like
    masks, exact and randomized SVD."""
    reason = missing_model_assets()
    if reason:
        pytest.skip(reason)
    from safetensors import safe_open

    from salr.cli.assets import smollm2_dir

    path = smollm2_dir() / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        names = [k for k in f.keys() if ".layers.7." in k and k.endswith("proj.weight")]
        assert len(names) == 7, names
        for name in names:
            weight = f.get_tensor(name)
            norms = torch.rand(weight.shape[1], generator=torch.Generator().manual_seed(0)) + 0.5
            pruned, _ = prune_weight(weight, "wanda", 0.5, input_norms=norms)
            for rank in (16, 64):
                exact = _check_eckart_young(weight, pruned, rank)
                approx = _check_eckart_young(weight, pruned, rank, method="randomized")
                assert approx <= 1.03 * exact, (name, rank, exact, approx)

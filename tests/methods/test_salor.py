"""SALOR: sparse LoRA factors — masks, schedule, exact zeros through training, sparse inference."""

import pytest
import torch

from salr.methods.salor.config import FactorSparsityConfig
from salr.methods.salor.factors import magnitude_mask, nm_mask, SALORAdapter, update_all_masks


def trained_adapter(config, k=64, n=48, r=16, seed=0):
    torch.manual_seed(seed)
    adapter = SALORAdapter(k, n, r, alpha=32, config=config)
    with torch.no_grad():
        adapter.lora_b.normal_()  # as if B had trained: masks on B are meaningful
    return adapter


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75])
def test_unstructured_masks_hit_the_ratio_exactly_and_keep_the_largest(sparsity):
    adapter = trained_adapter(FactorSparsityConfig(sparsity))
    adapter.update_masks(0)
    for factor, mask in ((adapter.lora_a, adapter.mask_a), (adapter.lora_b, adapter.mask_b)):
        assert (~mask).sum().item() == round(sparsity * mask.numel())
        if 0 < sparsity:
            assert factor[mask].abs().min() >= factor[~mask].abs().max() or factor[~mask].abs().max() == 0


def test_nm_pattern_keeps_exactly_n_of_every_m_along_the_last_dim():
    adapter = trained_adapter(FactorSparsityConfig(0.5, pattern="2:4"))
    adapter.update_masks(0)
    for mask in (adapter.mask_a, adapter.mask_b):
        assert torch.all(mask.reshape(-1, 4).sum(1) == 2)
    w = torch.tensor([[4.0, -1.0, 0.5, 3.0, 1.0, 2.0, -5.0, 0.1]])
    assert nm_mask(w, 2, 4).tolist() == [[True, False, False, True, False, True, True, False]]


def test_cubic_schedule_and_gradual_nm():
    cfg = FactorSparsityConfig(0.75, pattern="1:4", start_step=10, end_step=20)
    assert cfg.ratio_at(0) == 0 and cfg.ratio_at(10) == 0 and cfg.ratio_at(20) == 0.75 and cfg.ratio_at(99) == 0.75
    assert cfg.ratio_at(15) == pytest.approx(0.75 * (1 - 0.5 ** 3))
    adapter = trained_adapter(cfg)
    kept = []
    for step in range(0, 25):
        adapter.update_masks(step)
        kept.append(adapter.mask_a.reshape(-1, 4).sum(1).max().item())
    assert kept[0] == 4 and kept[-1] == 1 and kept == sorted(kept, reverse=True)  # masks only shrink
    assert torch.all(adapter.mask_a.reshape(-1, 4).sum(1) == 1)


def test_masked_entries_stay_exactly_zero_through_adamw_steps():
    adapter = trained_adapter(FactorSparsityConfig(0.5, start_step=0, end_step=4))
    opt = torch.optim.AdamW(adapter.parameters(), lr=1e-2, weight_decay=0.1)
    x = torch.randn(8, 64)
    for step in range(8):  # masks shrink on steps 0..4 while AdamW momentum is live
        update_all_masks(adapter, step)
        adapter.train()
        loss = adapter(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert torch.all(adapter.lora_a.grad[~adapter.mask_a] == 0)
        assert torch.all(adapter.lora_b.grad[~adapter.mask_b] == 0)
        opt.step()
    adapter.train()
    adapter(x)  # the forward re-zeroes what momentum moved
    assert torch.all(adapter.lora_a[~adapter.mask_a] == 0) and torch.all(adapter.lora_b[~adapter.mask_b] == 0)
    sa, sb = adapter.factor_sparsity()
    assert sa == pytest.approx(0.5, abs=1e-3) and sb == pytest.approx(0.5, abs=1e-3)


def test_forward_backward_equal_the_dense_masked_reference():
    adapter = trained_adapter(FactorSparsityConfig(0.5)).double()
    adapter.update_masks(0)
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    out = adapter(x)
    a_ref = (adapter.lora_a * adapter.mask_a).detach().requires_grad_()
    b_ref = (adapter.lora_b * adapter.mask_b).detach().requires_grad_()
    x_ref = x.detach().requires_grad_()
    ref = adapter.scale * (x_ref @ a_ref.T) @ b_ref.T
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(adapter.lora_a.grad, a_ref.grad * adapter.mask_a)
    torch.testing.assert_close(adapter.lora_b.grad, b_ref.grad * adapter.mask_b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_factors_apply_through_the_bm8x8_kernels(dtype):
    adapter = trained_adapter(FactorSparsityConfig(0.75)).to(dtype)
    adapter.update_masks(0)
    adapter.eval()
    sparse = adapter.to_sparse()
    assert sparse.a.density == pytest.approx(0.25, abs=1e-3)
    x = torch.randn(3, 64).to(dtype)
    a, b = adapter.masked_factors()
    ref = (x.double() @ a.double().T).to(dtype).double() @ b.double().T  # T rounded like the kernel
    torch.testing.assert_close(sparse(x).double(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    dense_bytes = (a.numel() + b.numel()) * a.element_size()
    assert sparse.nbytes < 0.5 * dense_bytes


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.0}, r"factor_sparsity: must be in \[0, 1\).*got 1.0"),
    ({"sparsity": -0.1}, r"factor_sparsity: must be in \[0, 1\)"),
    ({"sparsity": float("nan")}, "factor_sparsity: expected a number"),
    ({}, "factor_sparsity: required without an N:M factor_pattern"),
    ({"sparsity": 0.5, "pattern": "4:2"}, "factor_pattern: '4:2' needs 0 < N < M"),
    ({"sparsity": 0.5, "pattern": "2-4"}, "factor_pattern: expected 'N:M'"),
    ({"sparsity": 0.3, "pattern": "2:4"}, r"factor_sparsity: factor_pattern '2:4'.*sparsity 0.5.*contradicts"),
    ({"sparsity": 0.5, "start_step": 5, "end_step": 2}, "factor_start_step, factor_end_step"),
    ({"sparsity": 0.5, "update_every": 0}, "factor_update_every: expected an integer >= 1"),
    ({"sparsity": 0.5, "end_step": 2.5}, "factor_end_step: expected an integer"),
])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FactorSparsityConfig(**kwargs)


def test_pattern_incompatible_with_rank_or_k_is_refused():
    with pytest.raises(ValueError, match="factor_pattern: 2:4 needs the LoRA rank .* multiple of 4.* has 6"):
        SALORAdapter(64, 48, 6, 12, FactorSparsityConfig(0.5, pattern="2:4"))
    with pytest.raises(ValueError, match="factor_pattern: 2:8 needs in_features .* multiple of 8.* has 60"):
        SALORAdapter(60, 48, 16, 32, FactorSparsityConfig(0.75, pattern="2:8"))
    with pytest.raises(ValueError, match="rank: must be in"):
        SALORAdapter(8, 8, 9, 9, FactorSparsityConfig(0.5))
    assert magnitude_mask(torch.ones(3, 3), 0.0).all()


def test_pattern_alone_gives_the_sparsity_and_rounding_is_half_up():
    assert FactorSparsityConfig(pattern="1:4").sparsity == 0.75
    # 0.5 of 5 entries: round-half-up prunes 3 (as salr.pruning counts), not banker's 2.
    assert (~magnitude_mask(torch.arange(1.0, 6.0), 0.5)).sum() == 3


def test_one_shot_config_masks_a_at_once_and_b_once_it_has_trained():
    torch.manual_seed(0)
    adapter = SALORAdapter(32, 24, 8, 16, FactorSparsityConfig(0.5))  # start = end = 0: one-shot
    assert adapter.update_masks(0)
    assert adapter.factor_sparsity() == (0.5, 0.0)  # B is all zero: no magnitudes to rank yet
    with torch.no_grad():
        adapter.lora_b.normal_()
    assert adapter.update_masks(7) and adapter.factor_sparsity() == (0.5, 0.5)
    assert not adapter.update_masks(8)  # frozen at the target


def test_masks_are_rebuilt_exactly_from_the_zeros_after_a_resume():
    cfg = FactorSparsityConfig(0.75, pattern="1:4", start_step=0, end_step=6, update_every=2)
    adapter = trained_adapter(cfg)
    for step in range(4):
        adapter.update_masks(step)
    fresh = SALORAdapter(64, 48, 16, 32, cfg)
    fresh.load_state_dict({"lora_a": adapter.lora_a, "lora_b": adapter.lora_b,
                           "mask_a": fresh.mask_a, "mask_b": fresh.mask_b})  # masks are not checkpointed
    fresh.update_masks(3)  # the resume's first call: step 3 belongs to the update of step 2
    assert torch.equal(fresh.mask_a, adapter.mask_a) and torch.equal(fresh.mask_b, adapter.mask_b)
    assert cfg.last_update(3) == 2 and cfg.last_update(7) == 7 and cfg.ratio_at(cfg.last_update(3)) < 0.75

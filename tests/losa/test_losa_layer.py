"""LoSA's masked LoRA layer: SDDMM forward/backward vs the dense masked reference, merge, rank resize."""

from __future__ import annotations

import pytest
import torch

import salr
from salr import reference
from salr.losa.layer import LoSALinear, masked_lora_linear

pytestmark = pytest.mark.usefixtures("one_thread")


def _sparse(n, k, density, gen, dtype=torch.float64):
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    w[torch.rand(n, k, generator=gen) >= density] = 0
    return w.to(dtype)


def _dense_masked(x, w, a, b, scale, bias):
    mask = (w != 0).to(w.dtype)
    y = x @ (w + scale * mask * (b @ a)).T
    return y + bias if bias is not None else y


@pytest.mark.parametrize("n,k,r,density", [(13, 21, 3, 0.5), (8, 64, 1, 0.3), (16, 11, 5, 0.9)])
def test_sddmm_path_equals_dense_masked_reference_float64_gradcheck(n, k, r, density):
    gen = torch.Generator().manual_seed(n * 100 + k)
    w = _sparse(n, k, density, gen)
    bitmap, values, offsets = reference.bitmap_encode(w)
    x = torch.randn(2, 3, k, generator=gen, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, k, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, r, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(n, generator=gen, dtype=torch.float64, requires_grad=True)
    vals = values.clone().requires_grad_(True)

    def sddmm(x, vals, a, b, bias):
        return masked_lora_linear(x, bitmap, vals, offsets, n, k, a, b, 0.7, bias, impl=reference)

    assert torch.autograd.gradcheck(sddmm, (x, vals, a, b, bias))
    # Forward and every gradient equal the dense masked reference x·(W_s + s·M⊙(BA))ᵀ + bias.
    y = sddmm(x, vals, a, b, bias)
    dense_w = reference.bitmap_decode(bitmap, vals, offsets, n, k)  # differentiable in vals
    y_ref = _dense_masked(x, dense_w, a, b, 0.7, bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, vals, a, b, bias), g)
    want = torch.autograd.grad(y_ref, (x, vals, a, b, bias), g)
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg, ww, rtol=1e-11, atol=1e-11)


@pytest.mark.skipif(not salr.native_available(), reason="native kernels not built")
def test_native_kernels_match_reference_fp32_forward_backward():
    gen = torch.Generator().manual_seed(7)
    n, k, r = 72, 136, 4
    w = _sparse(n, k, 0.4, gen, torch.float32)
    layer = LoSALinear(w, torch.randn(n, generator=gen), rank=r, scale=0.5)
    with torch.no_grad():
        layer.lora_b.normal_(generator=gen)
    x = torch.randn(5, k, generator=gen, requires_grad=True)
    y = layer(x)
    a, b = layer.lora_a, layer.lora_b
    y_ref = _dense_masked(x.double(), w.double(), a.double(), b.double(), 0.5, layer.bias.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    g = torch.randn(y.shape, generator=gen)
    got = torch.autograd.grad(y, (x, a, b), g)
    want = torch.autograd.grad(y_ref, (x, a, b), g.double())
    for gg, ww in zip(got, want):
        torch.testing.assert_close(gg.double(), ww.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", range(3))
def test_masked_update_is_zero_off_the_mask_for_any_a_b(seed):
    gen = torch.Generator().manual_seed(seed)
    n, k = 24, 40
    w = _sparse(n, k, 0.5, gen, torch.float32)
    layer = LoSALinear(w, rank=6, scale=3.0)
    with torch.no_grad():  # large, arbitrary factors: BA is dense everywhere
        layer.lora_a.copy_(torch.randn(6, k, generator=gen) * 10)
        layer.lora_b.copy_(torch.randn(n, 6, generator=gen) * 10)
    assert bool(((layer.lora_b @ layer.lora_a) != 0).all())
    with torch.no_grad():  # probe the applied weight with the identity: y(I) = W_effᵀ
        applied = layer(torch.eye(k)).T
    off = w == 0
    assert int(off.sum()) > 0
    assert torch.equal(applied[off], torch.zeros(int(off.sum())))
    torch.testing.assert_close(applied, layer.effective_weight(), rtol=1e-5, atol=1e-4)
    # The unmasked baseline does put weight off the mask.
    plain = LoSALinear(w, rank=6, scale=3.0, masked=False)
    with torch.no_grad():
        plain.lora_a.copy_(layer.lora_a)
        plain.lora_b.copy_(layer.lora_b)
        assert bool((plain(torch.eye(k)).T[off] != 0).all())


def test_merge_keeps_the_bitmap_bit_for_bit_and_the_output():
    gen = torch.Generator().manual_seed(3)
    n, k = 40, 72
    w = _sparse(n, k, 0.3, gen, torch.float32)
    layer = LoSALinear(w, torch.randn(n, generator=gen), rank=4, scale=2.0)
    with torch.no_grad():
        layer.lora_b.normal_(generator=gen)
    x = torch.randn(9, k, generator=gen)
    with torch.no_grad():
        before = layer(x)
    bitmap, offsets = layer.bitmap.clone(), layer.offsets.clone()
    layer.merge()
    assert layer.rank == 0
    assert torch.equal(layer.bitmap, bitmap) and torch.equal(layer.offsets, offsets)
    assert bool((layer.values != 0).all())  # the bitmap still means "nonzero"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    # After the merge the layer is a plain BM8x8 sparse linear.
    assert [p for p in layer.parameters() if p.requires_grad and p.numel()] == []


def test_merge_cancelling_to_zero_keeps_the_slot():
    w = torch.zeros(8, 8)
    w[0, 0] = 1.0
    layer = LoSALinear(w, rank=1, scale=1.0)
    with torch.no_grad():
        layer.lora_a.zero_()
        layer.lora_a[0, 0] = 1.0
        layer.lora_b.zero_()
        layer.lora_b[0, 0] = -1.0  # s·(BA)[0, 0] = -1 cancels the weight exactly
    bitmap = layer.bitmap.clone()
    layer.merge()
    assert torch.equal(layer.bitmap, bitmap)
    assert layer.values.numel() == 1 and float(layer.values[0]) != 0.0
    assert abs(float(layer.values[0])) <= torch.finfo(torch.float32).tiny


def test_rank_grow_and_shrink_keep_the_function_and_top_directions():
    gen = torch.Generator().manual_seed(11)
    n, k = 32, 48
    w = _sparse(n, k, 0.5, gen, torch.float32)
    layer = LoSALinear(w, rank=4, scale=1.5, generator=gen)
    with torch.no_grad():  # a trained-looking adapter: one dominant direction
        layer.lora_b.copy_(torch.randn(n, 4, generator=gen) * torch.tensor([5.0, 0.3, 0.2, 0.1]))
    x = torch.randn(6, k, generator=gen)
    with torch.no_grad():
        y0 = layer(x)
        ba0 = layer.lora_b @ layer.lora_a
    layer.resize_rank(7, generator=gen)
    assert layer.rank == 7 and layer.lora_a.shape == (7, k) and layer.lora_b.shape == (n, 7)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.lora_b @ layer.lora_a, ba0, rtol=1e-6, atol=1e-6)
    layer.resize_rank(1)
    assert layer.rank == 1
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y0, rtol=1e-4, atol=1e-4)  # the rest went into the base
        kept = layer.lora_b @ layer.lora_a
        u, s, vh = torch.linalg.svd(ba0.double())
        top = (u[:, :1] * s[:1]) @ vh[:1]
        torch.testing.assert_close(kept.double(), top, rtol=1e-4, atol=1e-4)  # the dominant direction
        assert abs(float(layer.lora_a.norm()) - 1.0) < 1e-5  # orthonormal A rows: still trainable
    # Shrinking an untrained adapter (B = 0) keeps A rows that can learn (not all-zero).
    fresh = LoSALinear(w, rank=4, scale=1.0, generator=gen)
    fresh.resize_rank(2)
    assert torch.allclose(fresh.lora_a @ fresh.lora_a.T, torch.eye(2), atol=1e-5)


def test_apply_mask_only_grows_and_keeps_the_merged_weight_at_kept_positions():
    gen = torch.Generator().manual_seed(5)
    n, k = 16, 24
    w = _sparse(n, k, 0.8, gen, torch.float32)
    layer = LoSALinear(w, rank=2, scale=1.0)
    with torch.no_grad():
        layer.lora_b.normal_(generator=gen)
    eff = layer.effective_weight()
    keep = (w != 0) & (torch.rand(n, k, generator=gen) < 0.6)
    layer.apply_mask(keep)
    assert torch.equal(layer.mask(), keep)
    torch.testing.assert_close(layer.effective_weight(), eff * keep, rtol=1e-6, atol=1e-6)
    reference.check_weight("test", layer.bitmap, layer.values, layer.offsets, n, k)
    grow_back = keep.clone()
    grow_back[w == 0] = True
    with pytest.raises(ValueError, match="keep: .*masks only grow"):
        layer.apply_mask(grow_back)


def test_training_moves_only_the_adapter_and_never_fills_the_mask():
    gen = torch.Generator().manual_seed(2)
    n, k = 16, 32
    w = _sparse(n, k, 0.5, gen, torch.float32)
    layer = LoSALinear(w, rank=3, scale=1.0)
    target = torch.randn(n, k, generator=gen)
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(64, k, generator=gen)
    losses = []
    for _ in range(30):
        loss = ((layer(x) - x @ target.T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]
    eff = layer.effective_weight()
    assert torch.equal(eff[w == 0], torch.zeros(int((w == 0).sum())))


def test_bad_arguments_raise_value_errors_naming_them():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="rank"):
        LoSALinear(w, rank=-1)
    with pytest.raises(ValueError, match="weight"):
        LoSALinear(torch.randn(8))
    with pytest.raises(ValueError, match="bias"):
        LoSALinear(w, torch.randn(3))
    layer = LoSALinear(w, rank=2)
    with pytest.raises(ValueError, match="keep"):
        layer.apply_mask(torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="x"):
        masked_lora_linear(torch.randn(2, 5), layer.bitmap, layer.values, layer.offsets, 8, 8,
                           layer.lora_a, layer.lora_b, 1.0)
    with pytest.raises(ValueError, match="lora_a/lora_b"):
        masked_lora_linear(torch.randn(2, 8), layer.bitmap, layer.values, layer.offsets, 8, 8,
                           layer.lora_a, layer.lora_b.T, 1.0)

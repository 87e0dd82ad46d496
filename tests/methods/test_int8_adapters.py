"""int8 inference adapters on SALR layers (issue 21): quantize_adapters after the merge, the layer's
forward against its own dequantized dense weight, save / load bit-exact with the format recording it,
module.to(dtype) keeping the fp32 scales, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

import salr
from salr.methods.salr.layer import SALRLinear
from salr.methods.salr.model import salr_layers
from salr_helpers import tiny_model, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def merged_model(quantize=None, **salor):
    model = tiny_model("llama")
    method = salr.SALORConfig if salor else salr.SALRConfig
    salr.sparsify_(model, method(sparsity=0.5, criterion="magnitude", svd_rank=4, lora_rank=2, quantize=quantize,
                                 **salor), progress=False)
    with torch.no_grad():
        for layer in salr_layers(model).values():
            layer.lora_b.normal_(std=0.02)  # a trained-looking LoRA: the merge has something to fold
    salr.merge_(model)
    return model


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_forward_matches_the_dequantized_weight_and_moves_little(quantize):
    model = merged_model(quantize)
    ids = token_ids(2, 16)
    before = model(input_ids=ids).logits
    dense_before = {n: m.to_dense() for n, m in salr_layers(model).items()}
    assert salr.quantize_adapters_(model) == len(dense_before)
    for name, layer in salr_layers(model).items():
        assert layer.adapter_quantize == "int8" and layer.svd_a.dtype == torch.int8
        assert not layer.svd_a.requires_grad and not layer.svd_b.requires_grad
        x = torch.randn(3, layer.in_features)
        assert torch.allclose(layer(x), x @ layer.to_dense().T, atol=1e-4)  # the op reads what to_dense says
        error = (layer.to_dense() - dense_before[name]).abs().max()
        assert 0 < error <= 0.02 * dense_before[name].abs().max()
    after = model(input_ids=ids).logits
    layer = next(iter(salr_layers(model).values()))
    svd_a, svd_b = layer.svd_factors()  # what reconstruction_errors and to_dense read: dequantized
    assert svd_a.dtype == torch.float32 and torch.equal(svd_b, layer.svd_b.float() * layer.adapter_scales[:, None])
    assert 0 < (after - before).abs().max() < 0.05 * before.abs().max()
    assert salr.quantize_adapters_(model) == 0  # already int8: nothing to do


def test_bytes_save_load_and_cast(tmp_path):
    model = merged_model()
    layer = next(iter(salr_layers(model).values()))
    float_bytes = layer.compressed_bytes()
    salr.quantize_adapters_(model)
    n, k, r = layer.out_features, layer.in_features, layer.svd_rank
    assert float_bytes - layer.compressed_bytes() == 3 * r * (n + k) - 4 * n  # fp32 -> int8 factors + [N] scales
    ids = token_ids(2, 16)
    logits = model(input_ids=ids).logits
    salr.save(model, tmp_path / "m")
    record = json.loads((tmp_path / "m" / "config.json").read_text())["salr"]
    assert record["adapter_quantize"] == "int8"
    loaded = salr.load(tmp_path / "m")
    assert torch.equal(loaded(input_ids=ids).logits, logits)
    for name, m in salr_layers(loaded).items():
        assert torch.equal(m.adapter_scales, salr_layers(model)[name].adapter_scales)
    half = loaded.to(torch.bfloat16)
    m = next(iter(salr_layers(half).values()))
    assert m.adapter_scales.dtype == torch.float32 and m.svd_a.dtype == torch.int8
    assert m.compute_dtype == torch.bfloat16
    assert torch.allclose(half(input_ids=ids).logits.float(), logits, atol=0.05 * logits.abs().max().item())


def test_salor_layers_quantize_their_dense_adapter():
    model = merged_model(factor_sparsity=0.5)
    ids = token_ids(2, 16)
    before = model(input_ids=ids).logits
    salr.quantize_adapters_(model)
    assert all(m.svd_a.dtype == torch.int8 for m in salr_layers(model).values())
    assert torch.allclose(model(input_ids=ids).logits, before, atol=0.05 * before.abs().max().item())


def test_refusals():
    layer = SALRLinear.from_linear(torch.nn.Linear(16, 8), sparsity=0.5, svd_rank=2, lora_rank=2)
    with pytest.raises(ValueError, match="quantize_adapters: merge the LoRA first"):
        layer.quantize_adapters()
    bare = SALRLinear.from_linear(torch.nn.Linear(16, 8), sparsity=0.5)
    assert bare.quantize_adapters().adapter_scales is None  # no adapter: nothing to store

"""int8 bases (issue 21) in the layers and on a whole model: SALR and SALOR layers train their LoRA on
a frozen sparse int8 base, merge without touching it, cast to bf16 without touching the scales, save
and reload with identical logits; the SVD adapter is fitted against the dequantized base; configs
and files refuse bad settings naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import salr
from salr.interop.compressed_tensors import export_compressed_tensors
from salr.io.saved_model import read_record
from salr.methods.salr.model import prune_model, quantize_bases, salr_layers
from salr.ops import reference
from salr.ops.format import BitmapSparseWeight
from salr.prune.quantize import dequantize, quantize_int8
from salr_helpers import tiny_model, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(n=24, k=80, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=True)


@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("criterion", ["magnitude", "sparsegpt"])
def test_from_linear_int8_base_matches_its_dequantized_weight(group_size, criterion):
    lin = _linear()
    x = torch.randn(40, 80, generator=torch.Generator().manual_seed(3))
    hessian = 2.0 / 40 * x.T @ x
    layer = salr.SALRLinear.from_linear(lin, sparsity=0.5, criterion=criterion, svd_rank=4, lora_rank=2,
                                        quantize="int8", quantize_group_size=group_size,
                                        hessian=hessian if criterion == "sparsegpt" else None)
    assert layer.values.dtype == torch.int8 and layer.scales.dtype == torch.float32
    assert layer.quantize == "int8" and layer.quantize_group_size == group_size
    assert layer.compute_dtype == torch.float32 and layer.svd_a.dtype == torch.float32
    base = layer.base_dense()
    assert abs(layer.sparsity - 0.5) < 0.02
    # the SVD residual is fitted against the dequantized base: W ≈ base + B·A better than base alone
    w = lin.weight.detach()
    assert (w - base - layer.svd_b @ layer.svd_a).norm() < (w - base).norm()
    dense = base.double() + layer.svd_b.double() @ layer.svd_a.double() + layer.scale * (
        layer.lora_b.double() @ layer.lora_a.double())
    with torch.no_grad():
        y = layer(x)
    expected = x.double() @ dense.T + lin.bias.double()
    assert torch.allclose(y.double(), expected, rtol=1e-4, atol=1e-4)


def test_lora_trains_on_a_frozen_int8_base_and_merge_leaves_it():
    layer = salr.SALRLinear.from_linear(_linear(), sparsity=0.5, lora_rank=4, quantize="int8")
    frozen = {name: getattr(layer, name).clone() for name in ("bitmap", "values", "offsets", "scales")}
    opt = torch.optim.SGD([layer.lora_a, layer.lora_b], lr=0.1)
    x = torch.randn(16, 80, generator=torch.Generator().manual_seed(5))
    target = torch.randn(16, 24, generator=torch.Generator().manual_seed(6))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert layer.lora_b.grad is not None and layer.lora_a.grad is not None
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        after = layer(x)
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-5)
    for name, tensor in frozen.items():
        assert torch.equal(getattr(layer, name), tensor), name


def test_x_gradient_flows_through_the_int8_base():
    layer = salr.SALRLinear.from_linear(_linear(), sparsity=0.5, quantize="int8", quantize_group_size=64)
    x = torch.randn(3, 80, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xf = x.float().requires_grad_(True)
    layer(xf).sum().backward()
    dense = layer.base_dense().double()
    assert torch.allclose(xf.grad.double(), dense.sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


def test_bf16_cast_keeps_int8_values_and_fp32_scales():
    layer = salr.SALRLinear.from_linear(_linear(), sparsity=0.5, svd_rank=4, quantize="int8")
    scales = layer.scales.clone()
    x = torch.randn(4, 80, generator=torch.Generator().manual_seed(7))
    layer.to(torch.bfloat16)
    assert layer.values.dtype == torch.int8 and torch.equal(layer.scales, scales)
    assert layer.scales.dtype == torch.float32 and layer.compute_dtype == torch.bfloat16
    assert layer.svd_a.dtype == torch.bfloat16
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float32
    layer.float()
    assert layer.compute_dtype == torch.float32


def test_layer_refuses_mismatched_base_and_scales():
    q, scales = quantize_int8(torch.randn(8, 16))
    with pytest.raises(ValueError, match="scales: an int8 pruned_weight needs its scales"):
        salr.SALRLinear.from_weights(q)
    with pytest.raises(ValueError, match="scales"):
        salr.SALRLinear.from_weights(torch.randn(8, 16), scales=scales)
    with pytest.raises(ValueError, match="quantize_group_size"):
        salr.SALRLinear(16, 8, quantize_group_size=64)
    with pytest.raises(ValueError, match="quantize: expected None or one of int8"):
        salr.SALRLinear(16, 8, quantize="int4")
    layer = salr.SALRLinear.from_weights(q, scales=scales, dtype="bfloat16")
    assert layer.compute_dtype == torch.bfloat16 and torch.equal(layer.base_dense().float(),
                                                                  dequantize(q, scales).bfloat16().float())


def test_config_fields_are_validated():
    assert salr.SALRConfig(quantize="int8", quantize_group_size=64).quantize_group_size == 64
    with pytest.raises(ValueError, match="quantize: expected None or one of int8, got 'fp8'"):
        salr.SALRConfig(quantize="fp8")
    with pytest.raises(ValueError, match="quantize_group_size: expected None"):
        salr.SALRConfig(quantize="int8", quantize_group_size=128)
    with pytest.raises(ValueError, match="quantize_group_size: scale groups need quantize='int8'"):
        salr.SALRConfig(quantize_group_size=64)
    with pytest.raises(ValueError, match="quantize: expected None"):
        salr.SALORConfig(quantize="int4", factor_sparsity=0.5)
    with pytest.raises(ValueError, match="quantize: prune_model keeps dense"):
        prune_model(tiny_model("llama"), salr.SALRConfig(criterion="magnitude", quantize="int8"), progress=False)


@pytest.mark.parametrize("method", ["salr", "salor"])
def test_whole_model_saves_and_reloads_with_identical_logits(tmp_path, method):
    model = tiny_model("llama")
    ids = token_ids(2, 16)
    kwargs = dict(sparsity=0.5, criterion="sparsegpt", svd_rank=4, lora_rank=4, quantize="int8",
                  quantize_group_size=64)
    config = salr.SALORConfig(**kwargs, factor_sparsity=0.5) if method == "salor" else salr.SALRConfig(**kwargs)
    salr.sparsify_(model, config, token_ids(4, 32, seed=3), progress=False)
    layers = salr_layers(model)
    assert layers and all(m.values.dtype == torch.int8 and m.scales.dim() == 2 for m in layers.values())
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    salr.save(model, tmp_path / "m")
    record = read_record(tmp_path / "m")["salr"]
    assert record["quantize"] == "int8" and record["salr_config"]["quantize"] == "int8"
    first = next(iter(record["layers"].values()))
    assert first["quantize"] == "int8" and first["quantize_group_size"] == 64 and first["dtype"] == "float32"
    loaded = salr.load(tmp_path / "m")
    assert loaded.salr_config.quantize == "int8" and loaded.salr_config.quantize_group_size == 64
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)
    # merge leaves the int8 bases; the merged model saves and reloads bit-identically as well
    salr.merge_(model)
    with torch.no_grad():
        merged = model(input_ids=ids).logits
    salr.save(model, tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(salr.load(tmp_path / "merged")(input_ids=ids).logits, merged)


def test_float_records_have_no_quantize_fields(tmp_path):
    model = tiny_model("llama")
    salr.sparsify_(model, salr.SALRConfig(criterion="magnitude", svd_rank=0, lora_rank=2), progress=False)
    salr.save(model, tmp_path / "m")
    section = read_record(tmp_path / "m")["salr"]
    assert "quantize" not in section and "quantize" not in section["salr_config"]
    assert all("quantize" not in layer for layer in section["layers"].values())


def test_quantize_bases_after_the_fact_keeps_masks():
    model = tiny_model("llama")
    salr.sparsify_(model, salr.SALRConfig(criterion="magnitude", svd_rank=0, lora_rank=0), progress=False)
    masks = {n: m.mask().clone() for n, m in salr_layers(model).items()}
    assert quantize_bases(model) == len(masks)
    assert model.salr_config.quantize == "int8"
    for name, layer in salr_layers(model).items():
        assert layer.values.dtype == torch.int8 and torch.equal(layer.mask(), masks[name])
    assert quantize_bases(model) == 0  # already int8
    with pytest.raises(ValueError, match="quantize: expected 'int8'"):
        quantize_bases(model, None)


def test_compressed_tensors_export_refuses_int8_bases(tmp_path):
    model = tiny_model("llama")
    salr.sparsify_(model, salr.SALRConfig(criterion="magnitude", svd_rank=0, lora_rank=0, quantize="int8"),
                   progress=False)
    with pytest.raises(ValueError, match="quantization_config.config_groups"):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_bitmap_sparse_weight_with_scales_saves_loads_and_refuses(tmp_path):
    q, scales = quantize_int8(torch.randn(20, 70), 64)
    weight = BitmapSparseWeight.from_dense(q, scales)
    assert weight.nbytes == weight.index_bytes + weight.nnz + scales.numel() * 4
    weight.save(tmp_path / "w.safetensors")
    back = BitmapSparseWeight.load(tmp_path / "w.safetensors")
    assert torch.equal(back.values, weight.values) and torch.equal(back.scales, scales)
    assert torch.equal(back.to_dense(), dequantize(q, scales))
    x = torch.randn(3, 70)
    assert torch.allclose(back.linear(x), x @ dequantize(q, scales).T, rtol=1e-5, atol=1e-5)
    assert torch.equal(weight.to(dtype=torch.float32).to_dense(), dequantize(q, scales))
    bitmap, values, offsets = weight.bitmap, weight.values, weight.offsets
    for bad, fragment in ((None, "scales: int8 values need scales"), (torch.zeros(20), "finite and > 0"),
                          (torch.ones(20, 1), "expected shape"), (scales.double(), "expected float32")):
        with pytest.raises(ValueError, match=fragment):
            BitmapSparseWeight(bitmap, values, offsets, 20, 70, bad)
    with pytest.raises(ValueError, match="scales: only int8 values take scales"):
        BitmapSparseWeight.from_dense(torch.ones(20, 70), scales)
    # a file whose scales were altered fails its checksum
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["scales"] = tensors["scales"] * 2
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="sha256"):
        BitmapSparseWeight.load(tmp_path / "bad.safetensors")
    assert json.loads(meta["shape"]) == [20, 70] and meta["format_version"] == "2"
    assert reference.groups_per_band(70) == scales.shape[1]


def test_int8_layer_compiles_fullgraph_with_gradients():
    layer = salr.SALRLinear.from_linear(_linear(), sparsity=0.5, svd_rank=4, lora_rank=2, quantize="int8",
                                        quantize_group_size=64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 80, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    grad = layer.lora_b.grad.clone()
    layer.zero_grad()
    layer(x).sum().backward()
    torch.testing.assert_close(grad, layer.lora_b.grad)


def test_hf_and_peft_interop_on_an_int8_model(tmp_path):
    from salr.interop.hf import to_transformers
    from salr.interop.peft import export_peft_adapter, load_peft_adapter

    model = tiny_model("llama")
    salr.sparsify_(model, salr.SALRConfig(criterion="magnitude", svd_rank=4, lora_rank=4, quantize="int8"),
                   progress=False)
    for layer in salr_layers(model).values():
        torch.nn.init.normal_(layer.lora_b, std=0.02)
    ids = token_ids(2, 16)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        dense = to_transformers(model)(input_ids=ids).logits
    torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-4)
    export_peft_adapter(model, tmp_path / "peft")
    fresh = tiny_model("llama")
    salr.sparsify_(fresh, salr.SALRConfig(criterion="magnitude", svd_rank=0, lora_rank=8, quantize="int8"),
                   progress=False)
    load_peft_adapter(fresh, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)

"""PEFT LoRA <-> salr adapters, round-tripped through the real `peft` package: salr's exported
adapter on the decoded sparse base, loaded by PEFT, gives the salr model's logits; an adapter PEFT
itself trained/saved, loaded onto a salr model, gives the PEFT model's logits (float64 references)."""

from __future__ import annotations

import json

import pytest
import torch
from salr_helpers import edit_saved_files, tiny_model, token_ids

from salr.methods.convert import convert
from salr.methods.salr.model import salr_layers
from salr.interop import hf
from salr.interop.peft import export_peft_adapter, load_peft_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

peft = pytest.importorskip("peft", reason="pip install peft (test extra)")


def salr_model(svd_rank=4, lora_rank=4, seed=0, **overrides):
    model = tiny_model("llama", seed=seed)
    convert(model, **(dict(sparsity=0.5, criterion="magnitude", svd_rank=svd_rank, lora_rank=lora_rank,
                           alpha=8.0, progress=False) | overrides))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for m in salr_layers(model).values():
            if m.lora_b is not None:
                m.lora_b.copy_(torch.randn(m.lora_b.shape, generator=gen) * 0.05)  # as if trained
    return model.eval()


def peft_logits(base, adapter_dir, ids):
    """Logits of PEFT's own LoRA model over `base`, computed in float64."""
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).double().eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("svd_rank,lora_rank", [(4, 4), (6, 0), (0, 3)])
def test_exported_adapter_served_by_peft_matches_salr(tmp_path, svd_rank, lora_rank):
    model = salr_model(svd_rank, lora_rank)
    path = export_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == svd_rank + lora_rank == config["lora_alpha"] and len(config["target_modules"]) == 14
    loaded = peft.LoraConfig.from_pretrained(str(path))
    assert loaded.r == svd_rank + lora_rank
    base = hf.to_transformers(model, merge_adapters=False)
    ids = token_ids(2, 12)
    expected = peft_logits(base, path, ids)
    with torch.no_grad():
        out = model(ids).logits
    assert (out.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    # and the adapter really matters: without it the logits differ
    with torch.no_grad():
        bare = hf.to_transformers(model, merge_adapters=False)(ids).logits
    assert (bare.double() - expected).abs().max() > 1e-3 * expected.abs().max()


@pytest.mark.parametrize("merged", [False, True])
def test_exported_salor_adapter_matches_salr(tmp_path, merged):
    """SALOR layers export their masked factors, and after merge their stored BM8x8 factors (which
    live outside lora_a / lora_b): PEFT on the decoded base reproduces the salr model."""
    from salr.methods.salor.factors import update_all_masks

    model = salr_model(method="salor", factor_sparsity=0.5)
    update_all_masks(model, 0)  # B is nonzero (as if trained): both factors get their masks
    if merged:
        for module in salr_layers(model).values():
            module.merge()
        assert all(m.lora_a is None and m.factor_rank == 4 for m in salr_layers(model).values())
    path = export_peft_adapter(model, tmp_path / "adapter")
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 8
    ids = token_ids(2, 12)
    expected = peft_logits(hf.to_transformers(model, merge_adapters=False), path, ids)
    with torch.no_grad():
        assert (model(ids).logits.double() - expected).abs().max() < 1e-5 * expected.abs().max()


def test_mixed_ranks_use_rank_and_alpha_patterns(tmp_path):
    model = salr_model(svd_rank=4, lora_rank=2, target_modules=["q_proj", "v_proj", "down_proj"])
    with torch.no_grad():
        salr_layers(model)["model.layers.1.mlp.down_proj"].merge()  # 6 = 4 + 2, same as the rest ...
        layer = salr_layers(model)["model.layers.0.self_attn.q_proj"]
        layer.svd_a = torch.nn.Parameter(layer.svd_a[:1].clone(), requires_grad=False)  # ... but this one: 1 + 2
        layer.svd_b = torch.nn.Parameter(layer.svd_b[:, :1].clone(), requires_grad=False)
    path = export_peft_adapter(model, tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 6 and list(config["rank_pattern"].values()) == [3] == list(config["alpha_pattern"].values())
    ids = token_ids(2, 12)
    expected = peft_logits(hf.to_transformers(model, merge_adapters=False), path, ids)
    with torch.no_grad():
        assert (model(ids).logits.double() - expected).abs().max() < 1e-5 * expected.abs().max()


@pytest.mark.parametrize("rslora", [False, True])
def test_adapter_saved_by_peft_loads_onto_salr(tmp_path, rslora):
    model = salr_model(svd_rank=0, lora_rank=0)
    base = hf.to_transformers(model)
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=rslora,
                             rank_pattern={"up_proj": 2}, alpha_pattern={"up_proj": 5}, lora_dropout=0.1)
    peft_model = peft.get_peft_model(base, config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(3)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    names = load_peft_adapter(model, tmp_path / "adapter")
    assert len(names) == 6 and all(n.endswith(("q_proj", "v_proj", "up_proj")) for n in names)
    layers = salr_layers(model)
    assert layers["model.layers.0.mlp.up_proj"].lora_rank == 2 and layers["model.layers.0.self_attn.q_proj"].lora_rank == 4
    assert layers["model.layers.0.self_attn.q_proj"].dropout == pytest.approx(0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "ab"}
    ids = token_ids(2, 12)
    expected = peft_logits(hf.to_transformers(salr_model(svd_rank=0, lora_rank=0)), tmp_path / "adapter", ids)
    with torch.no_grad():
        out = model.eval()(ids).logits
    assert (out.double() - expected).abs().max() < 1e-5 * expected.abs().max()
    # round trip: salr re-exports it, PEFT serves it again
    path = export_peft_adapter(model, tmp_path / "again")
    again = peft_logits(hf.to_transformers(model, merge_adapters=False), path, ids)
    assert (again - expected).abs().max() < 1e-6 * expected.abs().max()  # B·s rounded to fp32 once


def _write(tmp_path, config_edit=None, tensor_edit=None):
    model = salr_model(svd_rank=0, lora_rank=2)
    path = export_peft_adapter(model, tmp_path / "a")
    edit_saved_files(path, "adapter_config.json", config_edit, "adapter_model.safetensors", tensor_edit)
    return salr_model(svd_rank=0, lora_rank=0), path


KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("config_edit,tensor_edit,match", [
    (lambda c: c.update(target_modules=["qproj"]), None, r"adapter_config.json: field 'target_modules' \['qproj'\] matches no layer"),
    (lambda c: c.update(target_modules=["lm_head", "q_proj"]), None,
     r"adapter_config.json: field 'target_modules' matches layers that are not salr layers: \['lm_head \(Linear\)'\]"),
    (None, lambda t: t.pop(KEY.replace("q_proj", "k_proj")),
     r"adapter_model.safetensors: tensors do not match .* 'target_modules' \(missing \[.*0.self_attn.k_proj.lora_A"),
    (lambda c: c.update(r=3), None, r"adapter_model.safetensors: .*q_proj.lora_A/B.weight have shapes \(2, 64\).*rank 3"),
    (None, lambda t: t.update({KEY: t[KEY][:, :-1].clone()}), r"adapter_model.safetensors: .*shapes \(2, 63\)"),
    (None, lambda t: t.update({"base_model.model.extra.lora_A.weight": t[KEY].clone()}),
     r"adapter_model.safetensors: tensors do not match .*unexpected \['base_model.model.extra"),
    (None, lambda t: t[KEY].fill_(float("nan")), r"adapter_model.safetensors: .*hold NaN or inf"),
    (lambda c: c.update(use_dora=True), None, r"adapter_config.json: field 'use_dora' is True"),
    (lambda c: c.update(peft_type="IA3"), None, r"adapter_config.json: field 'peft_type' is 'IA3'"),
    (lambda c: c.update(bias="all"), None, r"adapter_config.json: field 'bias' is 'all'"),
    (lambda c: c.update(modules_to_save=["lm_head"]), None, r"adapter_config.json: field 'modules_to_save'"),
    (lambda c: c.update(r=0), None, r"adapter_config.json: field 'r' must be an integer >= 1"),
])
def test_bad_adapters(tmp_path, config_edit, tensor_edit, match):
    model, path = _write(tmp_path, config_edit, tensor_edit)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        load_peft_adapter(model, path)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), "all or nothing"


def test_export_refuses_models_without_adapters(tmp_path):
    with pytest.raises(ValueError, match="model: no salr layer has an adapter"):
        export_peft_adapter(salr_model(svd_rank=0, lora_rank=0), tmp_path / "a")
    export_peft_adapter(salr_model(), tmp_path / "b")
    with pytest.raises(ValueError, match="directory: .* exists and is not empty"):
        export_peft_adapter(salr_model(), tmp_path / "b")

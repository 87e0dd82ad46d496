"""One way to apply a method: salr.sparsify_ dispatches on the config's type (SALRConfig, SALORConfig,
a registered newcomer), salr.merge_ folds every registered layer type, and the configs validate
their fields (one naming scheme, the old names read from saved records)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import salr
from salr.losa.layer import LoSALinear
from salr.methods import registry
from salr.methods.salor.layer import SALORLinear
from salr.methods.salr.config import SALRConfig
from salr.methods.salr.layer import SALRLinear
from salr_helpers import tiny_model, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(criterion="magnitude", sparsity=0.5, svd_rank=4, lora_rank=8)


def test_the_config_type_picks_the_method():
    salr_model = salr.sparsify_(tiny_model("llama"), salr.SALRConfig(**SMALL), progress=False)
    salor_model = salr.sparsify_(tiny_model("llama"), salr.SALORConfig(**SMALL, factor_sparsity=0.5), progress=False)
    kinds = [{type(m) for m in model.modules() if isinstance(m, SALRLinear)} for model in (salr_model, salor_model)]
    assert kinds == [{SALRLinear}, {SALORLinear}]
    assert (salr_model.salr_method, salor_model.salr_method) == ("salr", "salor")
    # SALOR records the SALR part of its config (the saved format has no factor fields there).
    assert type(salor_model.salr_config) is SALRConfig and salor_model.salr_config == salr_model.salr_config


def test_sparsify_is_the_handler_with_calibration():
    ids = token_ids(2, 16)
    config = salr.SALRConfig(criterion="wanda", sparsity=0.5, svd_rank=4, lora_rank=4)
    torch.manual_seed(0)
    via_entry = salr.sparsify_(tiny_model("llama"), config, ids, progress=False)
    torch.manual_seed(0)
    via_handler = registry.handler_for(config)(tiny_model("llama"), config, ids, progress=False)
    for (name, a), (_, b) in zip(via_entry.state_dict().items(), via_handler.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_registered_method_is_dispatched_to():
    @dataclasses.dataclass
    class Scale:
        factor: float

    @registry.register(Scale)
    def apply_scale(model, config, calibration=None, *, progress=True):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(config.factor)
        return model

    try:
        model = torch.nn.Linear(3, 3)
        before = model.weight.detach().clone()
        assert salr.sparsify_(model, Scale(2.0)) is model
        assert torch.equal(model.weight, 2 * before)
    finally:
        registry._HANDLERS.pop(Scale)


def test_merge_folds_every_registered_layer_type():
    model = salr.sparsify_(tiny_model("llama"), salr.SALRConfig(**SMALL), progress=False)
    name = "model.layers.0.self_attn.q_proj"
    losa_layer = LoSALinear.from_linear(torch.nn.Linear(64, 64), rank=4, scale=2.0)
    model.get_submodule("model.layers.0.self_attn").q_proj = losa_layer
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, SALRLinear):
                layer.lora_b.normal_()
        losa_layer.lora_b.normal_()
    x = token_ids(1, 12)
    with torch.no_grad():
        before = model(input_ids=x).logits
    assert salr.merge_(model) == 14
    assert model.get_submodule(name).rank == 0
    assert all(m.lora_rank == 0 for m in model.modules() if isinstance(m, SALRLinear))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, before, rtol=1e-4, atol=1e-4)


def test_configs_share_one_naming_scheme_and_read_the_old_names():
    config = salr.SALORConfig(**SMALL, lora_alpha=4.0, lora_dropout=0.1, target_modules="q_proj", factor_pattern="2:4")
    assert config.target_modules == ("q_proj",) and config.factor_config.sparsity == 0.5
    assert salr.SALORConfig.from_dict(config.to_dict()) == config
    old = {**SALRConfig().to_dict(), "alpha": 4.0, "dropout": 0.1}
    del old["lora_alpha"], old["lora_dropout"]
    assert SALRConfig.from_dict(old) == SALRConfig(lora_alpha=4.0, lora_dropout=0.1)
    with pytest.raises(ValueError, match="lora_alpha: expected a finite number > 0"):
        SALRConfig(lora_alpha=float("nan"))
    with pytest.raises(ValueError, match="factor_start_step, factor_end_step: need start_step <= end_step"):
        salr.SALORConfig(**SMALL, factor_sparsity=0.5, factor_start_step=5, factor_end_step=2)

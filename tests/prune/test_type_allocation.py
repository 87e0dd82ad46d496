"""Sparsity per projection type: the offsets order the types, every block keeps its ratio (so the model
keeps its global sparsity, counted from the masks), clipping is absorbed by the shift, and the mapping
drives SALRConfig's per-layer sparsity."""

from __future__ import annotations

import pytest
import torch

import salr
from salr.methods.salr.config import SALRConfig
from salr.methods.salr.model import salr_layers
from salr.prune.masks import count
from salr.prune.type_allocation import MAX_SPARSITY, SENSITIVITY_OFFSETS, typed_layer_sparsity
from salr_helpers import tiny_model, token_ids


def block_mean(model, ratios: dict[str, float], block: int) -> float:
    layers = {n: m for n, m in model.named_modules() if n in ratios and int(n.split(".")[2]) == block}
    sizes = {n: m.in_features * m.out_features for n, m in layers.items()}
    return sum(ratios[n] * s for n, s in sizes.items()) / sum(sizes.values())


def kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@pytest.mark.parametrize("block_ratios", [0.5, (0.42, 0.58, 0.5), (0.9, 0.1, 0.0)])
def test_blocks_keep_their_ratio_and_types_follow_the_offsets(block_ratios):
    model = tiny_model("llama", layers=3)
    ratios = typed_layer_sparsity(model, block_ratios)
    per_block = [block_ratios] * 3 if isinstance(block_ratios, float) else block_ratios
    assert len(ratios) == 3 * 7
    for b, target in enumerate(per_block):
        assert block_mean(model, ratios, b) == pytest.approx(target, abs=1e-12)
        mine = {kind(n): r for n, r in ratios.items() if int(n.split(".")[2]) == b}
        assert all(0.0 <= r <= MAX_SPARSITY for r in mine.values())
        if 0.2 < target < 0.7:  # no clipping: the offsets' differences survive exactly
            assert mine["q_proj"] - mine["v_proj"] == pytest.approx(0.25, abs=1e-12)
            assert mine["v_proj"] < mine["up_proj"] < mine["gate_proj"] < mine["down_proj"] < mine["o_proj"]
    if per_block[1] == 0.1:  # 0.1 - 0.15 clips v_proj at 0 and the others absorb it
        assert ratios["model.layers.1.self_attn.v_proj"] == 0.0
    if per_block[2] == 0.0:  # a dense block stays dense
        assert all(r == 0.0 for n, r in ratios.items() if int(n.split(".")[2]) == 2)


def test_the_mapping_prunes_to_the_global_target():
    model = tiny_model("llama", layers=2)
    ratios = typed_layer_sparsity(model, 0.5)
    salr.sparsify_(model, SALRConfig(sparsity=ratios, svd_rank=0, lora_rank=0), token_ids(4, 16), progress=False)
    layers = salr_layers(model)
    total = sum(m.in_features * m.out_features for m in layers.values())
    pruned = total - sum(int(m.values.numel()) for m in layers.values())
    # Wanda prunes round-half-up(s·K) per output row.
    assert pruned == sum(m.out_features * count(ratios[n], m.in_features) for n, m in layers.items())
    assert abs(pruned - 0.5 * total) <= 0.5 * sum(m.out_features for m in layers.values())
    kept = {kind(n): 1 - m.values.numel() / (m.in_features * m.out_features) for n, m in layers.items()}
    assert kept["q_proj"] > 0.55 and kept["v_proj"] < 0.4


def test_strength_scales_the_offsets():
    model = tiny_model("llama", layers=1)
    one, two = typed_layer_sparsity(model, 0.5), typed_layer_sparsity(model, 0.5, strength=2.0)
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    assert two[q] - two[v] == pytest.approx(2 * (one[q] - one[v]))
    assert block_mean(model, two, 0) == pytest.approx(0.5, abs=1e-12)
    assert typed_layer_sparsity(model, 0.5, strength=0.0) == {n: pytest.approx(0.5) for n in one}


def test_custom_offsets_and_unknown_types():
    model = tiny_model("llama", layers=1)
    ratios = typed_layer_sparsity(model, 0.5, offsets={"down_proj": 0.2})
    assert ratios["model.layers.0.mlp.down_proj"] - ratios["model.layers.0.mlp.up_proj"] == pytest.approx(0.2)
    assert block_mean(model, ratios, 0) == pytest.approx(0.5, abs=1e-12)
    assert typed_layer_sparsity(model, 0.5, offsets={}) == {n: pytest.approx(0.5) for n in ratios}


@pytest.mark.parametrize("args, message", [
    ((0.5,), None),
    (((0.5, 0.5),), "block_ratios needs one ratio per decoder block"),
    ((0.97,), "block_ratios must lie in"),
    ((0.5, {"q_proj": 1.5}), r"offsets\['q_proj'\]"),
    ((0.5, {"q_proj": True}), r"offsets\['q_proj'\]"),
    ((0.5, SENSITIVITY_OFFSETS, None, -1.0), "strength must be"),
])
def test_bad_arguments_name_the_function_and_argument(args, message):
    model = tiny_model("llama", layers=1)
    if message is None:
        assert set(typed_layer_sparsity(model, *args)) == {n for n, m in model.named_modules()
                                                           if isinstance(m, torch.nn.Linear) and ".layers." in n}
        assert set(SENSITIVITY_OFFSETS) == {kind(n) for n in typed_layer_sparsity(model, *args)}
        return
    with pytest.raises(ValueError, match=f"typed_layer_sparsity: {message}"):
        typed_layer_sparsity(model, *args)


@pytest.mark.parametrize("layerwise", ["uniform", "owl"])
def test_config_field_resolves_records_and_reapplies(tmp_path, layerwise):
    calibration = token_ids(4, 16)
    model = tiny_model("llama", layers=3)
    config = SALRConfig(sparsity=0.5, layerwise=layerwise, type_allocation=1.0, svd_rank=0, lora_rank=0)
    assert config.types_pending
    salr.sparsify_(model, config, calibration, progress=False)
    chosen = model.salr_config.sparsity
    assert isinstance(chosen, dict) and not model.salr_config.types_pending
    if layerwise == "uniform":
        assert chosen == pytest.approx(typed_layer_sparsity(tiny_model("llama", layers=3), 0.5))
    layers = salr_layers(model)
    total = sum(m.in_features * m.out_features for m in layers.values())
    pruned = total - sum(int(m.values.numel()) for m in layers.values())
    assert abs(pruned - 0.5 * total) <= 0.5 * sum(m.out_features for m in layers.values())
    salr.save(model, tmp_path / "m")
    loaded = salr.load(tmp_path / "m")
    assert loaded.salr_config == model.salr_config
    again = tiny_model("llama", layers=3)
    salr.sparsify_(again, loaded.salr_config, calibration, progress=False)
    assert all(torch.equal(salr_layers(again)[n].to_dense(), m.to_dense()) for n, m in layers.items())


@pytest.mark.parametrize("fields, message", [
    ({"type_allocation": -1.0}, "type_allocation: expected a strength"),
    ({"type_allocation": 5}, "type_allocation: expected a strength"),
    ({"type_allocation": True}, "type_allocation: expected a strength"),
    ({"type_allocation": 1.0, "pattern": "2:4", "sparsity": None}, "type_allocation: .* pattern must be None"),
])
def test_bad_config_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SALRConfig(**fields)


def test_a_saved_record_without_the_field_stays_as_it_was(tmp_path):
    import json

    model = tiny_model("llama", layers=1)
    salr.sparsify_(model, SALRConfig(sparsity=0.5, criterion="magnitude", svd_rank=0, lora_rank=0), progress=False)
    salr.save(model, tmp_path / "m")
    record = json.loads((tmp_path / "m" / "config.json").read_text())["salr"]["salr_config"]
    assert "type_allocation" not in record

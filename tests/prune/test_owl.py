"""OWL layer-wise sparsity: the ratios follow planted activation outliers, stay in their bounds, keep
the model's global sparsity at the target (counted from the masks), survive save/load, and the CLI's
``--layerwise owl`` applies them."""

from __future__ import annotations

import json

import pytest
import torch

import salr
from salr import cli
from salr.cli.parser import salr_layerwise
from salr.methods.salr.config import SALRConfig
from salr.methods.salr.model import prune_model, salr_layers
from salr.prune.masks import count
from salr.prune.owl import block_outlier_ratios, owl_block_sparsity, owl_ratios
from salr_helpers import tiny_model, token_ids, write_tiny_cli_assets

PLANTED = (1, 3)  # blocks whose inputs get outlier channels


def planted_model(seed: int = 0):
    """A 4-block tiny Llama whose blocks in PLANTED see 3 input channels 40x louder (the RMSNorm
    gains before attention and MLP scaled), as LLMs' massive activations do."""
    model = tiny_model("llama", seed=seed, layers=4)
    with torch.no_grad():
        for b in PLANTED:
            layer = model.model.layers[b]
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[5, 17, 40]] *= 40.0
    return model


CALIB = token_ids(4, 16)


def test_outlier_ratios_and_block_sparsity_follow_planted_outliers():
    lods, sizes = block_outlier_ratios(planted_model(), CALIB, m=5.0, progress=False)
    assert len(lods) == len(sizes) == 4
    assert min(lods[b] for b in PLANTED) > 3 * max(lods[b] for b in (0, 2))
    ratios = owl_block_sparsity(planted_model(), CALIB, 0.5, m=5.0, lam=0.08, progress=False)
    assert max(ratios[b] for b in PLANTED) < 0.5 < min(ratios[b] for b in (0, 2))
    assert all(0.42 - 1e-12 <= r <= 0.58 + 1e-12 for r in ratios)
    assert sum(r * s for r, s in zip(ratios, sizes)) / sum(sizes) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("target, lam", [(0.5, 0.08), (0.1, 0.3), (0.7, 0.25)])
def test_owl_ratios_bounds_and_weighted_mean(target, lam):
    gen = torch.Generator().manual_seed(3)
    lods = torch.rand(9, generator=gen).pow(3).tolist()  # skewed: clipping matters at the ends
    sizes = torch.randint(100, 5000, (9,), generator=gen).tolist()
    ratios = owl_ratios(lods, sizes, target, lam)
    lo, hi = max(0.0, target - lam), target + lam
    assert all(lo - 1e-12 <= r <= hi + 1e-12 for r in ratios)
    assert sum(r * s for r, s in zip(ratios, sizes)) / sum(sizes) == pytest.approx(target, abs=1e-12)
    order = sorted(range(9), key=lambda i: lods[i])
    assert all(ratios[a] >= ratios[b] - 1e-12 for a, b in zip(order, order[1:]))  # more outliers, less pruned
    assert owl_ratios([0.2] * 3, [5, 6, 7], target, lam) == (target,) * 3  # no spread: uniform


def test_global_sparsity_from_masks_is_the_target_and_saves(tmp_path):
    target = 0.5
    expected = owl_block_sparsity(planted_model(), CALIB, target, progress=False)
    model = planted_model()
    salr.sparsify_(model, SALRConfig(sparsity=target, layerwise="owl", svd_rank=0, lora_rank=4), CALIB,
                   progress=False)
    assert model.salr_config.layerwise == "owl" and model.salr_config.sparsity == pytest.approx(expected)
    layers = salr_layers(model)
    total = sum(m.in_features * m.out_features for m in layers.values())
    pruned = total - sum(int(m.values.numel()) for m in layers.values())
    # Wanda prunes per output row: round-half-up(s_b·K) in every row of block b.
    rounded = sum(m.out_features * count(expected[int(name.split(".")[2])], m.in_features)
                  for name, m in layers.items())
    assert pruned == rounded
    rows = sum(m.out_features for m in layers.values())
    assert abs(pruned - target * total) <= 0.5 * rows
    block_of = {name: int(name.split(".")[2]) for name in layers}
    for b in range(4):
        w = sum(m.in_features * m.out_features for n, m in layers.items() if block_of[n] == b)
        kept = sum(int(m.values.numel()) for n, m in layers.items() if block_of[n] == b)
        assert 1 - kept / w == pytest.approx(expected[b], abs=1e-2)
    # Save/load keeps the applied per-block ratios, and re-applying that config rebuilds the same masks.
    salr.save(model, tmp_path / "m")
    loaded = salr.load(tmp_path / "m")
    assert loaded.salr_config == model.salr_config
    again = planted_model()
    salr.sparsify_(again, loaded.salr_config, CALIB, progress=False)
    assert all(torch.equal(salr_layers(again)[n].to_dense(), m.to_dense()) for n, m in layers.items())


def test_prune_model_uses_owl_ratios():
    expected = owl_block_sparsity(planted_model(), CALIB, 0.6, lam=0.1, progress=False)
    report = prune_model(planted_model(), sparsity=0.6, layerwise="owl", owl_lambda=0.1, calibration=CALIB,
                         progress=False)
    for name, s in report.items():
        assert s == pytest.approx(expected[int(name.split(".")[2])], abs=1e-2)


@pytest.mark.parametrize("fields, message", [
    ({"layerwise": "rmi"}, "layerwise: expected one of uniform, owl"),
    ({"layerwise": "owl", "owl_m": 0}, "owl_m"),
    ({"layerwise": "owl", "owl_m": float("nan")}, "owl_m"),
    ({"layerwise": "owl", "owl_lambda": -0.1}, "owl_lambda"),
    ({"layerwise": "owl", "owl_lambda": 0.5}, "owl_lambda"),
    ({"layerwise": "owl", "pattern": "2:4", "sparsity": None}, "pattern must be None"),
    ({"layerwise": "owl", "sparsity": {"a": 0.5}}, "sparsity: layerwise='owl'"),
])
def test_bad_config_raises_naming_the_field(fields, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SALRConfig(**fields)


def test_bad_function_arguments_raise():
    with pytest.raises(ValueError, match="owl_ratios: lods and sizes"):
        owl_ratios([0.1, 0.2], [10], 0.5)
    with pytest.raises(ValueError, match="owl_ratios: sizes"):
        owl_ratios([0.1, 0.2], [10, 0], 0.5)
    with pytest.raises(ValueError, match="owl_ratios: sparsity"):
        owl_ratios([0.1], [10], 1.0)
    with pytest.raises(ValueError, match="block_outlier_ratios: owl_m"):
        block_outlier_ratios(planted_model(), CALIB, m=-1.0)
    with pytest.raises(ValueError, match="calibration: layerwise='owl'"):
        salr.sparsify_(planted_model(), SALRConfig(criterion="magnitude", layerwise="owl", svd_rank=4), progress=False)


SEQ = ["--seq-len", "32", "--eval-windows", "2", "--calib-windows", "4", "--svd-rank", "4"]


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    return write_tiny_cli_assets(tmp_path_factory.mktemp("tiny_owl"))


def test_cli_prune_layerwise_owl(tiny_assets, tmp_path):
    model_dir, text = tiny_assets
    out = tmp_path / "run"
    assert cli.main(["prune", "--model", str(model_dir), "--text", str(text), "--out", str(out), *SEQ,
                     "--sparsity", "0.5", "--layerwise", "owl", "--owl-lambda", "0.1", "--type-allocation", "0"]) == 0
    layers = json.loads((out / "metrics.json").read_text())["layers"]
    model = salr.load(out / "model")
    ratios = model.salr_config.sparsity
    assert model.salr_config.layerwise == "owl" and len(ratios) == 3 and len(set(ratios)) > 1
    assert all(0.4 - 1e-12 <= r <= 0.6 + 1e-12 for r in ratios)
    sparse = salr_layers(model)
    total = sum(m.in_features * m.out_features for m in sparse.values())
    kept = sum(int(m.values.numel()) for m in sparse.values())
    assert abs((total - kept) - 0.5 * total) <= 0.5 * sum(m.out_features for m in sparse.values())
    assert len(layers) == len(sparse) == 21
    # The reported per-layer sparsities are those of the block ratios OWL chose.
    assert {round(r["sparsity"], 1) for r in layers} == {round(r, 1) for r in ratios}


def test_cli_prune_type_allocation(tiny_assets, tmp_path):
    model_dir, text = tiny_assets
    out = tmp_path / "run"
    assert cli.main(["prune", "--model", str(model_dir), "--text", str(text), "--out", str(out), *SEQ,
                     "--sparsity", "0.5", "--type-allocation", "1"]) == 0
    model = salr.load(out / "model")
    config = model.salr_config
    assert config.layerwise == "owl" and config.type_allocation == 1.0 and len(config.sparsity) == 21
    q = [r for n, r in config.sparsity.items() if n.endswith("q_proj")]
    v = [r for n, r in config.sparsity.items() if n.endswith("v_proj")]
    assert min(q) > max(v)  # around OWL's block ratios: q pruned harder than v in every block
    sparse = salr_layers(model)
    total = sum(m.in_features * m.out_features for m in sparse.values())
    kept = sum(int(m.values.numel()) for m in sparse.values())
    assert abs((total - kept) - 0.5 * total) <= 0.5 * sum(m.out_features for m in sparse.values())


@pytest.mark.parametrize("method", ["salr", "salor"])
def test_cli_finetune_layerwise_owl(tiny_assets, tmp_path, method):
    model_dir, text = tiny_assets
    out = tmp_path / "run"
    assert cli.main(["finetune", "--method", method, "--model", str(model_dir), "--text", str(text), "--out",
                     str(out), *SEQ, "--steps", "2", "--batch-size", "2", "--train-seq-len", "32", "--warmup", "1",
                     "--lora-rank", "4", "--sparsity", "0.6", "--layerwise", "owl", "--type-allocation", "0"]) == 0
    model = salr.load(out / "model")
    ratios = model.salr_config.sparsity
    assert model.salr_method == method and model.salr_config.layerwise == "owl" and len(set(ratios)) > 1
    assert all(0.52 - 1e-12 <= r <= 0.68 + 1e-12 for r in ratios)
    sparse = salr_layers(model)
    total = sum(m.in_features * m.out_features for m in sparse.values())
    kept = sum(int(m.values.numel()) for m in sparse.values())
    assert abs((total - kept) - 0.6 * total) <= 0.5 * sum(m.out_features for m in sparse.values())


def test_cli_losa_layerwise_owl(tiny_assets, tmp_path):
    from salr.cli import steps
    from salr.losa.schedule import sparsity_schedule

    model_dir, text = tiny_assets
    dense, _, splits = steps.load(str(model_dir), str(text))
    expected = owl_block_sparsity(dense, splits.calibration_windows(4, 32), 0.6, progress=False)
    out = tmp_path / "run"
    assert cli.main(["finetune", "--method", "losa", "--model", str(model_dir), "--text", str(text), "--out",
                     str(out), *SEQ, "--steps", "3", "--batch-size", "2", "--train-seq-len", "32", "--warmup", "1",
                     "--lora-rank", "2", "--rounds", "3", "--final-share", "0", "--sparsity", "0.6",
                     "--layerwise", "owl"]) == 0
    rounds = json.loads((out / "metrics.json").read_text())["losa"]["rounds"]
    for r, target in zip(rounds, sparsity_schedule(0.6, 3)):  # OWL's ratios scaled to each round's target
        assert r["block_sparsity"] == pytest.approx([e * target / 0.6 for e in expected], abs=0.01)
    assert len(set(expected)) > 1 and sum(rounds[-1]["block_sparsity"]) / 3 == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("sparsity, pattern, expected", [
    (0.5, None, "owl"), (0.91, None, "owl"), (0.92, None, "uniform"), (0.0, None, "uniform"), (0.5, "2:4", "uniform"),
])
def test_default_layerwise_is_owl_where_it_applies(sparsity, pattern, expected):
    assert salr_layerwise(None, sparsity, pattern, 0.08) == expected
    assert salr_layerwise("uniform", 0.5, None, 0.08) == "uniform"  # an explicit choice stands


def test_cli_prune_default_is_sparsegpt_with_owl(tiny_assets, tmp_path):
    model_dir, text = tiny_assets
    runs = {}
    for name, extra in (("default", []), ("2:4", ["--pattern", "2:4"])):
        out = tmp_path / name
        assert cli.main(["prune", "--model", str(model_dir), "--text", str(text), "--out", str(out), *SEQ,
                         "--sparsity", "0.5", *extra]) == 0
        runs[name] = salr.load(out / "model").salr_config
    assert runs["default"].criterion == "sparsegpt" and runs["default"].layerwise == "owl"
    # OWL's block ratios moved apart by projection type: one ratio per linear
    assert runs["default"].type_allocation == 1.0 and len(set(runs["default"].sparsity.values())) > 3
    assert runs["2:4"].criterion == "sparsegpt" and runs["2:4"].layerwise == "uniform"
    assert runs["2:4"].type_allocation == 0.0


@pytest.mark.parametrize("args, message", [
    (["prune", "--layerwise", "rmi"], "--layerwise rmi: only with --method losa"),
    (["prune", "--layerwise", "owl", "--owl-m", "0"], "owl_m"),
    (["prune", "--layerwise", "owl", "--pattern", "2:4"], "does not combine with --pattern 2:4"),
    (["finetune", "--method", "losa", "--layerwise", "owl", "--owl-lambda", "0.6"], "owl_lambda"),
    (["prune", "--type-allocation", "1", "--pattern", "2:4"], "--type-allocation: moves unstructured ratios"),
    (["finetune", "--method", "losa", "--type-allocation", "1"], "--type-allocation: not available with --method losa"),
])
def test_cli_bad_layerwise_flags(tiny_assets, tmp_path, args, message, capsys):
    model_dir, text = tiny_assets
    assert cli.main([*args, "--model", str(model_dir), "--text", str(text), "--out", str(tmp_path / "run"),
                     *SEQ]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_type_allocation_out_of_range_is_a_usage_error(tiny_assets, tmp_path, capsys):
    model_dir, text = tiny_assets
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prune", "--model", str(model_dir), "--text", str(text), "--out", str(tmp_path / "run"),
                  "--type-allocation", "9"])
    assert exit_info.value.code == 2
    assert "argument --type-allocation: must be a strength in [0, 4]" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

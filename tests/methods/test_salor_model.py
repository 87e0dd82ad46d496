"""SALOR on a model: SALORLinear against float64 references (training form through the fused op,
stored BM8x8 form), salr.sparsify_(model, SALORConfig(...)) → train (mask schedule via on_step) →
merge → save → load, resume, the CLI, and bad input (SALORConfig and the deprecated convert)."""

from __future__ import annotations

import pytest
import torch

import salr
from salr.methods.salor.config import FactorSparsityConfig
from salr.methods.salor.factors import update_all_masks
from salr.io.saved_model import layer_skeleton, read_record
from salr.methods.convert import convert
from salr.methods.salor.layer import SALORLinear
from salr.methods.salor.model import salor_layers, to_salor
from salr.methods.salr.layer import SALRLinear
from salr.methods.salr.model import freeze_all_but_adapters
from salr.train.config import TrainConfig
from salr.train.data import TokenWindows
from salr.train.loop import train
from salr_helpers import tiny_model, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(autocast_dtype=None, progress=False)


def salor_layer(n=13, k=70, r=5, svd_rank=3, sparsity=0.5, pattern=None, bias=True, dropout=0.0, seed=0):
    """A SALORLinear with a 50%-sparse base, an SVD adapter, a trained-looking B and masks at target."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    w[torch.rand(n, k, generator=gen) < 0.5] = 0
    base = SALRLinear.from_weights(w, torch.randn(n, generator=gen) if bias else None,
                                   torch.randn(svd_rank, k, generator=gen), torch.randn(n, svd_rank, generator=gen),
                                   lora_rank=r, alpha=2.0 * r, dropout=dropout)
    layer = SALORLinear.from_salr(base, FactorSparsityConfig(sparsity, pattern))
    with torch.no_grad():
        layer.lora_b.copy_(torch.randn(n, r, generator=gen))
    layer.update_masks(0)
    return layer


def reference(layer: SALORLinear, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64: x·W_sᵀ + (x·A_svdᵀ)·B_svdᵀ + s·(x·(A⊙Ma)ᵀ)·(B⊙Mb)ᵀ + bias."""
    d = torch.float64
    y = x.to(d) @ layer.base_dense().to(d).T + (x.to(d) @ layer.svd_a.to(d).T) @ layer.svd_b.to(d).T
    y = y + layer.scale * (x.to(d) @ (a.to(d) * layer.mask_a).T) @ (b.to(d) * layer.mask_b).T
    return y + layer.bias.to(d)


@pytest.mark.parametrize("m", [1, 6])
def test_training_forward_and_backward_equal_the_float64_masked_reference(m):
    layer = salor_layer()
    layer.train()
    assert layer.factor_sparsity() == pytest.approx((0.5, 0.5), abs=0.01)
    x = torch.randn(m, 70, requires_grad=True)
    y = layer(x)
    a_ref = layer.lora_a.detach().double().requires_grad_()
    b_ref = layer.lora_b.detach().double().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    ref = reference(layer, x_ref, a_ref, b_ref)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.lora_a.grad.double(), a_ref.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.lora_b.grad.double(), b_ref.grad, rtol=1e-5, atol=1e-4)
    assert torch.all(layer.lora_a.grad[~layer.mask_a] == 0) and torch.all(layer.lora_b.grad[~layer.mask_b] == 0)
    assert layer.svd_a.grad is None and layer.values.grad is None  # frozen base and SVD adapter


def test_dropout_path_masks_the_factors_too():
    layer = salor_layer(dropout=0.5)
    layer.train()
    layer(torch.randn(4, 70)).square().sum().backward()
    assert torch.all(layer.lora_a.grad[~layer.mask_a] == 0) and torch.all(layer.lora_b.grad[~layer.mask_b] == 0)


@pytest.mark.parametrize("sparsity, pattern", [(0.5, None), (0.75, None), (0.5, "2:4"), (0.0, None)])
def test_merge_stores_the_masked_factors_in_bm8x8_and_keeps_the_function(sparsity, pattern):
    layer = salor_layer(n=24, k=64, r=8, sparsity=sparsity, pattern=pattern)
    layer.eval()
    x = torch.randn(5, 64)
    before, dense_before = layer(x), layer.to_dense()
    a, b = layer.lora_a.detach().clone(), layer.lora_b.detach().clone()
    ref = reference(layer, x, a, b)
    dense_bytes = layer.lora_bytes()
    layer.merge()
    assert layer.lora_a is None and layer.mask_a is None and layer.factor_rank == 8
    assert not any(p.requires_grad for p in layer.parameters())
    factors = layer.sparse_factors
    assert factors.a.density == pytest.approx(1 - sparsity) and factors.b.density == pytest.approx(1 - sparsity)
    if pattern:
        assert torch.all((factors.a.to_dense() != 0).reshape(-1, 4).sum(1) == 2)
        assert torch.all((factors.b.to_dense() != 0).reshape(-1, 4).sum(1) == 2)
    after = layer(x)
    torch.testing.assert_close(after.double(), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.to_dense(), dense_before, rtol=1e-5, atol=1e-5)
    assert layer(torch.randn(0, 64)).shape == (0, 24)  # empty batch
    if sparsity >= 0.5:
        assert layer.lora_bytes() < (1.15 - sparsity) * dense_bytes  # values + ~1/8 byte of bitmap per entry


def test_bf16_layer_merges_close_to_its_training_form():
    layer = salor_layer(n=16, k=64, r=8).to(torch.bfloat16)
    layer.eval()
    x = torch.randn(3, 64).to(torch.bfloat16)
    before = layer(x)
    layer.merge()
    assert layer.factor_a_values.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x).float(), before.float(), rtol=3e-2, atol=3e-2)


def test_merge_before_the_ramp_ended_brings_the_masks_to_the_target():
    layer = salor_layer()
    layer.factor_config = FactorSparsityConfig(0.75, start_step=0, end_step=100)
    layer.merge()
    assert layer.sparse_factors.a.density == pytest.approx(0.25, abs=0.01)


def converted(seed=0, **factor):
    model = tiny_model("llama", seed=seed)
    factor = factor or dict(factor_sparsity=0.5, factor_start_step=0, factor_end_step=3)
    config = salr.SALORConfig(criterion="magnitude", sparsity=0.5, svd_rank=4, lora_rank=8, **factor)
    return salr.sparsify_(model, config, progress=False)


def test_convert_train_merge_save_load(tmp_path):
    model = converted()
    layers = salor_layers(model)
    assert len(layers) == 14 and all(m.factor_config.sparsity == 0.5 for m in layers.values())
    assert sorted(freeze_all_but_adapters(model)) == sorted(
        f"{n}.{p}" for n in layers for p in ("lora_a", "lora_b"))
    config = TrainConfig(lr=1e-2, steps=6, batch_size=2, weight_decay=0.1, **FAST)
    steps_seen = []
    train(model, TokenWindows(token_ids(1, 400).reshape(-1), 16), config, resume=False,
          on_step=[update_all_masks, lambda _m, step: steps_seen.append(step)])
    assert steps_seen == list(range(7))
    for layer in layers.values():  # AdamW momentum and weight decay did not revive a masked entry
        assert layer.factor_sparsity() == (0.5, 0.5)
        assert torch.all(layer.lora_a[~layer.mask_a] == 0) and torch.all(layer.lora_b[~layer.mask_b] == 0)
        assert torch.all(layer.lora_a[layer.mask_a] != 0) and torch.all(layer.lora_b[layer.mask_b] != 0)
    model.eval()
    ids = token_ids(2, 12, seed=5)
    trained = model(input_ids=ids).logits
    # The training form survives save/load (masks included).
    salr.save(model, tmp_path / "trained")
    reloaded = salr.load(tmp_path / "trained")
    assert torch.equal(reloaded(input_ids=ids).logits, trained)
    for name, layer in salor_layers(reloaded).items():
        assert torch.equal(layer.mask_a, layers[name].mask_a) and layer.lora_a.requires_grad
    # The stored form: merge, save, load gives identical outputs, and the factors stay sparse.
    for layer in layers.values():
        nonzero = int(layer.mask_a.sum() + layer.mask_b.sum())
        layer.merge()
        assert layer.sparse_factors.a.nnz + layer.sparse_factors.b.nnz == nonzero
    merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-4)
    salr.save(model, tmp_path / "merged")
    record = read_record(tmp_path / "merged")["salr"]["layers"]["model.layers.0.self_attn.q_proj"]
    assert record["factor_rank"] == 8 and record["lora_rank"] == 0 and record["factor_config"]["sparsity"] == 0.5
    loaded = salr.load(tmp_path / "merged")
    assert torch.equal(loaded(input_ids=ids).logits, merged)
    for name, layer in salor_layers(loaded).items():
        assert torch.equal(layer.factor_b_values, layers[name].factor_b_values)
        assert layer.sparse_factors.a.density == pytest.approx(0.5, abs=0.01)


def test_resumed_run_rebuilds_the_masks_and_matches_an_uninterrupted_one(tmp_path):
    factor = dict(factor_sparsity=0.75, factor_pattern="1:4", factor_start_step=0, factor_end_step=4,
                  factor_update_every=2)
    data = token_ids(1, 400).reshape(-1)
    config = dict(lr=1e-2, batch_size=2, schedule="constant", **FAST)
    straight = converted(**factor)
    train(straight, TokenWindows(data, 16), TrainConfig(steps=6, **config), resume=False, on_step=update_all_masks)
    first = converted(**factor)
    train(first, TokenWindows(data, 16), TrainConfig(steps=3, **config), run_dir=tmp_path, on_step=update_all_masks)
    resumed = converted(**factor)  # fresh masks (all ones): only the trainable factors are checkpointed
    train(resumed, TokenWindows(data, 16), TrainConfig(steps=6, **config), run_dir=tmp_path, on_step=update_all_masks)
    for name, layer in salor_layers(straight).items():
        other = salor_layers(resumed)[name]
        assert torch.equal(other.mask_a, layer.mask_a) and torch.equal(other.mask_b, layer.mask_b)
        assert torch.equal(other.lora_a, layer.lora_a) and torch.equal(other.lora_b, layer.lora_b)
        assert torch.all(layer.mask_a.reshape(-1, 4).sum(1) == 1)


def test_to_salor_keeps_an_already_converted_models_lora():
    model = salr.sparsify_(tiny_model("llama"), salr.SALRConfig(criterion="magnitude", svd_rank=4, lora_rank=8),
                           progress=False)
    ids = token_ids(1, 10)
    before = model(input_ids=ids).logits
    to_salor(model, FactorSparsityConfig(0.5))
    assert len(salor_layers(model)) == 14
    torch.testing.assert_close(model(input_ids=ids).logits, before)  # masks all ones, B zero: same function


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="salor", factor_sparsity=1.0), r"factor_sparsity: must be in \[0, 1\)"),
    (dict(method="salor", factor_sparsity=-0.5), r"factor_sparsity: must be in \[0, 1\)"),
    (dict(method="salor"), "factor_sparsity: method='salor' needs factor_sparsity"),
    (dict(method="salor", factor_pattern="2:4", lora_rank=6), "factor_pattern: 2:4 needs the LoRA rank"),
    (dict(method="salor", factor_pattern="1:3"), r"factor_pattern: 1:3 needs in_features.* layer model\.layers\.0"),
    (dict(method="salor", factor_sparsity=0.5, lora_rank=0), "lora_rank: method='salor'.* needs lora_rank >= 1"),
    (dict(factor_sparsity=0.5), "factor_sparsity: factor sparsity is for method='salor', not 'salr'"),
    (dict(method="salor", factor_config=0.5), "factor_config: expected a salr.FactorSparsityConfig"),
    (dict(method="lora"), "method: expected one of salr, salor"),
])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_bad_salor_conversion_arguments_of_the_deprecated_convert(kwargs, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        convert(model, criterion="magnitude", svd_rank=4, **{"lora_rank": 8, **kwargs}, progress=False)
    assert not salor_layers(model)  # refused before any layer was touched


@pytest.mark.parametrize("kwargs, match", [
    (dict(factor_sparsity=1.0), r"factor_sparsity: must be in \[0, 1\)"),
    (dict(), "factor_sparsity: SALOR needs factor_sparsity"),
    (dict(factor_pattern="2:4", lora_rank=6), "factor_pattern: 2:4 needs the LoRA rank"),
    (dict(factor_pattern="1:3"), r"factor_pattern: 1:3 needs in_features.* layer model\.layers\.0"),
    (dict(factor_sparsity=0.5, lora_rank=0), "lora_rank: SALOR sparsifies the LoRA factors, so it needs lora_rank >= 1"),
    (dict(factor_sparsity=0.5, factor_end_step=-1), "factor_end_step: expected an integer >= 0"),
])
def test_bad_salor_configs(kwargs, match):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        salr.sparsify_(model, salr.SALORConfig(criterion="magnitude", svd_rank=4, **{"lora_rank": 8, **kwargs}),
                       progress=False)
    assert not salor_layers(model)  # refused before any layer was touched


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_factor_config_and_keywords_combine_in_the_deprecated_convert():
    model = convert(tiny_model("llama"), method="salor", criterion="magnitude", sparsity=0.5, svd_rank=4, lora_rank=8,
                    progress=False, factor_config=FactorSparsityConfig(0.5, start_step=2, end_step=9),
                    factor_pattern="1:4", factor_sparsity=0.75)
    cfg = next(iter(salor_layers(model).values())).factor_config
    assert (cfg.sparsity, cfg.pattern, cfg.start_step, cfg.end_step) == (0.75, "1:4", 2, 9)


def test_skeleton_refuses_inconsistent_ranks():
    info = dict(in_features=64, out_features=64, bias=False, svd_rank=0, lora_rank=8, alpha=16.0, dropout=0.0,
                trainable_svd=False, dtype="float32", factor_config={"sparsity": 0.5}, factor_rank=8)
    with pytest.raises(ValueError, match="lora_rank, factor_rank: .* not both"):
        layer_skeleton(info)
    with pytest.raises(ValueError, match="lora_rank: SALOR .* needs lora_rank >= 1"):
        layer_skeleton({**info, "lora_rank": 0, "factor_rank": 0})


# ------------------------------------------------------------------------------------------ CLI

def test_cli_finetune_salor_end_to_end(tmp_path, monkeypatch):
    """`salr finetune --method salor` on a tiny model (steps.load swapped for it): the merged model
    on disk holds BM8x8 factors at the requested pattern and reloads to the same perplexity."""
    from salr import cli
    from salr.cli import assets, steps

    tokens = token_ids(1, 3000, seed=3).reshape(-1)
    splits = assets.TextSplits(tokens[:2400], tokens[2400:])
    monkeypatch.setattr(steps, "load", lambda *_a, **_k: (tiny_model("llama"), None, splits))
    out = tmp_path / "run"
    code = cli.main(["finetune", "--method", "salor", "--factor-pattern", "2:4", "--criterion", "magnitude",
                     "--svd-rank", "4", "--lora-rank", "8", "--steps", "4", "--batch-size", "2", "--warmup", "1",
                     "--train-seq-len", "16", "--seq-len", "32", "--eval-windows", "4", "--calib-windows", "2",
                     "--out", str(out), "--threads", "1"])
    assert code == 0
    model = salr.load(out / "model")
    layers = salor_layers(model)
    assert len(layers) == 14
    for layer in layers.values():
        assert layer.factor_rank == 8 and layer.factor_config.pattern == "2:4"
        assert torch.all((layer.sparse_factors.a.to_dense() != 0).reshape(-1, 4).sum(1) <= 2)


def test_cli_refuses_factor_options_for_other_methods_and_bad_patterns(tmp_path, capsys):
    from salr import cli

    assert cli.main(["finetune", "--method", "salr", "--factor-sparsity", "0.5", "--out", str(tmp_path / "a")]) == 2
    assert "--factor-sparsity / --factor-pattern: only for --method salor" in capsys.readouterr().err
    assert cli.main(["finetune", "--method", "salor", "--factor-pattern", "4:2", "--out", str(tmp_path / "b")]) == 2
    assert "factor_pattern: '4:2' needs 0 < N < M" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--method", "salor", "--factor-sparsity", "1.5"])
    assert "must be in [0, 1)" in capsys.readouterr().err


def test_on_step_must_be_callable():
    model = converted()
    with pytest.raises(ValueError, match="on_step: expected a callable"):
        train(model, TokenWindows(token_ids(1, 200).reshape(-1), 16), TrainConfig(steps=1, **FAST), on_step=[3])


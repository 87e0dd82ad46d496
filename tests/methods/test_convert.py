"""Whole-model SALR on tiny random Llama, OPT and GPT-2 models built from configs: sequential
calibration, conversion, exact per-layer sparsity, trainable set, save/load, size on disk, errors.

The conversions go through the deprecated keyword wrapper ``salr.convert.convert`` (which builds a
SALRConfig and calls ``salr.sparsify_``), so they test both; its DeprecationWarning is expected here."""

from __future__ import annotations

import copy

import pytest
import torch
from salr_helpers import TINY_VOCAB, tiny_model, token_ids

import salr
from salr.prune.calibration import LinearStats, run_sequential
from salr.io.saved_model import load, save
from salr.methods.convert import convert
from salr.methods.salr.model import prune_model, salr_layers
from salr.nn.models import block_linears, find_blocks, linear_dims, weight_view
from salr.methods.salr.layer import SALRLinear

pytest.importorskip("transformers", reason="transformers is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore:salr.convert.convert:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]

KINDS = ["llama", "opt", "gpt2"]
LINEARS_PER_BLOCK = {"llama": 7, "opt": 6, "gpt2": 4}


def _hooked_stats(model, ids, block_index):
    """Input statistics of one block's linears from ordinary full forwards (the reference)."""
    linears = dict(block_linears(model)[block_index][1])
    stats = {n: LinearStats(linear_dims(m)[1]) for n, m in linears.items()}
    handles = [m.register_forward_hook(lambda _m, a, _o, s=stats[n]: s.add(a[0])) for n, m in linears.items()]
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i:i + 1])
    for h in handles:
        h.remove()
    return stats


@pytest.mark.parametrize("kind", KINDS)
def test_sequential_calibration_sees_the_modified_previous_blocks(kind):
    """Block l's statistics must equal those of a full forward through blocks 0..l−1 as already
    modified (here: every weight halved), with block l itself still untouched."""
    model = tiny_model(kind, layers=3)
    reference = copy.deepcopy(model)
    ids = token_ids(3, 16)
    seen = {}

    def on_block(index, _block, linears, stats):
        seen[index] = {n: s.sq_sum.clone() for n, s in stats.items()}
        assert all(s.tokens == 3 * 16 for s in stats.values())
        for lin in linears.values():
            lin.weight.data.mul_(0.5)

    run_sequential(model, ids, on_block, progress=False)
    for index in range(3):
        expected = _hooked_stats(reference, ids, index)
        assert seen[index].keys() == expected.keys() and len(expected) == LINEARS_PER_BLOCK[kind]
        for name, sq in seen[index].items():
            assert torch.allclose(sq, expected[name].sq_sum, rtol=1e-4, atol=1e-5), (index, name)
        for lin in dict(block_linears(reference)[index][1]).values():
            lin.weight.data.mul_(0.5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_convert_end_to_end(kind, criterion):
    model = tiny_model(kind)
    dense = copy.deepcopy(model)
    ids = token_ids(4, 24)
    convert(model, sparsity=0.5, criterion=criterion, group="row", svd_rank=8, lora_rank=4, calibration=ids,
            progress=False)
    layers = salr_layers(model)
    assert len(layers) == 2 * LINEARS_PER_BLOCK[kind]
    for name, module in layers.items():
        per_row = (module.base_dense() == 0).sum(1)
        assert torch.all(per_row == module.in_features // 2), name
        assert module.svd_rank == 8 and module.lora_rank == 4
    assert all(not linears for _, linears in block_linears(model)), "no dense linear left in the blocks"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    assert len(trainable) == 2 * len(layers)
    with torch.no_grad():
        ref = dense(ids).logits
        out = model(ids).logits
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.5, rel
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable


def test_svd_residual_lowers_the_output_error():
    ids = token_ids(8, 32)
    dense = tiny_model("llama", hidden=128)
    with torch.no_grad():
        ref = dense(ids).logits
    errors = {}
    for name, kwargs in {"magnitude": dict(criterion="magnitude"), "wanda": dict(criterion="wanda"),
                         "wanda+svd": dict(criterion="wanda", svd_rank=32)}.items():
        model = copy.deepcopy(dense)
        convert(model, calibration=ids, sparsity=0.6, lora_rank=0, progress=False,
                **{"svd_rank": 0, **kwargs})
        with torch.no_grad():
            errors[name] = ((model(ids).logits - ref).norm() / ref.norm()).item()
    assert errors["wanda+svd"] < errors["wanda"], errors


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_end_to_end(pattern):
    n, m = map(int, pattern.split(":"))
    model = tiny_model("llama")
    convert(model, pattern=pattern, sparsity=None, criterion="wanda", svd_rank=0, lora_rank=0,
            calibration=token_ids(2, 16), progress=False)
    for module in salr_layers(model).values():
        nonzero = module.base_dense() != 0
        assert torch.all(nonzero.reshape(module.out_features, -1, m).sum(-1) <= n)


def test_per_block_and_per_layer_sparsity():
    model = tiny_model("llama", layers=3)
    convert(model, sparsity=[0.2, 0.5, 0.8], criterion="magnitude", group="layer", svd_rank=0, lora_rank=0,
            progress=False)
    for name, module in salr_layers(model).items():
        block = int(name.split(".")[2])
        expected = [0.2, 0.5, 0.8][block]
        assert module.sparsity == pytest.approx(expected, abs=1 / (module.in_features * module.out_features))
    model = tiny_model("llama", layers=1)
    names = [n for n, _ in block_linears(model)[0][1].items()]
    ratios = {n: 0.1 * (i + 1) for i, n in enumerate(names)}
    convert(model, sparsity=ratios, criterion="magnitude", svd_rank=0, lora_rank=0, progress=False)
    for name, module in salr_layers(model).items():
        assert module.sparsity == pytest.approx(ratios[name], abs=1 / (module.in_features * module.out_features))


def test_target_modules_and_dense_head():
    model = tiny_model("llama")
    convert(model, target_modules=["q_proj", "down_proj"], criterion="magnitude", svd_rank=4, lora_rank=2,
            progress=False)
    assert sorted({n.split(".")[-1] for n in salr_layers(model)}) == ["down_proj", "q_proj"]
    assert isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.model.layers[0].self_attn.k_proj,
                                                                     torch.nn.Linear)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact(kind, tmp_path):
    model = tiny_model(kind)
    ids = token_ids(2, 16)
    convert(model, sparsity=0.5, criterion="wanda", svd_rank=4, lora_rank=4, calibration=ids, progress=False)
    with torch.no_grad():
        for m in salr_layers(model).values():
            m.lora_b.normal_()  # as if trained
    save(model, tmp_path / "m")
    loaded = load(tmp_path / "m")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    assert loaded.salr_config == model.salr_config
    if kind == "opt":  # tied embeddings stay tied
        assert loaded.lm_head.weight.data_ptr() == loaded.model.decoder.embed_tokens.weight.data_ptr()
    with pytest.raises(ValueError, match="directory: .* exists and is not empty"):
        save(model, tmp_path / "m")
    save(model, tmp_path / "m", overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directories left"


def test_merged_model_round_trip(tmp_path):
    model = tiny_model("llama")
    convert(model, criterion="magnitude", svd_rank=4, lora_rank=4, progress=False)
    ids = token_ids(2, 16)
    with torch.no_grad():
        for m in salr_layers(model).values():
            m.lora_b.normal_(0, 0.05)
        before = model(ids).logits
        for m in salr_layers(model).values():
            m.merge()
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4)
    save(model, tmp_path / "merged")
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "merged")(ids).logits, after)


def test_compressed_file_is_smaller(tmp_path):
    """50 % bf16 with no adapters: ≥ 1.7× smaller on disk than the dense bf16 model."""
    from safetensors.torch import save_model

    dense = tiny_model("llama", hidden=256, vocab=64).to(torch.bfloat16)
    save_model(dense, str(tmp_path / "dense.safetensors"))
    convert(dense, sparsity=0.5, criterion="magnitude", svd_rank=0, lora_rank=0, dtype="bfloat16", progress=False)
    path = save(dense, tmp_path / "salr")
    ratio = (tmp_path / "dense.safetensors").stat().st_size / (path / "salr-model.safetensors").stat().st_size
    assert ratio >= 1.7, ratio


def test_prune_model_in_place():
    model = tiny_model("gpt2")
    report = prune_model(model, sparsity=0.5, criterion="wanda", calibration=token_ids(2, 16), progress=False)
    assert len(report) == 8 and all(r == pytest.approx(0.5) for r in report.values())
    for _, linears in block_linears(model):
        for lin in linears.values():
            assert type(lin).__name__ == "Conv1D"
            w = weight_view(lin)
            assert torch.all((w == 0).sum(1) == w.shape[1] // 2)


def test_bf16_model_converts_and_runs():
    model = tiny_model("llama").to(torch.bfloat16)
    convert(model, sparsity=0.5, criterion="sparsegpt", svd_rank=4, lora_rank=2, calibration=token_ids(2, 16),
            progress=False)
    assert all(m.values.dtype == torch.bfloat16 for m in salr_layers(model).values())
    with torch.no_grad():
        assert torch.isfinite(model(token_ids(1, 8)).logits.float()).all()


# ------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("calibration,match", [
    (token_ids(2, 8)[0], r"calibration: expected shape \[n_windows, seq_len\]"),
    (token_ids(2, 8).unsqueeze(0), r"calibration: expected shape \[n_windows, seq_len\]"),
    (token_ids(2, 8).float(), "calibration: token ids must be integers"),
    (token_ids(2, 8) + TINY_VOCAB, r"calibration: token ids must lie in \[0, 96\)"),
    (-token_ids(2, 8) - 1, r"calibration: token ids must lie in \[0, 96\)"),
    (torch.zeros(0, 8, dtype=torch.long), "calibration: needs at least one window"),
    ([torch.arange(4), torch.arange(5)], "calibration: windows must share one length"),
    ("some text", "calibration: expected token ids"),
])
def test_bad_calibration(calibration, match):
    with pytest.raises(ValueError, match=match):
        convert(tiny_model("llama"), criterion="wanda", svd_rank=4, lora_rank=4, calibration=calibration,
                progress=False)


def test_bad_conversion_arguments():
    model = tiny_model("llama")
    small = dict(svd_rank=4, lora_rank=4, progress=False)
    with pytest.raises(ValueError, match="calibration: criterion 'sparsegpt' needs calibration token ids"):
        convert(model, criterion="sparsegpt", **small)
    with pytest.raises(ValueError, match=r"svd_rank \(layer model.layers.0.self_attn.k_proj\): must be in .* = \[1, 32\] .*got 40"):
        convert(model, criterion="magnitude", svd_rank=40, lora_rank=4, progress=False)
    with pytest.raises(ValueError, match="target_modules: \\['qproj'\\] match no linear layer"):
        convert(model, criterion="magnitude", target_modules=["qproj"], **small)
    with pytest.raises(ValueError, match="sparsity: a per-block vector needs one ratio per decoder block \\(2\\)"):
        convert(model, criterion="magnitude", sparsity=[0.5], **small)
    with pytest.raises(ValueError, match="sparsity: a per-layer mapping must name exactly the target linears"):
        convert(model, criterion="magnitude", sparsity={"model.layers.0.mlp.up_proj": 0.5}, **small)
    with pytest.raises(ValueError, match="method: expected one of salr"):
        convert(model, method="losa", **small)
    with pytest.raises(ValueError, match="config: expected a salr.SALRConfig"):
        convert(model, {"sparsity": 0.5}, **small)
    assert not salr_layers(model), "a refused conversion leaves the model untouched"


def test_unknown_architecture():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4)])

    with pytest.raises(ValueError, match="model: unknown architecture Odd"):
        convert(Odd(), criterion="magnitude", svd_rank=2, lora_rank=2, progress=False)
    with pytest.raises(ValueError, match="model: unknown architecture Odd"):
        find_blocks(Odd())


def test_load_rejects_other_directories(tmp_path):
    (tmp_path / "config.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="config.json: not a saved salr model"):
        load(tmp_path)
    with pytest.raises(ValueError, match="config.json: cannot read the JSON file"):
        load(tmp_path / "missing")


def test_public_api():
    for name in ("sparsify_", "merge_", "save", "load", "prune_model", "SALRConfig", "SALORConfig", "SALRLinear",
                 "SALORLinear", "perplexity", "losa"):
        assert hasattr(salr, name), name
    assert salr.SALRLinear is SALRLinear
    model = salr.sparsify_(tiny_model("llama"), salr.SALRConfig(criterion="magnitude", svd_rank=2, lora_rank=2),
                           progress=False)
    assert len(salr_layers(model)) == 14
    assert salr.merge_(model) == 14
    assert all(layer.lora_rank == 0 and layer.svd_rank == 4 for layer in salr_layers(model).values())

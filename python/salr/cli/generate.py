"""``salr generate``: greedy text from a model made by salr (or a dense one), streamed as it decodes.

    salr generate --model runs/demo/model --prompt "The history of the city" --max-new-tokens 64
    salr generate --model smollm2 --chat --prompt "What is a sparse matrix?"

The model is a directory written by salr (format 2, verified on load), a dense Hugging Face
directory, or 'smollm2'. ``--chat`` wraps the prompt in the tokenizer's chat template (instruct
models). The text goes to stdout through transformers' TextStreamer; tokens/s goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from salr.cli import assets
from salr.io import saved_model


def resolve(name_or_dir: str) -> Path:
    """The model directory of 'smollm2' or a local path; ValueError naming it when it is not one."""
    if name_or_dir != assets.SMOLLM2 and not Path(name_or_dir).is_dir():
        raise ValueError(f"model: {name_or_dir!r} is not a directory (nor 'smollm2')")
    return assets.resolve_model_dir(name_or_dir)


def load_model(name_or_dir: str) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a salr-saved directory, a dense HF directory or 'smollm2'.
    ValueError (one line, naming the path) for a missing directory or a salr format-1 directory."""
    from transformers import AutoTokenizer

    path = resolve(name_or_dir)
    if not saved_model.is_saved_model(path):
        return assets.load_model(path)
    model = saved_model.load(path)  # verifies every file; refuses format 1 with a message that says what to do
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)  # saved_model.save writes it beside the weights


def prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> torch.Tensor:
    """[1, T] token ids of `prompt`, wrapped in the chat template (with the assistant's turn opened)
    when `chat`."""
    if not prompt.strip():
        raise ValueError("prompt: empty; give the text to continue")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat: this model's tokenizer has no chat template; drop --chat")
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
        ids = encoded["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise ValueError("prompt: tokenizes to nothing")
    return ids


@dataclass(frozen=True)
class Generated:
    ids: torch.Tensor      # [1, new_tokens]: the continuation only
    text: str
    seconds: float         # prefill + decode, wall clock

    @property
    def tokens_per_s(self) -> float:
        return self.ids.shape[1] / self.seconds if self.seconds > 0 else float("inf")


@torch.no_grad()
def generate(model: Any, tokenizer: Any, input_ids: torch.Tensor, max_new_tokens: int,
             stream: bool = True) -> Generated:
    """Greedy decoding through transformers' ``generate`` (KV cache on), the text streamed to stdout
    by a TextStreamer when `stream`."""
    from transformers import TextStreamer

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be a positive integer, got {max_new_tokens!r}")
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=max_new_tokens, streamer=streamer,
                         **({"pad_token_id": pad} if pad is not None else {}))
    seconds = time.perf_counter() - start
    new = out[:, input_ids.shape[1]:]
    return Generated(new, tokenizer.decode(new[0], skip_special_tokens=True), seconds)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be a positive integer, got {args.max_new_tokens}")
    if not args.prompt.strip():
        raise ValueError("--prompt: empty; give the text to continue")
    from transformers import AutoTokenizer

    path = resolve(args.model)
    if saved_model.is_saved_model(path):
        saved_model.read_record(path, verify=False)  # a format-1 directory is refused before anything loads
    # The prompt (and --chat's template) is checked before the weights load.
    ids = prompt_ids(AutoTokenizer.from_pretrained(path), args.prompt, args.chat)
    model, tokenizer = load_model(str(path))
    result = generate(model, tokenizer, ids, args.max_new_tokens)
    print(f"{result.ids.shape[1]} tokens in {result.seconds:.2f} s: {result.tokens_per_s:.1f} tokens/s "
          f"(greedy, prefill included, {torch.get_num_threads()} threads)", file=sys.stderr)
    return 0

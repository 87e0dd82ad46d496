"""Greedy generation and decode speed (tokens/s) of a Hugging Face causal LM, dense or salr.

Decode speed is what sparse weights buy at inference: one token at a time (M = 1 per layer), the
weights streamed once per token. `decode_speed` times only the decode steps (prefill excluded),
with the KV cache on, as the median tokens/s over repeats.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeResult:
    text: str              # the prompt's continuation
    new_tokens: int        # tokens generated per repeat
    tokens_per_s: float    # median decode tokens/s (prefill excluded)
    prefill_ms: float      # median time of the prompt's forward pass


def _prefill_and_decode(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """Greedy decode with the KV cache; returns (generated ids, prefill seconds, decode seconds)."""
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True)
    past, next_id = out.past_key_values, out.logits[:, -1:].argmax(-1)
    prefill = time.perf_counter() - start
    generated = [next_id]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=next_id, past_key_values=past, use_cache=True)
        past, next_id = out.past_key_values, out.logits[:, -1:].argmax(-1)
        generated.append(next_id)
    decode = time.perf_counter() - start
    return torch.cat(generated, dim=1), prefill, decode


@torch.no_grad()
def decode_speed(model, tokenizer, prompt: str, new_tokens: int = 32, repeats: int = 3) -> DecodeResult:
    """Greedy continuation of `prompt` and its decode tokens/s (median over `repeats`, after a warm-up)."""
    if new_tokens < 2:
        raise ValueError(f"decode_speed: new_tokens must be at least 2 (one prefill + decode steps), got {new_tokens}")
    if repeats < 1:
        raise ValueError(f"decode_speed: repeats must be positive, got {repeats}")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        if input_ids.numel() == 0:
            raise ValueError("decode_speed: the prompt tokenizes to nothing")
        _prefill_and_decode(model, input_ids, 2)  # warm-up: thread pool, allocator, first-touch
        rates, prefills, ids = [], [], None
        for _ in range(repeats):
            ids, prefill, decode = _prefill_and_decode(model, input_ids, new_tokens)
            rates.append((new_tokens - 1) / decode)
            prefills.append(prefill)
        text = tokenizer.decode(ids[0], skip_special_tokens=True)
        return DecodeResult(text, new_tokens, statistics.median(rates), statistics.median(prefills) * 1e3)
    finally:
        model.train(was_training)

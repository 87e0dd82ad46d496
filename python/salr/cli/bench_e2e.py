"""End-to-end decode benchmark (``salr bench --e2e``): a few Llama-2-7B-shaped decoder layers with
random weights, dense bf16 against the same model converted to 50% SALR, greedy ``generate``.

The dense copy is large enough (≥ 2 GB of bf16 block weights at the default 5 layers) that every
token streams its weights from DRAM, as a 7B model does. The SALR copy is the merged inference form
of what ``salr finetune`` produces: magnitude pruning (the weights are random, so no calibration),
the SVD residual adapter r = 64 and a LoRA r = 16 merged into one r = 80 adapter. Each repeat times
a whole ``model.generate(..., max_new_tokens=N, min_new_tokens=N, do_sample=False)`` of each model,
alternating, and the report gives the median tokens/s of each, their ratio, and the byte limit:
the bytes a token reads from the dense model over those it reads from the SALR one
(salr.cli.layer_report.byte_limit: block linears, adapters and lm_head).
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

import salr
from salr.methods.salr.config import SALRConfig
from salr.cli.layer_report import byte_limit

SPARSITY, SVD_RANK, LORA_RANK = 0.5, 64, 16


@dataclass(frozen=True)
class E2EShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    new_tokens: int
    prompt_tokens: int
    repeats: int


# Llama-2-7B's block shapes; the vocabulary is small so that lm_head (dense in both copies, 32000 x
# 4096 = 262 MB in a real 7B) does not dilute the block ratio: its bytes are reported separately.
FULL = E2EShape(layers=5, hidden=4096, intermediate=11008, heads=32, vocab=1024, new_tokens=64,
                prompt_tokens=8, repeats=3)
QUICK = E2EShape(layers=1, hidden=128, intermediate=344, heads=2, vocab=128, new_tokens=4,
                 prompt_tokens=4, repeats=1)


def build_dense(shape: E2EShape, seed: int = 0) -> nn.Module:
    """A randomly initialised LlamaForCausalLM in bf16 with `shape`'s dimensions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
                         num_hidden_layers=shape.layers, vocab_size=shape.vocab,
                         max_position_embeddings=max(256, shape.prompt_tokens + shape.new_tokens))
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


def to_salr(dense: nn.Module) -> nn.Module:
    """A 50% SALR copy of `dense` (magnitude, SVD r=64 + LoRA r=16, merged), the dense one kept."""
    model = copy.deepcopy(dense)
    config = SALRConfig(sparsity=SPARSITY, criterion="magnitude", svd_rank=SVD_RANK, svd_method="randomized",
                        lora_rank=LORA_RANK, dtype="bfloat16")
    salr.sparsify_(model, config, None, progress=False)
    salr.merge_(model)
    return model.eval()


def time_generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Tokens/s of one greedy generate of exactly `new_tokens` tokens (prefill included)."""
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
    seconds = time.perf_counter() - start
    if out.shape[1] != prompt.shape[1] + new_tokens:
        raise RuntimeError(f"bench --e2e: generate returned {out.shape[1] - prompt.shape[1]} tokens, not {new_tokens}")
    return new_tokens / seconds


def run_e2e(shape: E2EShape, seed: int = 0, log=print) -> dict:
    """Build both models, decode alternately, return the medians, the ratio and the byte limit."""
    start = time.perf_counter()
    dense = build_dense(shape, seed)
    sparse = to_salr(dense)
    log(f"built and converted {shape.layers} layers in {time.perf_counter() - start:.0f} s")
    limit = byte_limit(dense, sparse)
    prompt = torch.randint(1, shape.vocab, (1, shape.prompt_tokens), generator=torch.Generator().manual_seed(seed))
    for model in (dense, sparse):
        time_generate(model, prompt, 2)  # warm-up: thread pool, allocator, first touch
    rates = {"dense": [], "salr": []}
    for repeat in range(shape.repeats):
        for name, model in (("dense", dense), ("salr", sparse)):
            rates[name].append(time_generate(model, prompt, shape.new_tokens))
        log(f"repeat {repeat + 1}/{shape.repeats}: dense {rates['dense'][-1]:.2f} tok/s, "
            f"salr {rates['salr'][-1]:.2f} tok/s")
    dense_rate, salr_rate = statistics.median(rates["dense"]), statistics.median(rates["salr"])
    return {"shape": asdict(shape), "dense_tok_s": dense_rate, "salr_tok_s": salr_rate,
            "ratio": salr_rate / dense_rate, "byte_limit": limit["limit"],
            "dense_bytes": limit["dense"], "salr_bytes": limit["salr"], "rates": rates}


def report_lines(r: dict) -> list[str]:
    s, mb = r["shape"], 1e6
    rows = []
    for name in ("dense", "salr"):
        b, rate = r[f"{name}_bytes"], r[f"{name}_tok_s"]
        rows.append(f"| {name} | {rate:.2f} | {b['block_linears'] / mb:.0f} MB | {b['adapters'] / mb:.0f} MB | "
                    f"{b['lm_head'] / mb:.1f} MB | {b['total'] / mb:.0f} MB | {rate * b['total'] / 1e9:.1f} |")
    return [
        f"{s['layers']} decoder layers, hidden {s['hidden']}, intermediate {s['intermediate']}, {s['heads']} heads, "
        f"vocab {s['vocab']}; {SPARSITY:.0%} SALR (magnitude, SVD r={SVD_RANK} + LoRA r={LORA_RANK} merged), bf16; "
        f"greedy generate of {s['new_tokens']} tokens after a {s['prompt_tokens']}-token prompt, "
        f"{s['repeats']} alternating repeats, medians; {torch.get_num_threads()} threads, salr CPU path {salr.cpu_isa()}",
        "",
        "| model | tok/s | bytes/token: block bases | adapters | lm_head | total | GB/s streamed |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"salr / dense: **{r['ratio']:.2f}×**, byte limit {r['byte_limit']:.2f}× ({r['ratio'] / r['byte_limit']:.0%} of it)",
    ]

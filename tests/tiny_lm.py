"""Test-only models for the training tests: a tiny random Llama with a LoRA-like adapter.

Kept independent of salr's adapter modules so the training loop is tested on its own.
"""

from __future__ import annotations

import pytest
import torch

VOCAB = 128


class TinyLoRA(torch.nn.Module):
    """y = base(x) + scale * (x A^T) B^T with the base frozen; only A and B train."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4, scale: float = 2.0) -> None:
        super().__init__()
        self.base = base
        self.scale = scale
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features) / base.in_features ** 0.5)
        # Non-zero B (unlike the usual zero init) so both factors get gradients from step one.
        self.lora_b = torch.nn.Parameter(torch.randn(base.out_features, rank) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.lora_a.t()) @ self.lora_b.t()


def make_tiny_lm(seed: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
                 dropout: float = 0.0) -> torch.nn.Module:
    """A 2-layer, hidden-64, vocab-128 LlamaForCausalLM, frozen, with TinyLoRA on ``targets``.

    dropout > 0 puts attention dropout in, so the RNG stream matters to the loss (resume tests).
    """
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=False,
                                      attention_dropout=dropout)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, torch.nn.Linear):
                setattr(module, child_name, TinyLoRA(child))
    model.train()
    return model


def make_tokens(n: int = 4000, seed: int = 1) -> torch.Tensor:
    """A learnable token stream: a noisy repeating pattern, so the loss visibly drops in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, VOCAB, (37,), generator=gen)
    tokens = pattern.repeat(n // 37 + 1)[:n].clone()
    noise = torch.rand(n, generator=gen) < 0.1
    tokens[noise] = torch.randint(0, VOCAB, (int(noise.sum()),), generator=gen)
    return tokens


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

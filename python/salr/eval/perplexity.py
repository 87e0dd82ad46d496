"""Perplexity of a causal LM on token windows (design.md §5).

``perplexity = exp(mean NLL)``, the mean taken over every predicted token of every window (each
window predicts its tokens 2..L from the ones before; windows are independent, no carried context).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from salr.prune.calibration import check_calibration
from salr.nn.models import model_device, vocab_size


@torch.no_grad()
def mean_nll(model: nn.Module, windows: Any, *, batch_size: int = 1, progress: bool = True,
             desc: str = "perplexity") -> float:
    """Mean next-token negative log-likelihood (nats) over all windows ([n, seq_len] token ids)."""
    ids = check_calibration(windows, vocab_size(model), name="windows")
    if ids.shape[1] < 2:
        raise ValueError(f"windows: need at least 2 tokens per window to predict one, got {ids.shape[1]}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        bar = tqdm(range(0, ids.shape[0], batch_size), desc=desc, unit="batch", disable=not progress)
        for start in bar:
            batch = ids[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                  batch[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += batch[:, 1:].numel()
            bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    finally:
        model.train(was_training)
    return total / count


def perplexity(model: nn.Module, windows: Any, *, batch_size: int = 1, progress: bool = True,
               desc: str = "perplexity") -> float:
    """exp(mean NLL) of `model` on the windows (torch.no_grad, eval mode, tqdm progress)."""
    return math.exp(mean_nll(model, windows, batch_size=batch_size, progress=progress, desc=desc))

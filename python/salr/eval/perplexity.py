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
def _summed_nll(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                batch_size: int, progress: bool, desc: str) -> tuple[float, int]:
    """(summed next-token NLL in nats, tokens scored) over the rows of [n, seq_len] ids: label t (when
    not -100) is predicted from the tokens before t. Eval mode, batch_size rows at a time, tqdm."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        bar = tqdm(range(0, ids.shape[0], batch_size), desc=desc, unit="batch", disable=not progress)
        for start in bar:
            rows = slice(start, start + batch_size)
            mask = {} if attention_mask is None else {"attention_mask": attention_mask[rows].to(device)}
            logits = model(input_ids=ids[rows].to(device), use_cache=False, **mask).logits
            target = labels[rows, 1:].to(device)
            total += F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
            if count:
                bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    finally:
        model.train(was_training)
    return total, count


def mean_nll(model: nn.Module, windows: Any, *, batch_size: int = 1, progress: bool = True,
             desc: str = "perplexity") -> float:
    """Mean next-token negative log-likelihood (nats) over all windows ([n, seq_len] token ids)."""
    ids = check_calibration(windows, vocab_size(model), name="windows")
    if ids.shape[1] < 2:
        raise ValueError(f"windows: need at least 2 tokens per window to predict one, got {ids.shape[1]}")
    total, count = _summed_nll(model, ids, ids, None, batch_size, progress, desc)
    return total / count


def perplexity(model: nn.Module, windows: Any, *, batch_size: int = 1, progress: bool = True,
               desc: str = "perplexity") -> float:
    """exp(mean NLL) of `model` on the windows (torch.no_grad, eval mode, tqdm progress)."""
    return math.exp(mean_nll(model, windows, batch_size=batch_size, progress=progress, desc=desc))


def completion_nll(model: nn.Module, batch: dict[str, torch.Tensor], *, batch_size: int = 1, progress: bool = True,
                   desc: str = "completion perplexity") -> tuple[float, int]:
    """(summed NLL in nats, number of tokens) over the labelled tokens of a padded chat batch.

    batch: {"input_ids", "labels", "attention_mask"} [n, seq_len] as
    :class:`salr.train.chat_data.ChatExamples` makes them; labels -100 mark the prompt and padding
    tokens, which are not scored (label t is predicted from the tokens before t)."""
    if not isinstance(batch, dict) or not all(isinstance(batch.get(k), torch.Tensor) and batch[k].dim() == 2
                                              for k in ("input_ids", "labels", "attention_mask")):
        raise ValueError("completion_nll: batch must be a dict of [n, seq_len] input_ids, labels, attention_mask")
    ids = check_calibration(batch["input_ids"], vocab_size(model), name="batch['input_ids']")
    labels, mask = batch["labels"], batch["attention_mask"]
    if labels.shape != ids.shape or mask.shape != ids.shape:
        raise ValueError(f"completion_nll: batch's labels {tuple(labels.shape)} and attention_mask "
                         f"{tuple(mask.shape)} must have the input_ids' shape {tuple(ids.shape)}")
    total, count = _summed_nll(model, ids, labels, mask, batch_size, progress, desc)
    if count == 0:
        raise ValueError("completion_nll: batch has no labelled (completion) token to score")
    return total, count


def completion_perplexity(model: nn.Module, batch: dict[str, torch.Tensor], *, batch_size: int = 1,
                          progress: bool = True, desc: str = "completion perplexity") -> float:
    """exp(mean NLL over the completion tokens) of a chat batch (see :func:`completion_nll`)."""
    total, count = completion_nll(model, batch, batch_size=batch_size, progress=progress, desc=desc)
    return math.exp(total / count)

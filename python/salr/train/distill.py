"""Distillation from the dense model while the sparse student's adapters train.

The teacher is a frozen copy of the model taken before pruning (bf16 is fine: its outputs are only
targets); :func:`train` runs it under no_grad on the same micro-batch as the student, and the step's
loss becomes

    (1 - w) * CE  +  w * T^2 * KL(softmax(teacher / T) || softmax(student / T))  +  h * NMSE(hidden)

with w = ``TrainConfig.distill_weight``, T = ``distill_temperature`` (T^2 keeps the gradient scale of
the soft term independent of T, Hinton et al. 2015) and h = ``distill_hidden_weight``: the per-layer
hidden-state matching of SquareHead (Kurtic et al. 2023), ||h_s - h_t||^2 / ||h_t||^2 per decoder
layer, averaged over the layers so h does not scale with depth. SquareHead normalizes by the whole
batch; here each token is normalized by its own ||h_t||^2, so the term is a plain mean over tokens
like the KL and the cross-entropy: split over ranks or micro-batches, it averages back to the
global-batch value (a ratio of batch sums would not). KL and NMSE are means over the real tokens
(attention_mask), computed in at least float32 whatever the autocast dtype.

Under DDP / FSDP the teacher is not wrapped: each rank holds its own full copy and runs it on its own
slice of the batch, so the distillation terms are per-rank means exactly like the cross-entropy, and
the gradient average over ranks is the gradient of the global-batch loss.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F

from salr._checks import check_module
from salr.train.config import TrainConfig

# The batch entries the teacher needs (labels are left out: its cross-entropy is never used).
_TEACHER_INPUTS = ("input_ids", "attention_mask", "position_ids")


def frozen_teacher(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A frozen, eval-mode copy of ``model`` to distil from (cast to ``dtype`` if given, e.g. bf16 to
    halve its memory); take it before the model is pruned in place."""
    teacher = copy.deepcopy(check_module(model, "frozen_teacher: model"))
    if dtype is not None:
        teacher.to(dtype)
    return teacher.requires_grad_(False).eval()


def check_teacher(teacher: Any, config: TrainConfig, student: torch.nn.Module,
                  device: torch.device) -> torch.nn.Module | None:
    """The teacher train() runs, or None when the config has no distillation term (a teacher passed
    with distill_weight = distill_hidden_weight = 0 is not run: the loss is exactly the plain one)."""
    if teacher is None:
        if config.distilling:
            raise ValueError("train: TrainConfig.distill_weight / distill_hidden_weight > 0 needs a teacher "
                             "(train(..., teacher=frozen_teacher(dense_model)))")
        return None
    check_module(teacher, "train: teacher")
    if not config.distilling:
        return None
    if teacher is student:
        raise ValueError("train: teacher is the student itself; pass a frozen copy taken before pruning")
    where = next(iter(teacher.parameters()), torch.empty(0, device=device)).device
    if where != device:
        raise ValueError(f"train: teacher is on {where}, the student trains on {device}; move it there")
    return teacher.eval()  # dropout off: the targets must not be noisy


def student_kwargs(config: TrainConfig, teacher: torch.nn.Module | None) -> dict[str, Any]:
    """Extra keyword arguments of the student's forward: hidden states when they are matched."""
    return {"output_hidden_states": True} if teacher is not None and config.distill_hidden_weight > 0 else {}


def _field(output: Any, name: str) -> Any:
    value = getattr(output, name, None)
    if value is None and isinstance(output, dict):
        value = output.get(name)
    if value is None:
        raise ValueError(f"distillation: the model output has no .{name} (a Hugging Face causal LM returns it)")
    return value


def _token_mask(batch: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if not isinstance(mask, torch.Tensor):
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.to(like.device).bool()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of a [B, S] per-token value over the tokens the mask keeps (all without a mask)."""
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
             mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the (masked) tokens of KL(softmax(teacher / T) || softmax(student / T)), [B, S, V] logits."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit_kl: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ (the teacher must share the tokenizer)")
    dtype = _compute_dtype(student_logits)
    log_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return _token_mean(per_token, mask)


def hidden_nmse(student_hidden: Any, teacher_hidden: Any, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized MSE of the hidden states, ||h_s - h_t||^2 / ||h_t||^2 per token, averaged over the
    (masked) tokens and the decoder layers (the embedding output, hidden_states[0], is left out:
    pruning never changes it)."""
    student_hidden, teacher_hidden = tuple(student_hidden)[1:], tuple(teacher_hidden)[1:]
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise ValueError(f"hidden_nmse: the student has {len(student_hidden)} layer outputs, the teacher "
                         f"{len(teacher_hidden)} (distil from the same architecture)")
    per_token = []
    for hs, ht in zip(student_hidden, teacher_hidden):
        dtype = _compute_dtype(hs)
        ht = ht.to(dtype)
        error = (hs.to(dtype) - ht).square().sum(-1)
        per_token.append(error / ht.square().sum(-1).clamp_min(torch.finfo(dtype).tiny))
    per_token = torch.stack(per_token).mean(0)  # [B, S], averaged over the layers
    return _token_mean(per_token, mask)


def blend(ce_loss: torch.Tensor, student_output: Any, teacher: torch.nn.Module | None, batch: dict[str, Any],
          config: TrainConfig) -> torch.Tensor:
    """The step's loss: ``ce_loss`` itself without a teacher, else the distillation mix (module doc)."""
    if teacher is None:
        return ce_loss
    want_hidden = config.distill_hidden_weight > 0
    with torch.no_grad():
        target = teacher(**{k: batch[k] for k in _TEACHER_INPUTS if k in batch},
                         **({"output_hidden_states": True} if want_hidden else {}))
    logits = _field(student_output, "logits")
    mask = _token_mask(batch, logits)
    w, temperature = config.distill_weight, config.distill_temperature
    loss = (1 - w) * ce_loss.to(_compute_dtype(ce_loss))
    if w > 0:
        loss = loss + w * temperature ** 2 * logit_kl(logits, _field(target, "logits"), temperature, mask)
    if want_hidden:
        loss = loss + config.distill_hidden_weight * hidden_nmse(_field(student_output, "hidden_states"),
                                                                 _field(target, "hidden_states"), mask)
    return loss


@torch.no_grad()
def kl_to_teacher(student: torch.nn.Module, teacher: torch.nn.Module, input_ids: torch.Tensor,
                  temperature: float = 1.0) -> float:
    """KL(teacher || student) per token on ``input_ids`` (both models called in their current mode),
    e.g. to follow how close the fine-tuned student gets to the dense model."""
    return float(logit_kl(_field(student(input_ids=input_ids), "logits"),
                          _field(teacher(input_ids=input_ids), "logits"), temperature))

"""The fine-tuning settings (:class:`TrainConfig`, validated on construction) and the learning-rate
schedule (:func:`lr_factor`: warmup, then cosine / linear / constant)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from salr._checks import check_int

SCHEDULES = ("cosine", "linear", "constant")
PARALLEL = ("ddp", "fsdp")
StepCallback = Callable[[torch.nn.Module, int], Any]  # train(on_step=...): fn(model, finished_steps)
AUTOCAST_CHOICES = ("auto", "bfloat16", None)
# Config fields that change the trajectory: a resume with other values is no longer "the same run".
TRAJECTORY_FIELDS = ("lr", "weight_decay", "warmup_steps", "schedule", "min_lr_ratio", "batch_size",
                      "grad_accum", "max_grad_norm", "seed", "betas", "eps", "distill_weight",
                      "distill_temperature", "distill_hidden_weight")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`; every field is checked here (ValueError names it).

    batch_size is the *global* micro-batch (rows per forward, summed over ranks); one optimizer
    step sees batch_size * grad_accum rows. eval_every / save_every = 0: only at the end.
    autocast_dtype: "auto" = bf16 on a CUDA device that supports it, off elsewhere (CPU autocast
    would hand bf16 activations to modules holding fp32 weights); "bfloat16" forces it; None = off.
    parallel: with more than one rank, "ddp" replicates the model, "fsdp" shards its parameters
    (FSDP2, one unit per decoder block + the root); ignored in a single process.
    distill_weight w, distill_temperature T, distill_hidden_weight h: distillation from a frozen
    teacher passed to train() (:mod:`salr.train.distill`): loss = (1-w)*CE + w*T^2*KL(teacher || student)
    + h*(normalized hidden-state MSE); w = h = 0 (the default) is the plain loss, no teacher needed.
    """

    lr: float = 2e-4
    weight_decay: float = 0.0
    steps: int = 100
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    grad_checkpointing: bool = False
    autocast_dtype: str | None = "auto"
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    log_every: int = 1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    progress: bool = True
    ddp_find_unused_parameters: bool = False
    parallel: str = "ddp"
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    distill_hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"TrainConfig.{field}: {why} (got {getattr(self, field)!r})")

        def check_int(field: str, minimum: int) -> None:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise bad(field, f"must be an integer >= {minimum}")

        def check_float(field: str, minimum: float, maximum: float = math.inf, open_min: bool = False) -> None:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(field, "must be a finite number")
            if value < minimum or (open_min and value == minimum) or value > maximum:
                lo = f"> {minimum}" if open_min else f">= {minimum}"
                raise bad(field, f"must be {lo}" + (f" and <= {maximum}" if maximum != math.inf else ""))

        check_float("lr", 0.0, open_min=True)
        check_float("weight_decay", 0.0)
        check_float("min_lr_ratio", 0.0, 1.0)
        check_float("eps", 0.0, open_min=True)
        check_float("distill_weight", 0.0, 1.0)
        check_float("distill_temperature", 0.0, open_min=True)
        check_float("distill_hidden_weight", 0.0)
        check_int("steps", 1)
        check_int("warmup_steps", 0)
        check_int("batch_size", 1)
        check_int("grad_accum", 1)
        check_int("eval_every", 0)
        check_int("save_every", 0)
        check_int("keep_checkpoints", 0)
        check_int("seed", 0)
        check_int("log_every", 1)
        if self.warmup_steps > self.steps:
            raise bad("warmup_steps", f"must be <= steps ({self.steps})")
        if self.schedule not in SCHEDULES:
            raise bad("schedule", f"must be one of {', '.join(SCHEDULES)}")
        if self.parallel not in PARALLEL:
            raise bad("parallel", f"must be one of {', '.join(PARALLEL)}")
        if self.max_grad_norm is not None:
            check_float("max_grad_norm", 0.0, open_min=True)
        if self.autocast_dtype in ("bf16", torch.bfloat16):
            self.autocast_dtype = "bfloat16"
        if self.autocast_dtype not in AUTOCAST_CHOICES:
            raise bad("autocast_dtype", "must be 'auto', 'bfloat16' or None")
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else None
        if betas is None or len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise bad("betas", "must be two numbers in [0, 1)")
        self.betas = (float(betas[0]), float(betas[1]))
        for flag in ("grad_checkpointing", "progress", "ddp_find_unused_parameters"):
            if not isinstance(getattr(self, flag), bool):
                raise bad(flag, "must be True or False")

    @property
    def distilling(self) -> bool:
        """Whether the loss has a teacher term (train() then needs a teacher)."""
        return self.distill_weight > 0 or self.distill_hidden_weight > 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# ----------------------------------------------------------------------------- schedule

def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of config.lr for the optimizer update number ``step`` (0-based).

    Warmup ramps linearly so the first update already moves (1/warmup of lr) and update number
    warmup-1 uses the full lr; afterwards cosine / linear decay from 1 towards min_lr_ratio over the
    remaining steps (reached one step after the last update), or constant.
    """
    check_int(step, "step")
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    progress = min(1.0, progress)
    floor = config.min_lr_ratio
    if config.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)  # linear

"""The settings of :func:`salr.losa.run` (:class:`LoSAConfig`, validated on construction) and its
per-round report."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from salr.losa.schedule import check_final_share, check_rounds, split_steps
from salr.prune.owl import DEFAULT_LAMBDA, DEFAULT_M, check_owl_params
from salr.train.config import TrainConfig

LAYERWISE = ("rmi", "uniform", "owl")
RANK_ALLOCATION = ("error", "uniform")


@dataclass
class LoSAConfig:
    """Settings of :func:`run`; every field is checked here (ValueError names it).

    sparsity: the final mean sparsity S in [0, 1). rounds: T >= 1. total_steps: fine-tuning steps
    over all rounds (0 = prune only); final_share: f in (0, 1) gives the last round (the recovery at
    the target sparsity) round(f·total_steps) and the other rounds the rest evenly, None splits them
    evenly (see :func:`salr.losa.schedule.split_steps`; 0.6 beat the even split on SmolLM2-135M at 50 %
    and 70 %, bench/RESULTS.md). mean_rank: R̄, the mean LoRA rank per block (the
    budget is R̄·L); r_max: the largest rank a block may get (>= mean_rank). lora_alpha: the update
    scale is lora_alpha / mean_rank for every layer, fixed when ranks change. beta: importance
    temperature (the LP solution depends only on the order of the importances, so any beta > 0
    gives the same sparsities barring ties). delta: None = :func:`salr.losa.rmi.sparsity_delta`.
    layerwise: "rmi", "uniform" or "owl" (OWL's ratios at the final target, measured once on the dense
    model with owl_m / owl_lambda as in salr.prune.owl, scaled to each round's target); rank_allocation: "error" or "uniform"; masked: False trains a
    plain LoRA on the sparse base (the baseline; its update is then masked at the final merge).
    targets: linear names to adapt/prune (None = every linear in the decoder blocks).
    cka_tokens: tokens sampled per window for the CKA Gram matrices. train: the optimizer settings
    of every round (its ``steps`` is replaced by the round's share, its seed by seed + round, and its
    ``warmup_steps``, which counts over the whole run, by the round's proportional share: each round
    starts a fresh optimizer, so each warms up).
    final_merge: merge every layer at the end (False keeps the adapters, e.g. to compare merges).
    """

    sparsity: float
    rounds: int = 5
    total_steps: int = 100
    final_share: float | None = 0.6
    mean_rank: int = 8
    r_max: int = 32
    lora_alpha: float = 16.0
    beta: float = 1.0
    delta: float | None = None
    layerwise: str = "rmi"
    owl_m: float = DEFAULT_M
    owl_lambda: float = DEFAULT_LAMBDA
    rank_allocation: str = "error"
    masked: bool = True
    targets: tuple[str, ...] | None = None
    cka_tokens: int | None = 256
    max_layer_sparsity: float = 0.99
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4, steps=1, batch_size=4,
                                                                    max_grad_norm=1.0, progress=False))
    final_merge: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"LoSAConfig.{name}: {why} (got {getattr(self, name)!r})")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise bad("sparsity", "the target must be a number in [0, 1)")
        try:
            check_rounds(self.rounds)
        except ValueError as exc:
            raise bad("rounds", str(exc)) from None
        if not is_int(self.total_steps) or self.total_steps < 0:
            raise bad("total_steps", "must be an integer >= 0")
        if 0 < self.total_steps < self.rounds:
            raise bad("total_steps", f"must be 0 or at least rounds ({self.rounds}) so every round trains")
        try:
            check_final_share(self.final_share)
            if self.total_steps:
                split_steps(self.total_steps, self.rounds, self.final_share)
        except ValueError as exc:
            raise bad("final_share", str(exc)) from None
        if not is_int(self.mean_rank) or self.mean_rank < 1:
            raise bad("mean_rank", "must be an integer >= 1")
        if not is_int(self.r_max) or self.r_max < self.mean_rank:
            raise bad("r_max", f"must be an integer >= mean_rank ({self.mean_rank}): the budget mean_rank·L "
                               f"cannot be met otherwise")
        for name in ("lora_alpha", "beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise bad(name, "must be a finite number > 0")
        if self.delta is not None:
            if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not math.isfinite(self.delta):
                raise bad("delta", "must be None or a finite number")
            if self.delta < 0:
                raise bad("delta", "a negative bound on |x_l - target| makes the layer-wise program infeasible")
        if self.layerwise not in LAYERWISE:
            raise bad("layerwise", f"must be one of {LAYERWISE}")
        if self.layerwise == "owl":
            check_owl_params(self.sparsity, self.owl_m, self.owl_lambda, "LoSAConfig")
        if self.rank_allocation not in RANK_ALLOCATION:
            raise bad("rank_allocation", f"must be one of {RANK_ALLOCATION}")
        if not self.masked and self.rank_allocation != "uniform":
            raise bad("rank_allocation", "a plain (masked=False) LoRA cannot shrink its rank without changing "
                                         "its function: use 'uniform'")
        if self.cka_tokens is not None and (not is_int(self.cka_tokens) or self.cka_tokens < 4):
            raise bad("cka_tokens", "must be None or an integer >= 4")
        if not isinstance(self.max_layer_sparsity, (int, float)) or not s < self.max_layer_sparsity <= 1.0:
            raise bad("max_layer_sparsity", f"must be in (sparsity={s}, 1]")
        if not isinstance(self.train, TrainConfig):
            raise bad("train", "must be a salr.train.TrainConfig")
        if self.train.warmup_steps > self.total_steps:
            raise bad("train", f"its warmup_steps ({self.train.warmup_steps}) count over the whole run and "
                               f"must be <= total_steps ({self.total_steps})")
        if self.targets is not None:
            self.targets = tuple(self.targets)
        if not is_int(self.seed) or self.seed < 0:
            raise bad("seed", "must be an integer >= 0")

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.mean_rank

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        d["train"] = self.train.to_dict()
        d["targets"] = list(self.targets) if self.targets is not None else None
        return d


@dataclass
class RoundReport:
    round: int
    target: float
    block_sparsity: list[float]
    ranks: list[int]
    errors: list[float]
    importance: list[float] | None
    cka: list[list[float]] | None
    steps: int
    first_loss: float | None
    last_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)  # salr.train.train's, one dict per step


@dataclass
class LoSAReport:
    config: dict[str, Any]
    rounds: list[RoundReport]
    final_sparsity: float
    trainable_parameters: list[int]  # per round, the number of trainable (LoRA) parameters

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "rounds": [dataclasses.asdict(r) for r in self.rounds],
                "final_sparsity": self.final_sparsity, "trainable_parameters": self.trainable_parameters}

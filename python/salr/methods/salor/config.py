"""SALOR's settings: :class:`FactorSparsityConfig` (the sparsity of the LoRA factors and its schedule)
and :class:`SALORConfig` (a whole SALOR conversion: SALR's settings plus the ``factor_*`` ones), both
dataclasses validated on construction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from salr._checks import check_fraction, check_int
from salr.methods.salr.config import SALRConfig
from salr.prune.masks import count, parse_pattern, resolve_sparsity

# The argument names the messages use (SALORConfig's fields and the CLI's --factor-* options).
NAMES = ("factor_sparsity", "factor_pattern")


@dataclass(frozen=True)
class FactorSparsityConfig:
    """Target sparsity of the LoRA factors and when it is reached.

    sparsity: fraction of zeros in each factor at the end, in [0, 1); None = taken from `pattern`.
        With a pattern it must equal 1 − N/M (a contradiction is an error).
    pattern: None (unstructured magnitude) or "N:M" along K for A and along r for B.
    start_step / end_step: the cubic ramp s_t = S·(1 − (1 − t)³), t = (step − start)/(end − start),
        in finished optimizer steps; masks are at the target (and frozen) from end_step on.
        start = end = 0: one-shot (the target from the first step on).
    update_every: recompute masks every this many steps during the ramp.
    """

    sparsity: float | None = None
    pattern: str | None = None
    start_step: int = 0
    end_step: int = 0
    update_every: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", resolve_sparsity(self.sparsity, self.pattern, NAMES))
        for name in ("start_step", "end_step", "update_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (name == "update_every"):
                raise ValueError(f"factor_{name}: expected an integer >= {int(name == 'update_every')}, got {value!r}")
        if self.end_step < self.start_step:
            raise ValueError(f"factor_start_step, factor_end_step: need start_step <= end_step, got "
                             f"{self.start_step}, {self.end_step}")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern, NAMES[1])

    def ratio_at(self, step: int) -> float:
        """The scheduled sparsity at `step` (cubic ramp, then the target)."""
        check_int(step, "step")
        if step >= self.end_step:
            return self.sparsity
        if step < self.start_step:
            return 0.0
        t = (step - self.start_step) / (self.end_step - self.start_step)
        return self.sparsity * (1.0 - (1.0 - t) ** 3)

    def last_update(self, step: int) -> int:
        """The latest mask-update step at or before `step` (updates every update_every in the ramp)."""
        check_int(step, "step")
        if step >= self.end_step or step < self.start_step:
            return step
        return self.start_step + (step - self.start_step) // self.update_every * self.update_every

    def pruned_count(self, numel: int, ratio: float) -> int:
        """How many entries of a factor with `numel` entries a mask at `ratio` prunes."""
        check_int(numel, "numel")
        check_fraction(ratio, "ratio")
        nm = self.nm
        if nm is None:
            return count(ratio, numel)
        n, m = nm
        per_group = count(ratio / self.sparsity, m - n) if self.sparsity > 0 else 0
        return per_group * (numel // m)

    def check_dims(self, in_features: int, rank: int, what: str = "the layer") -> None:
        """ValueError when an N:M pattern does not tile K (A's groups) or r (B's groups)."""
        nm = self.nm
        if nm is None:
            return
        for dim, value in (("in_features (A's groups run along K)", in_features),
                           ("the LoRA rank (B's groups run along r)", rank)):
            if value % nm[1]:
                raise ValueError(f"factor_pattern: {self.pattern} needs {dim} to be a multiple of {nm[1]}, "
                                 f"but {what} has {value}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FactorSparsityConfig":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"FactorSparsityConfig: unknown fields {unknown}")
        return cls(**dict(data))


# SALORConfig field -> FactorSparsityConfig field.
FACTOR_FIELDS = {"factor_sparsity": "sparsity", "factor_pattern": "pattern", "factor_start_step": "start_step",
                 "factor_end_step": "end_step", "factor_update_every": "update_every"}


@dataclass
class SALORConfig(SALRConfig):
    """Settings of a SALOR conversion: every :class:`~salr.methods.salr.config.SALRConfig` field plus
    the sparsity of the LoRA factors (``factor_*``, see :class:`FactorSparsityConfig`; the schedule's
    ``factor_end_step`` counts finished optimizer steps). lora_rank must be >= 1.
    """

    factor_sparsity: float | None = None
    factor_pattern: str | None = None
    factor_start_step: int = 0
    factor_end_step: int = 0
    factor_update_every: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.lora_rank:
            raise ValueError("lora_rank: SALOR sparsifies the LoRA factors, so it needs lora_rank >= 1")
        if self.factor_sparsity is None and self.factor_pattern is None:
            raise ValueError("factor_sparsity: SALOR needs factor_sparsity (or factor_pattern)")
        self.factor_config  # noqa: B018 - validates the factor settings now, naming the field

    @property
    def factor_config(self) -> FactorSparsityConfig:
        return FactorSparsityConfig(**{inner: getattr(self, outer) for outer, inner in FACTOR_FIELDS.items()})

    @classmethod
    def from_parts(cls, config: SALRConfig, factor_config: FactorSparsityConfig) -> "SALORConfig":
        """The SALOR config of a SALR config and a factor config."""
        data = SALRConfig.to_dict(config)
        data.update({outer: getattr(factor_config, inner) for outer, inner in FACTOR_FIELDS.items()})
        return cls.from_dict(data)

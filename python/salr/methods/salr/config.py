"""``SALRConfig``: the settings of a SALR conversion (prune once + SVD residual adapter + LoRA), a
dataclass validated on construction; :func:`salr.sparsify_` applies it (:mod:`salr.methods.salr.model`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from salr.nn.svd import SVD_METHODS
from salr.prune.criteria import check_criterion, resolve_group
from salr.prune.masks import parse_pattern, resolve_sparsity
from salr.prune.owl import DEFAULT_LAMBDA, DEFAULT_M, LAYERWISE, check_owl_params
from salr.prune.quantize import check_group_size, check_quantize

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        if isinstance(name, torch.dtype) and name not in _DTYPES.values():
            raise ValueError(f"{what}: expected one of {', '.join(_DTYPES)}, got {name}")
        return name
    if name not in _DTYPES:
        raise ValueError(f"{what}: expected one of {', '.join(_DTYPES)} or None, got {name!r}")
    return _DTYPES[name]


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return value


# Names salr 0.1 used for SALRConfig fields (still found in saved config.json files and accepted by
# the deprecated salr.convert.convert) -> the one naming scheme of every method's config.
LEGACY_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def rename_legacy(data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with the :data:`LEGACY_NAMES` keys renamed; ValueError if both spellings are given."""
    out = dict(data)
    for old, new in LEGACY_NAMES.items():
        if old in out:
            if new in out:
                raise ValueError(f"{new}: given twice (as {new!r} and as its old name {old!r})")
            out[new] = out.pop(old)
    return out


@dataclass
class SALRConfig:
    """Settings of a SALR conversion, validated on construction (ValueError naming the field).

    sparsity: fraction of each target layer's weights removed, in [0, 1): one number, or one per
        decoder block (a sequence), or one per linear (a mapping from qualified module name; it must
        cover every target). None = derived from `pattern`.
    pattern: None (unstructured) or "N:M" ("2:4", "4:8"); must agree with `sparsity`.
    criterion: "magnitude", "wanda" or "sparsegpt" (the last two need calibration data).
    group: "row" or "layer" comparison group for unstructured masks (None = the criterion's
        default, see salr.prune.criteria.DEFAULT_GROUP).
    svd_rank: rank of the SVD residual adapter (0 = none). svd_method: "exact" or "randomized".
    activation_aware_svd: weight the SVD by calibration input norms (needs calibration data).
    lora_rank, lora_alpha, lora_dropout: the trainable LoRA (rank 0 = none); scale = lora_alpha / lora_rank.
    target_modules: linear names to convert (e.g. ("q_proj", "v_proj")); None = every linear of
        every decoder block (embeddings and lm_head stay dense).
    trainable_svd: whether the SVD adapter trains with the LoRA.
    dtype: storage/compute dtype of the converted layers ("float32", "bfloat16", "float16";
        None = each layer's own).
    blocksize, damping: SparseGPT's column block size and Hessian damping (fraction of mean diag).
    layerwise: "uniform" (`sparsity` as given) or "owl": `sparsity` is the global target and each
        decoder block gets its OWL ratio (:mod:`salr.prune.owl`; needs calibration data, unstructured
        only) within ``[target − owl_lambda, target + owl_lambda]``; owl_m is the outlier threshold
        (a multiple of the layer's mean Wanda score). After the conversion the recorded config holds
        the per-block ratios OWL chose, so re-applying it gives the same model.
    type_allocation: 0 (every linear at its block's ratio) or a strength s in (0, 4]: each block's
        ratio (uniform or OWL's) is moved apart by projection type, ``s ×``
        :data:`salr.prune.type_allocation.SENSITIVITY_OFFSETS` (q / k / o pruned harder, v and the MLP
        less, as measured on SmolLM2), the block's weight-weighted mean kept; unstructured only. The
        recorded config then holds the per-layer mapping it chose.
    quantize: None (the base keeps `dtype`) or "int8": the pruned base is stored as int8 values with
        fp32 scales (:mod:`salr.prune.quantize`); SparseGPT folds the rounding into its update, the
        other criteria round to nearest after pruning. Adapters and bias stay in `dtype`.
    quantize_group_size: None (one scale per output row) or 64 (one per row and 64-column group).
    """

    sparsity: float | Sequence[float] | Mapping[str, float] | None = 0.5
    pattern: str | None = None
    criterion: str = "wanda"
    group: str | None = None
    svd_rank: int = 64
    svd_method: str = "exact"
    activation_aware_svd: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    trainable_svd: bool = False
    dtype: str | None = None
    blocksize: int = 128
    damping: float = 0.01
    layerwise: str = "uniform"
    owl_m: float = DEFAULT_M
    owl_lambda: float = DEFAULT_LAMBDA
    type_allocation: float = 0.0
    quantize: str | None = None
    quantize_group_size: int | None = None

    def __post_init__(self) -> None:
        check_criterion(self.criterion)
        nm = parse_pattern(self.pattern)
        if isinstance(self.sparsity, Mapping):
            self.sparsity = {str(k): resolve_sparsity(v, self.pattern) for k, v in self.sparsity.items()}
            if not self.sparsity:
                raise ValueError("sparsity: an empty mapping")
        elif isinstance(self.sparsity, Sequence) and not isinstance(self.sparsity, str):
            self.sparsity = tuple(resolve_sparsity(v, self.pattern) for v in self.sparsity)
            if not self.sparsity:
                raise ValueError("sparsity: an empty sequence")
        else:
            self.sparsity = resolve_sparsity(self.sparsity, self.pattern)
        resolve_group(self.group, self.criterion, self.pattern)
        self._check_layerwise()
        _check_int(self.svd_rank, "svd_rank", 0)
        if self.svd_method not in SVD_METHODS:
            raise ValueError(f"svd_method: expected one of {', '.join(SVD_METHODS)}, got {self.svd_method!r}")
        _check_int(self.lora_rank, "lora_rank", 0)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) or not (
                math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha: expected a finite number > 0, got {self.lora_alpha!r}")
        if (isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float))
                or not 0 <= self.lora_dropout < 1):
            raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {self.lora_dropout!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = (self.target_modules,)
            self.target_modules = tuple(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"target_modules: expected None or non-empty module names, got {self.target_modules!r}")
        dtype_from_name(self.dtype)
        _check_int(self.blocksize, "blocksize", 1)
        if nm is not None and self.blocksize % nm[1]:
            raise ValueError(f"blocksize: must be a multiple of M={nm[1]} for pattern {self.pattern!r}, "
                             f"got {self.blocksize}")
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping > 0):
            raise ValueError(f"damping: expected a finite number > 0, got {self.damping!r}")
        check_group_size(self.quantize_group_size)
        if check_quantize(self.quantize) is None and self.quantize_group_size is not None:
            raise ValueError(f"quantize_group_size: scale groups need quantize='int8', got quantize=None and "
                             f"quantize_group_size={self.quantize_group_size!r}")

    def _check_layerwise(self) -> None:
        if (isinstance(self.type_allocation, bool) or not isinstance(self.type_allocation, (int, float))
                or not 0 <= self.type_allocation <= 4):
            raise ValueError(f"type_allocation: expected a strength in [0, 4] (0 = off), got {self.type_allocation!r}")
        if self.type_allocation and self.pattern is not None:
            raise ValueError(f"type_allocation: moves unstructured ratios apart by projection type; pattern must be "
                             f"None, got {self.pattern!r}")
        if self.layerwise not in LAYERWISE:
            raise ValueError(f"layerwise: expected one of {', '.join(LAYERWISE)}, got {self.layerwise!r}")
        if self.layerwise != "owl":
            return
        if self.pattern is not None:
            raise ValueError(f"layerwise: 'owl' varies the unstructured sparsity per block; pattern must be None, "
                             f"got {self.pattern!r}")
        if (isinstance(self.sparsity, Mapping) and not self.type_allocation) or self.sparsity is None:
            raise ValueError(f"sparsity: layerwise='owl' needs one global target (or the per-block ratios OWL "
                             f"chose), got {self.sparsity!r}")
        # A sequence is the ratios OWL already chose (a saved model's config): only M and λ to check.
        target = self.sparsity if isinstance(self.sparsity, float) else 0.0
        check_owl_params(target, self.owl_m, self.owl_lambda, "SALRConfig")

    @property
    def owl_pending(self) -> bool:
        """OWL is asked for and its per-block ratios are not chosen yet."""
        return self.layerwise == "owl" and isinstance(self.sparsity, float)

    @property
    def types_pending(self) -> bool:
        """A per-type allocation is asked for and its per-layer ratios are not chosen yet."""
        return bool(self.type_allocation) and not isinstance(self.sparsity, Mapping)

    @property
    def needs_calibration(self) -> bool:
        return self.criterion != "magnitude" or self.activation_aware_svd or self.owl_pending

    def layer_sparsity(self, block_index: int, name: str) -> float:
        """The ratio for the linear `name` of decoder block `block_index`."""
        if isinstance(self.sparsity, dict):
            if name not in self.sparsity:
                raise ValueError(f"name: {name!r} has no entry in the per-layer sparsity mapping")
            return self.sparsity[name]
        if isinstance(self.sparsity, tuple):
            if isinstance(block_index, bool) or not isinstance(block_index, int) or not 0 <= block_index < len(self.sparsity):
                raise ValueError(f"block_index: must be an integer in [0, {len(self.sparsity)}), got {block_index!r}")
            return self.sparsity[block_index]
        return self.sparsity

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(out["sparsity"], tuple):
            out["sparsity"] = list(out["sparsity"])
        if out["target_modules"] is not None:
            out["target_modules"] = list(out["target_modules"])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SALRConfig":
        """The config of a dict from :meth:`to_dict`; also reads the names salr 0.1 saved
        (``alpha`` / ``dropout``, see :data:`LEGACY_NAMES`)."""
        data = rename_legacy(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown fields {unknown}")
        return cls(**data)

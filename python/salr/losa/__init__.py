"""LoSA (Huang et al., ICLR 2025): dynamic low-rank sparse adaptation.

The LoRA update is applied through the sparse weight's own mask, so merging keeps the weight exactly
as sparse and the fine-tuned model has no adapters at inference. Pieces:

* :mod:`salr.losa.masked_lora` — :class:`LoSALinear`: y = x·(W_s + s·M⊙(BA))ᵀ through SDDMM + one
  sparse GEMM (no dense N×K), ``merge()`` keeps the bitmap bit for bit, rank grow/shrink keeps the
  trained directions.
* :mod:`salr.losa.rmi` — streaming linear CKA between decoder blocks, importance
  I = exp(−β·t̃), and the closed-form layer-wise sparsity LP.
* :mod:`salr.losa.ranks` — per-block reconstruction error and error-proportional ranks in [1, r_max]
  summing exactly to the budget.
* :mod:`salr.losa.schedule` — the cubic sparsity schedule over T rounds.
* :mod:`salr.losa.pipeline` — :class:`LoSAConfig` and :func:`run`.
"""

from salr.losa.masked_lora import LoSALinear, MaskedLoRAFunction, masked_lora_linear
from salr.losa.ranks import allocate_ranks, reconstruction_error
from salr.losa.rmi import (StreamingCKA, block_importance, layerwise_sparsity, linear_cka, solve_box_lp,
                           sparsity_delta)
from salr.losa.schedule import cubic_sparsity, sparsity_schedule

_PIPELINE = ("LoSAConfig", "LoSAReport", "RoundReport", "run", "block_cka", "wanda_keep", "export_salr")


def __getattr__(name: str):
    # The pipeline pulls in the training loop and calibration: imported on first use only, so
    # ``import salr`` stays light.
    if name in _PIPELINE:
        from salr.losa import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'salr.losa' has no attribute {name!r}")


__all__ = [
    *_PIPELINE,
    "LoSALinear",
    "MaskedLoRAFunction",
    "StreamingCKA",
    "allocate_ranks",
    "block_importance",
    "cubic_sparsity",
    "layerwise_sparsity",
    "linear_cka",
    "masked_lora_linear",
    "reconstruction_error",
    "solve_box_lp",
    "sparsity_delta",
    "sparsity_schedule",
]

"""LoSA (Huang et al., ICLR 2025): dynamic low-rank sparse adaptation, applied by
``salr.losa.run(model, LoSAConfig(...), calibration, train_data)``.

The LoRA update is applied through the sparse weight's own mask, so merging keeps the weight exactly
as sparse and the fine-tuned model has no adapters at inference. LoSA trains while it prunes, so it
is a procedure above the training loop rather than a :func:`salr.sparsify_` transform. Pieces:

* :mod:`salr.losa.config` — :class:`LoSAConfig` and the per-round report.
* :mod:`salr.losa.layer` — :class:`LoSALinear`: y = x·(W_s + s·M⊙(BA))ᵀ through SDDMM + one
  sparse GEMM (no dense N×K), ``merge()`` keeps the bitmap bit for bit, rank grow/shrink keeps the
  trained directions.
* :mod:`salr.losa.model` — the block CKA pass, the Wanda pruning pass with reconstruction errors,
  the export to plain SALR layers.
* :mod:`salr.losa.rmi` — streaming linear CKA between decoder blocks, importance
  I = exp(−β·t̃), and the closed-form layer-wise sparsity LP.
* :mod:`salr.losa.ranks` — per-block reconstruction error and error-proportional ranks in [1, r_max]
  summing exactly to the budget.
* :mod:`salr.losa.schedule` — the cubic sparsity schedule over T rounds.
* :mod:`salr.losa.rounds` — :func:`run`, the rounds.
"""

from salr.losa.config import LoSAConfig, LoSAReport, RoundReport
from salr.losa.layer import LoSALinear, MaskedLoRAFunction, masked_lora_linear
from salr.losa.model import block_cka, export_salr, losa_layers, wanda_keep
from salr.losa.rounds import run
from salr.losa.ranks import allocate_ranks, reconstruction_error
from salr.losa.rmi import (StreamingCKA, block_importance, layerwise_sparsity, linear_cka, solve_box_lp,
                           sparsity_delta)
from salr.losa.schedule import cubic_sparsity, sparsity_schedule
from salr.methods.registry import register_layer

register_layer(LoSALinear)

__all__ = [
    "LoSAConfig",
    "LoSALinear",
    "LoSAReport",
    "MaskedLoRAFunction",
    "RoundReport",
    "StreamingCKA",
    "allocate_ranks",
    "block_cka",
    "block_importance",
    "cubic_sparsity",
    "export_salr",
    "layerwise_sparsity",
    "linear_cka",
    "losa_layers",
    "masked_lora_linear",
    "reconstruction_error",
    "run",
    "solve_box_lp",
    "sparsity_delta",
    "sparsity_schedule",
    "wanda_keep",
]

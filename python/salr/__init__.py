"""salr: sparse + low-rank fine-tuning and inference for LLMs.

The base weight is stored in the BM8x8 bitmap format (:class:`BitmapSparseWeight`) and served by
``torch.ops.salr.sparse_lowrank_gemm``, which fuses the sparse GEMM with concatenated low-rank
adapters. One call applies a method: ``salr.sparsify_(model, SALRConfig(...) | SALORConfig(...),
calibration)``; ``salr.merge_(model)`` folds the trained adapters (``salr.quantize_adapters_(model)``
then stores them as int8); LoSA, which trains while it
prunes, is ``salr.losa.run``. ``salr.save`` / ``salr.load`` write and read a model directory.

The package, bottom to top (docs/design.md §3): ``ops`` (the ops, their pure-PyTorch reference,
the BM8x8 format) < ``nn`` (block / linear discovery, the SVD adapter) < ``prune`` (masks,
criteria, calibration) < ``methods`` (SALR, SALOR, the registry) < ``io.saved_model`` <
``train`` / ``eval`` / ``interop`` < ``losa`` < ``cli``; ``io.files`` (atomic writes, shards) is
below them all.
"""

from salr._native import available_cpu_isas, cpu_isa, native_available, native_error
from salr import ops
from salr.ops import reference
from salr.ops.format import FORMAT_NAME, FORMAT_VERSION, BitmapSparseWeight
from salr.methods import (FactorSparsityConfig, SALORConfig, SALORLinear, SALRConfig, SALRLinear, merge_,
                          sparsify_)
from salr.methods.salr.model import prune_model, quantize_adapters_
from salr.io.saved_model import load, save
from salr.eval.perplexity import perplexity
from salr import losa
from salr._compat import alias_attribute, install_deprecated_aliases

__version__ = "0.1.0"

__all__ = [
    "BitmapSparseWeight",
    "FactorSparsityConfig",
    "SALORConfig",
    "SALORLinear",
    "SALRConfig",
    "SALRLinear",
    "load",
    "losa",
    "merge_",
    "perplexity",
    "prune_model",
    "quantize_adapters_",
    "save",
    "sparsify_",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "available_cpu_isas",
    "cpu_isa",
    "native_available",
    "native_error",
    "ops",
    "reference",
]

install_deprecated_aliases()


def __getattr__(name: str):
    # salr.convert, salr.training, ... used without an import statement: the deprecated aliases.
    return alias_attribute(__name__, name)

"""salr: sparse + low-rank fine-tuning and inference for LLMs.

The base weight is stored in the BM8x8 bitmap format (:class:`BitmapSparseWeight`) and served by
``torch.ops.salr.sparse_lowrank_gemm``, which fuses the sparse GEMM with concatenated low-rank
adapters. See ``salr.ops`` for the ops and ``salr.reference`` for their pure-PyTorch definitions.
"""

from salr._native import available_cpu_isas, cpu_isa, native_available, native_error
from salr import _meta  # noqa: F401  (registers fake kernels and autograd for the ops)
from salr import ops, reference
from salr.format import BitmapSparseWeight, FORMAT_NAME, FORMAT_VERSION
from salr.salr_linear import SALRConfig, SALRLinear
from salr import convert  # the module; callable: salr.convert(model, ...) converts
from salr.convert import load, prune_model, save
from salr.evaluate import perplexity

__version__ = "0.1.0"

__all__ = [
    "BitmapSparseWeight",
    "SALRConfig",
    "SALRLinear",
    "convert",
    "load",
    "perplexity",
    "prune_model",
    "save",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "available_cpu_isas",
    "cpu_isa",
    "native_available",
    "native_error",
    "ops",
    "reference",
]
from salr import losa  # noqa: E402,F401  (LoSA: salr.losa.run, LoSAConfig, LoSALinear; pipeline imported lazily)

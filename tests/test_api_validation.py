"""Every user-facing function refuses a bad argument with an error that names the argument and says
why. One table: public callable -> bad calls -> expected error type and message fragment; and a
check that every public callable of the listed modules is in the table or in NO_ARGUMENTS_TO_CHECK
(so a new public function without an entry fails here)."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import salr
from salr import losa, ops
from salr.eval import generation, lm_eval
from salr.eval import perplexity as perplexity_mod
from salr.interop import compressed_tensors as ict
from salr.interop import hf
from salr.interop import peft as ipeft
from salr.io import saved_model
from salr.methods import convert as legacy
from salr.methods import registry
from salr.methods.salor import config as salor_config
from salr.methods.salor import factors as salor_factors
from salr.methods.salor import layer as salor_layer
from salr.methods.salor import model as salor_model
from salr.methods.salr import model as salr_model
from salr.methods.salr.config import SALRConfig, dtype_from_name, rename_legacy
from salr.methods.salr.layer import SALRLinear
from salr.nn import svd
from salr.ops.format import BitmapSparseWeight
from salr.prune import criteria, masks, owl, type_allocation
from salr.prune import quantize as pquant
from salr.train import chat_data, checkpoint, data, distributed
from salr.train import config as train_config
from salr.train import loop as train_loop
from salr.train import state as train_state
from salr_helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

PUBLIC_MODULES = ["salr", "salr.ops", "salr.ops.format", "salr.methods", "salr.methods.registry", "salr.methods.convert",
                  "salr.methods.salr.config", "salr.methods.salr.layer", "salr.methods.salr.model",
                  "salr.methods.salor.config", "salr.methods.salor.factors", "salr.methods.salor.layer",
                  "salr.methods.salor.model", "salr.prune.masks", "salr.prune.criteria", "salr.prune.owl",
                  "salr.prune.quantize", "salr.prune.type_allocation", "salr.nn.svd",
                  "salr.nn.bitmap_linear", "salr.train.config", "salr.train.loop", "salr.train.data", "salr.train.chat_data",
                  "salr.train.distributed",
                  "salr.train.checkpoint", "salr.train.state", "salr.eval.perplexity", "salr.eval.generation",
                  "salr.eval.lm_eval", "salr.io.saved_model", "salr.losa", "salr.interop.hf", "salr.interop.peft",
                  "salr.interop.compressed_tensors"]

# Callables with nothing a caller could get wrong (no arguments, or only `self`), and result records.
NO_ARGUMENTS_TO_CHECK = {
    "salr._native.available_cpu_isas", "salr._native.cpu_isa", "salr._native.native_available",
    "salr._native.native_error", "salr.train.distributed.distributed_context", "salr.train.state.capture_rng_state",
    "salr.ops.format.BitmapSparseWeight.to_dense", "salr.ops.format.BitmapSparseWeight.validate",
    "salr.ops.format.BitmapSparseWeight.bytes_per_weight",
    "salr.methods.salr.config.SALRConfig.to_dict", "salr.methods.salr.layer.SALRLinear.compressed_bytes",
    "salr.methods.salr.layer.SALRLinear.to_dense", "salr.nn.bitmap_linear.BitmapLinear.base_dense",
    "salr.methods.salr.layer.SALRLinear.merge", "salr.methods.salr.layer.SALRLinear.extra_repr",
    "salr.methods.salr.layer.SALRLinear.combined_adapter", "salr.methods.salr.layer.SALRLinear.svd_factors", "salr.methods.salor.layer.SALORLinear.combined_adapter",
    "salr.train.config.TrainConfig.to_dict", "salr.train.data.IterableBatches.state_dict",
    "salr.train.data.TokenWindows.state_dict", "salr.train.chat_data.ChatExamples.state_dict",
    "salr.train.data.IterableBatches.take",  # rows: the iterable decides
    "salr.losa.config.LoSAConfig.to_dict",
    "salr.losa.config.LoSAReport.to_dict", "salr.losa.layer.LoSALinear.extra_repr",
    "salr.nn.bitmap_linear.BitmapLinear.mask", "salr.losa.layer.LoSALinear.delta_values",
    "salr.losa.layer.LoSALinear.merged_values", "salr.losa.layer.LoSALinear.effective_weight",
    "salr.losa.layer.LoSALinear.merge", "salr.losa.rmi.StreamingCKA.matrix",
    "salr.methods.salor.factors.FactorMasks", "salr.methods.salor.factors.FactorMasks.apply_masks", "salr.methods.salor.factors.FactorMasks.masked_factors",
    "salr.methods.salor.factors.FactorMasks.factor_sparsity", "salr.methods.salor.factors.SALORAdapter.to_sparse",
    "salr.methods.salor.config.FactorSparsityConfig.to_dict", "salr.methods.salor.layer.SALORLinear.compressed_bytes",
    "salr.methods.salor.layer.SALORLinear.lora_bytes", "salr.methods.salor.layer.SALORLinear.merge",
    "salr.methods.salor.layer.SALORLinear.to_dense", "salr.methods.salor.layer.SALORLinear.extra_repr",
    "salr.eval.lm_eval.available",
    # The BM8x8 base of every layer: built through its subclasses (SALRLinear, LoSALinear), no arguments.
    "salr.nn.bitmap_linear.BitmapLinear",
    # Result records filled in by salr itself, not by callers.
    "salr.losa.config.LoSAReport", "salr.losa.config.RoundReport", "salr.eval.generation.DecodeResult",
    "salr.methods.salor.factors.SparseFactors",
    # torch.autograd.Function: called through salr.losa.masked_lora_linear (in the table).
    "salr.losa.layer.MaskedLoRAFunction", "salr.losa.layer.MaskedLoRAFunction.forward",
    "salr.losa.layer.MaskedLoRAFunction.backward",
}

W = torch.zeros(16, 16)
E = ValueError


def weight():
    return BitmapSparseWeight.from_dense(torch.eye(16))


def layer():
    return SALRLinear.from_weights(torch.eye(16), svd_a=torch.randn(2, 16), svd_b=torch.randn(16, 2))


def fc():
    return salor_config.FactorSparsityConfig(0.5)


def model():
    return tiny_model("llama", hidden=32, layers=1)


def _chat_examples():
    """One 4-token conversation whose last two tokens are the completion."""
    return chat_data.ChatExamples([chat_data.TokenizedConversation(
        torch.arange(4), torch.tensor([False, False, True, True]))], 4)


# (qualified name, bad call, error type, message fragment)
CASES = [
    # ---- ops (the native ops raise at the C++ boundary: RuntimeError naming op and argument)
    ("salr.ops.wrappers.bitmap_encode", lambda: ops.bitmap_encode(torch.zeros(3)), (RuntimeError, E), "bitmap_encode: dense must be 2-D"),
    ("salr.ops.wrappers.bitmap_decode", lambda: ops.bitmap_decode(*ops.bitmap_encode(W), 16, 24), (RuntimeError, E), "bitmap must have shape"),
    ("salr.ops.wrappers.sparse_lowrank_gemm", lambda: ops.sparse_lowrank_gemm(torch.ones(2, 15), *ops.bitmap_encode(W), 16, 16),
     (RuntimeError, E), "x must have shape"),
    ("salr.ops.wrappers.sparse_gemm_transposed", lambda: ops.sparse_gemm_transposed(torch.ones(2, 15), *ops.bitmap_encode(W), 16, 16),
     (RuntimeError, E), "grad_out must have shape"),
    ("salr.ops.wrappers.sparse_lowrank_gemm", lambda: ops.sparse_lowrank_gemm(
        torch.ones(2, 16), *ops.bitmap_encode(torch.ones(16, 16, dtype=torch.int8)), 16, 16, scales=torch.zeros(16)),
     (RuntimeError, E), "sparse_lowrank_gemm: scales must be finite and > 0"),
    ("salr.ops.wrappers.sparse_gemm_transposed", lambda: ops.sparse_gemm_transposed(
        torch.ones(2, 16), *ops.bitmap_encode(torch.ones(16, 16, dtype=torch.int8)), 16, 16),
     (RuntimeError, E), "sparse_gemm_transposed: scales is required with int8 values"),
    ("salr.ops.wrappers.sampled_gemm", lambda: ops.sampled_gemm(torch.ones(2, 16), torch.ones(3, 16), *ops.bitmap_encode(W), 16, 16),
     (RuntimeError, E), "right must have shape"),
    # ---- format
    ("salr.ops.format.BitmapSparseWeight", lambda: BitmapSparseWeight(*ops.bitmap_encode(W), 16, -1), E, "rows and cols must be >= 0"),
    ("salr.ops.format.BitmapSparseWeight.from_dense", lambda: BitmapSparseWeight.from_dense(torch.zeros(3)), E, "dense must be 2-D"),
    ("salr.ops.format.BitmapSparseWeight.to", lambda: weight().to(dtype=torch.int8), E, "dtype: must be"),
    ("salr.ops.format.BitmapSparseWeight.linear", lambda: weight().linear(torch.ones(2, 15)), (RuntimeError, E), "x must have shape"),
    ("salr.ops.format.BitmapSparseWeight.save", lambda: weight().save("/nonexistent-dir/w.safetensors"), E, "path: "),
    ("salr.ops.format.BitmapSparseWeight.load", lambda: BitmapSparseWeight.load("/nonexistent/w.safetensors"), E, "cannot read"),
    ("salr.ops.format.tensors_sha256", lambda: salr.ops.format.tensors_sha256({"a": [1]}), E, "tensors['a']: expected a tensor"),
    ("salr.ops.format.BitmapSparseWeight", lambda: BitmapSparseWeight(*ops.bitmap_encode(W.to(torch.int8)), 16, 16), E, "scales: int8 values need scales"),
    ("salr.ops.format.check_scales", lambda: salr.ops.format.check_scales(torch.zeros(4), 4, 100), E, "scales: every scale must be finite and > 0"),
    ("salr.ops.format.column_scales", lambda: salr.ops.format.column_scales([1.0], 3), E, "scales: expected a tensor"),
    # ---- SALR config and layer
    ("salr.methods.salr.config.SALRConfig", lambda: SALRConfig(sparsity=1.5), E, "sparsity"),
    ("salr.methods.salr.config.SALRConfig", lambda: SALRConfig(criterion="random"), E, "criterion"),
    ("salr.methods.salr.config.SALRConfig.layer_sparsity", lambda: SALRConfig(sparsity=(0.5, 0.5)).layer_sparsity(5, "x"), E, "block_index"),
    ("salr.methods.salr.config.SALRConfig.from_dict", lambda: SALRConfig.from_dict({"sparsity": 0.5, "colour": 1}), E, "colour"),
    ("salr.methods.salr.layer.SALRLinear", lambda: SALRLinear(0, 8), E, "in_features"),
    ("salr.methods.salr.layer.SALRLinear.from_weights", lambda: SALRLinear.from_weights(torch.zeros(3)), E, "pruned_weight"),
    ("salr.methods.salr.layer.SALRLinear.from_linear", lambda: SALRLinear.from_linear(torch.nn.Linear(8, 8), sparsity=2.0), E, "sparsity"),
    ("salr.nn.bitmap_linear.BitmapLinear.set_base", lambda: layer().set_base(torch.zeros(8, 16)), E, "pruned_weight"),
    ("salr.methods.salr.layer.SALRLinear.forward", lambda: layer()(torch.ones(2, 15)), (RuntimeError, E), "x must have shape"),
    ("salr.methods.salr.config.dtype_from_name", lambda: dtype_from_name("float7"), E, "dtype"),
    # ---- whole models
    ("salr.methods.convert.convert", lambda: legacy.convert(model(), sparsity=-0.5, progress=False), E, "sparsity"),
    ("salr.methods.convert.convert", lambda: legacy.convert(model(), method="dense", progress=False), E, "method"),
    ("salr.methods.salr.model.prune_model", lambda: salr_model.prune_model(model(), criterion="wanda", progress=False), E, "calibration"),
    ("salr.io.saved_model.save", lambda: saved_model.save(torch.nn.Linear(2, 2), "/tmp/salr-never-written"), E, "model"),
    ("salr.io.saved_model.load", lambda: saved_model.load("/nonexistent/model"), E, "directory"),
    ("salr.io.saved_model.read_record", lambda: saved_model.read_record("/nonexistent/model"), E, "directory"),
    ("salr.methods.salr.model.salr_layers", lambda: salr_model.salr_layers("model"), E, "model: expected a torch.nn.Module"),
    ("salr.methods.salr.model.resolve_layerwise", lambda: salr_model.resolve_layerwise(model(), {"layerwise": "owl"}, None), E, "resolve_layerwise: config"),
    ("salr.methods.salr.model.resolve_layerwise", lambda: salr_model.resolve_layerwise(model(), SALRConfig(layerwise="owl", svd_rank=4, lora_rank=4), None), E, "calibration: layerwise='owl'"),
    ("salr.methods.salr.model.quantize_bases", lambda: salr_model.quantize_bases(None), E, "model: expected a torch.nn.Module"),
    ("salr.methods.salr.model.quantize_adapters_", lambda: salr_model.quantize_adapters_(None), E,
     "model: expected a torch.nn.Module"),
    ("salr.methods.salr.layer.SALRLinear.quantize_adapters",
     lambda: SALRLinear(16, 8, svd_rank=2, lora_rank=2).quantize_adapters(), E, "quantize_adapters: merge the LoRA first"),
    ("salr.methods.salr.model.quantize_bases", lambda: salr_model.quantize_bases(model(), "int4"), E, "quantize:"),
    ("salr.methods.salr.config.SALRConfig", lambda: SALRConfig(quantize="int4"), E, "quantize: expected None or one of int8"),
    ("salr.methods.salr.layer.SALRLinear.from_weights", lambda: SALRLinear.from_weights(torch.zeros(4, 4, dtype=torch.int8)), E, "scales"),
    ("salr.methods.salr.model.freeze_all_but_adapters", lambda: salr_model.freeze_all_but_adapters(None), E, "model: expected a torch.nn.Module"),
    ("salr.eval.perplexity.perplexity", lambda: perplexity_mod.perplexity(model(), torch.zeros(2, 8, dtype=torch.long), batch_size=0), E, "batch_size"),
    ("salr.eval.perplexity.mean_nll", lambda: perplexity_mod.mean_nll(model(), torch.ones(2, 8)), E, "windows"),
    ("salr.eval.generation.decode_speed", lambda: generation.decode_speed(None, None, "hi", new_tokens=1), E, "new_tokens"),
    # ---- pruning and SVD
    ("salr.prune.owl.check_owl_params", lambda: owl.check_owl_params(0.5, 5.0, 0.6), E, "owl_lambda"),
    ("salr.prune.owl.outlier_count", lambda: owl.outlier_count([1.0, 2.0], 5.0), E, "outlier_count: scores"),
    ("salr.prune.owl.block_outlier_ratios", lambda: owl.block_outlier_ratios(model(), torch.ones(2, 4), m=0), E, "owl_m"),
    ("salr.prune.owl.owl_ratios", lambda: owl.owl_ratios([0.1, 0.2], [10], 0.5), E, "owl_ratios: lods and sizes"),
    ("salr.prune.owl.clipped_at_mean", lambda: owl.clipped_at_mean(torch.ones(2), torch.ones(2) / 2, 0.9, 0.0, 0.5), E,
     "clipped_at_mean: target must lie in"),
    ("salr.prune.owl.clipped_at_mean", lambda: owl.clipped_at_mean(torch.ones(2), torch.ones(3), 0.5, 0.0, 1.0), E,
     "clipped_at_mean: raw and weights"),
    ("salr.prune.type_allocation.typed_layer_sparsity", lambda: type_allocation.typed_layer_sparsity(model(), 0.99), E,
     "typed_layer_sparsity: block_ratios"),
    ("salr.prune.owl.owl_block_sparsity", lambda: owl.owl_block_sparsity(model(), torch.ones(2, 4, dtype=torch.long), 1.2), E, "sparsity"),
    ("salr.prune.criteria.check_criterion", lambda: criteria.check_criterion("random"), E, "criterion"),
    ("salr.prune.masks.check_nm_width", lambda: masks.check_nm_width(10, (2, 4)), E, "weight"),
    ("salr.prune.masks.check_sparsity", lambda: masks.check_sparsity(1.0), E, "sparsity"),
    ("salr.prune.masks.count", lambda: masks.count(1.5, 10), E, "fraction"),
    ("salr.prune.criteria.magnitude_scores", lambda: criteria.magnitude_scores(torch.zeros(3)), E, "weight"),
    ("salr.prune.criteria.wanda_scores", lambda: criteria.wanda_scores(torch.zeros(4, 4), torch.ones(5)), E, "input_norms"),
    ("salr.prune.masks.mask_from_scores", lambda: masks.mask_from_scores(torch.zeros(4, 4), 0.5, group="diagonal"), E, "group"),
    ("salr.prune.masks.mask_sparsity", lambda: masks.mask_sparsity(torch.zeros(4)), E, "keep"),
    ("salr.prune.masks.parse_pattern", lambda: masks.parse_pattern("4:2"), E, "pattern"),
    ("salr.prune.criteria.prune_weight", lambda: criteria.prune_weight(torch.zeros(4, 4), "wanda", 0.5), E, "input_norms"),
    ("salr.prune.criteria.prune_weight_int8", lambda: criteria.prune_weight_int8(torch.zeros(4, 4), "sparsegpt", 0.5), E, "hessian"),
    ("salr.prune.criteria.prune_weight_int8", lambda: criteria.prune_weight_int8(torch.zeros(4, 4), "magnitude", 0.5, group_size=8), E, "group_size"),
    ("salr.prune.quantize.check_quantize", lambda: pquant.check_quantize("int4"), E, "quantize: expected None or one of int8"),
    ("salr.prune.quantize.check_group_size", lambda: pquant.check_group_size(32), E, "quantize_group_size: expected None"),
    ("salr.prune.quantize.int8_scales", lambda: pquant.int8_scales(torch.zeros(3)), E, "weight: must be 2-D"),
    ("salr.prune.quantize.quantize_adapter_int8", lambda: pquant.quantize_adapter_int8(torch.ones(2, 4), torch.ones(3, 3)),
     E, "quantize_adapter_int8: b must have shape"),
    ("salr.prune.quantize.quantize_adapter_int8", lambda: pquant.quantize_adapter_int8(torch.ones(4), torch.ones(3, 4)),
     E, "a: must be 2-D"),
    ("salr.prune.quantize.round_to_grid", lambda: pquant.round_to_grid([1.0], torch.ones(1)), E, "w: expected a tensor"),
    ("salr.prune.quantize.quantize_to_grid", lambda: pquant.quantize_to_grid(torch.ones(4, 100), torch.zeros(4)), E, "scales: every scale"),
    ("salr.prune.quantize.dequantize", lambda: pquant.dequantize(torch.ones(2, 2), torch.ones(2)), E, "q: expected int8"),
    ("salr.prune.quantize.quantize_int8", lambda: pquant.quantize_int8(torch.tensor([[float("nan")]])), E, "weight: contains NaN"),
    ("salr.prune.criteria.resolve_group", lambda: criteria.resolve_group("diagonal", "magnitude", None), E, "group"),
    ("salr.prune.masks.resolve_sparsity", lambda: masks.resolve_sparsity(0.3, "2:4"), E, "sparsity"),
    ("salr.nn.svd.check_rank", lambda: svd.check_rank(20, 8, 8), E, "rank"),
    ("salr.nn.svd.eckart_young_bound", lambda: svd.eckart_young_bound(-1, 8, 8), E, "rank"),
    ("salr.nn.svd.randomized_svd", lambda: svd.randomized_svd(torch.zeros(8, 8), 0), E, "rank"),
    ("salr.nn.svd.residual_adapter", lambda: svd.residual_adapter(torch.zeros(8, 8), torch.zeros(8, 9), 2), E, "pruned"),
    ("salr.nn.svd.svd_factors", lambda: svd.svd_factors(torch.zeros(8, 8), 2, method="qr"), E, "method"),
    # ---- training
    ("salr.train.config.TrainConfig", lambda: train_config.TrainConfig(lr=-1.0), E, "TrainConfig.lr"),
    ("salr.train.config.TrainConfig", lambda: train_config.TrainConfig(schedule="step"), E, "TrainConfig.schedule"),
    ("salr.train.config.lr_factor", lambda: train_config.lr_factor(-1, train_config.TrainConfig()), E, "step"),
    ("salr.train.loop.train", lambda: train_loop.train(torch.nn.Linear(2, 2), [], {"lr": 1}), E, "config"),
    ("salr.train.distributed.init_distributed_from_env", lambda: distributed.init_distributed_from_env("carrier-pigeon"), E, "backend"),
    ("salr.eval.perplexity.completion_nll", lambda: perplexity_mod.completion_nll(model(), {"input_ids": torch.ones(2, 8)}), E, "batch"),
    ("salr.eval.perplexity.completion_perplexity", lambda: perplexity_mod.completion_perplexity(
        model(), {k: torch.zeros(2, 8, dtype=torch.long) for k in ("input_ids", "labels", "attention_mask")},
        batch_size=0), E, "batch_size"),
    ("salr.train.chat_data.is_chat_jsonl", lambda: chat_data.is_chat_jsonl(3), E, "path"),
    ("salr.train.chat_data.read_chat_jsonl", lambda: chat_data.read_chat_jsonl("/nonexistent/chat.jsonl"), E, "path"),
    ("salr.train.chat_data.TokenizedConversation", lambda: chat_data.TokenizedConversation(
        torch.arange(3), torch.ones(2, dtype=torch.bool)), E, "completion"),
    ("salr.train.chat_data.tokenize_conversation", lambda: chat_data.tokenize_conversation(None, [{"role": "user"}]),
     E, "messages"),
    ("salr.train.chat_data.tokenize_conversations", lambda: chat_data.tokenize_conversations(None, "w1"), E,
     "conversations"),
    ("salr.train.chat_data.conversation_stream", lambda: chat_data.conversation_stream([]), E, "examples"),
    ("salr.train.chat_data.ChatExamples", lambda: chat_data.ChatExamples([], 1), E, "seq_len"),
    ("salr.train.chat_data.ChatExamples.take", lambda: _chat_examples().take(-1), E, "rows"),
    ("salr.train.chat_data.ChatExamples.load_state_dict", lambda: _chat_examples().load_state_dict({}), E, "state"),
    ("salr.train.data.TokenWindows", lambda: data.TokenWindows(torch.arange(10), 1), E, "seq_len"),
    ("salr.train.data.TokenWindows.take", lambda: data.TokenWindows(torch.arange(10), 2).take(-1), E, "rows"),
    ("salr.train.data.TokenWindows.load_state_dict", lambda: data.TokenWindows(torch.arange(10), 2).load_state_dict({}), E, "state"),
    ("salr.train.data.IterableBatches", lambda: data.IterableBatches(5), E, "iterable"),
    ("salr.train.data.IterableBatches.load_state_dict", lambda: data.IterableBatches([]).load_state_dict({"taken": -1}), E, "state"),
    ("salr.train.data.as_source", lambda: data.as_source(5), E, "train_batches"),
    ("salr.train.data.shard_batch", lambda: data.shard_batch({"labels": 1}, 0, 1, torch.device("cpu")), E, "input_ids"),
    ("salr.train.checkpoint.save_checkpoint", lambda: checkpoint.save_checkpoint("/tmp/salr-never", -1, torch.nn.Linear(2, 2), None, None,
                                                                          data_state={}), E, "step"),
    ("salr.train.state.full_tensor", lambda: train_state.full_tensor([1.0]), E, "t: expected a torch.Tensor"),
    ("salr.train.checkpoint.load_checkpoint", lambda: checkpoint.load_checkpoint("/nonexistent", torch.nn.Linear(2, 2)), E, "not a complete checkpoint"),
    ("salr.train.state.save_trainable", lambda: train_state.save_trainable(torch.nn.Linear(2, 2).requires_grad_(False), "/tmp/x"), E,
     "no parameter with requires_grad"),
    ("salr.train.state.load_trainable", lambda: train_state.load_trainable(torch.nn.Linear(2, 2), "/nonexistent.safetensors"), E, "cannot read"),
    ("salr.train.checkpoint.verify_checkpoint", lambda: checkpoint.verify_checkpoint(None), E, "path"),
    ("salr.train.checkpoint.find_latest_checkpoint", lambda: checkpoint.find_latest_checkpoint(None), E, "run_dir"),
    ("salr.train.checkpoint.checkpoint_root", lambda: checkpoint.checkpoint_root(None), E, "run_dir"),
    ("salr.train.checkpoint.read_checkpoint_state", lambda: checkpoint.read_checkpoint_state("/nonexistent"), E, "state.json"),
    ("salr.train.state.restore_rng_state", lambda: train_state.restore_rng_state({}, {}), E, "rng.torch"),
    ("salr.train.state.trainable_parameters", lambda: train_state.trainable_parameters("model"), E, "model: expected a torch.nn.Module"),
    ("salr.train.state.unwrap_model", lambda: train_state.unwrap_model(None), E, "model: expected a torch.nn.Module"),
    # ---- LoSA
    ("salr.losa.config.LoSAConfig", lambda: losa.LoSAConfig(sparsity=1.2), E, "sparsity"),
    ("salr.losa.rounds.run", lambda: losa.run(model(), {"sparsity": 0.5}, None, None), E, "config"),
    ("salr.losa.model.block_cka", lambda: losa.block_cka(model(), torch.ones(2, 8)), E, "calibration"),
    ("salr.losa.model.wanda_keep", lambda: losa.wanda_keep(torch.zeros(4, 4), torch.ones(5), 0.5), E, "column_norms"),
    ("salr.losa.model.export_salr", lambda: losa.export_salr("model"), E, "model: expected a torch.nn.Module"),
    ("salr.losa.layer.LoSALinear", lambda: losa.LoSALinear(torch.zeros(3)), E, "weight"),
    ("salr.losa.layer.LoSALinear.from_linear", lambda: losa.LoSALinear.from_linear(torch.nn.Linear(8, 8), rank=-1), E, "rank"),
    ("salr.losa.layer.LoSALinear.forward", lambda: losa.LoSALinear(torch.eye(8))(torch.ones(2, 7)), E, "x: last dimension 7"),
    ("salr.losa.layer.LoSALinear.apply_mask", lambda: losa.LoSALinear(torch.eye(8)).apply_mask(torch.ones(3, 3, dtype=torch.bool)), E, "keep"),
    ("salr.losa.layer.LoSALinear.resize_rank", lambda: losa.LoSALinear(torch.eye(8)).resize_rank(-1), E, "rank: must be an integer >= 0"),
    ("salr.losa.layer.masked_lora_linear", lambda: losa.masked_lora_linear(
        torch.ones(2, 8), *ops.bitmap_encode(torch.eye(8)), 8, 8, torch.ones(2, 8), torch.ones(8, 3), 1.0), E, "lora_a/lora_b"),
    ("salr.losa.rmi.StreamingCKA", lambda: losa.StreamingCKA(0), E, "num_blocks"),
    ("salr.losa.rmi.StreamingCKA.update", lambda: losa.StreamingCKA(2).update([torch.ones(8, 4)]), E, "features"),
    ("salr.losa.rmi.block_importance", lambda: losa.block_importance(torch.ones(2, 3)), E, "cka"),
    ("salr.losa.rmi.layerwise_sparsity", lambda: losa.layerwise_sparsity(torch.ones(3), 1.5), E, "target"),
    ("salr.losa.rmi.linear_cka", lambda: losa.linear_cka(torch.ones(4, 2), torch.ones(5, 2)), E, "x, y"),
    ("salr.losa.rmi.solve_box_lp", lambda: losa.solve_box_lp(torch.ones(2), 1.0, torch.ones(3), torch.ones(2)), E, "cost/lower/upper"),
    ("salr.losa.rmi.sparsity_delta", lambda: losa.sparsity_delta(1.0), E, "target"),
    ("salr.losa.ranks.allocate_ranks", lambda: losa.allocate_ranks([1.0, -1.0], 4, 8), E, "errors"),
    ("salr.losa.ranks.reconstruction_error", lambda: losa.reconstruction_error(torch.ones(2, 3), torch.ones(3, 2)), E, "dense/sparse"),
    ("salr.losa.schedule.cubic_sparsity", lambda: losa.cubic_sparsity(7, 5, 0.5), E, "t:"),
    ("salr.losa.schedule.sparsity_schedule", lambda: losa.sparsity_schedule(0.5, 0), E, "rounds"),
    # ---- SALOR
    ("salr.methods.salor.config.FactorSparsityConfig", lambda: salor_config.FactorSparsityConfig(sparsity=1.0), E, "sparsity"),
    ("salr.methods.salor.config.FactorSparsityConfig.ratio_at", lambda: salor_config.FactorSparsityConfig(0.5).ratio_at(-1), E, "step"),
    ("salr.methods.salor.factors.SALORAdapter", lambda: salor_factors.SALORAdapter(8, 8, 0, 1.0, salor_config.FactorSparsityConfig(0.5)), E, "rank"),
    ("salr.methods.salor.factors.FactorMasks.update_masks", lambda: salor_factors.SALORAdapter(8, 8, 2, 1.0, salor_config.FactorSparsityConfig(0.5)).update_masks(-1), E, "step"),
    ("salr.methods.salor.factors.SALORAdapter.forward", lambda: salor_factors.SALORAdapter(8, 8, 2, 1.0, salor_config.FactorSparsityConfig(0.5))(torch.ones(2, 7)), E, "x: last dimension 7"),
    ("salr.methods.salor.factors.magnitude_mask", lambda: salor_factors.magnitude_mask(torch.ones(4), 1.5), E, "sparsity"),
    ("salr.methods.salor.factors.nm_mask", lambda: salor_factors.nm_mask(torch.ones(2, 8), 2, 3), E, "M=3"),
    # ---- SALOR layers, files and interop, lm-eval
    ("salr.io.saved_model.is_saved_model", lambda: saved_model.is_saved_model(None), E, "directory"),
    ("salr.io.saved_model.is_saved_model", lambda: hf.is_saved_model(None), E, "directory"),
    ("salr.io.saved_model.load", lambda: hf.load("/nonexistent/model"), E, "directory"),
    ("salr.io.saved_model.read_record", lambda: hf.read_record("/nonexistent/model"), E, "directory"),
    ("salr.io.saved_model.save", lambda: hf.save(torch.nn.Linear(2, 2), "/tmp/salr-never-written"), E, "model"),
    ("salr.methods.salr.model.salr_layers", lambda: hf.salr_layers("model"), E, "model: expected a torch.nn.Module"),
    ("salr.interop.hf.conv1d_layers", lambda: hf.conv1d_layers("model"), E, "model: expected a torch.nn.Module"),
    ("salr.interop.hf.dense_state_dict", lambda: hf.dense_state_dict("model"), E, "model: expected a torch.nn.Module"),
    ("salr.io.saved_model.fill_tied_aliases", lambda: hf.fill_tied_aliases(model(), None), E, "state"),
    ("salr.interop.hf.to_transformers", lambda: hf.to_transformers("/nonexistent/model"), E, "directory"),
    ("salr.interop.compressed_tensors.bitmask_to_bm8x8", lambda: ict.bitmask_to_bm8x8(torch.ones(3), torch.zeros(4, 1, dtype=torch.uint8), None, (4, 8)), E, "compressed"),
    ("salr.interop.compressed_tensors.bm8x8_to_bitmask", lambda: ict.bm8x8_to_bitmask(torch.eye(8)), E, "weight"),
    ("salr.interop.compressed_tensors.export_compressed_tensors", lambda: ict.export_compressed_tensors(torch.nn.Linear(2, 2), "/tmp/salr-never-written"), E, "model"),
    ("salr.interop.compressed_tensors.import_compressed_tensors", lambda: ict.import_compressed_tensors("/nonexistent/ct"), E, "/nonexistent/ct"),
    ("salr.interop.compressed_tensors.read_sparsity_config", lambda: ict.read_sparsity_config("/nonexistent/ct"), E, "/nonexistent/ct"),
    ("salr.interop.peft.combined_adapter", lambda: ipeft.combined_adapter("layer"), E, "module"),
    ("salr.interop.peft.export_peft_adapter", lambda: ipeft.export_peft_adapter(model(), "/tmp/salr-never-written"), E, "model"),
    ("salr.interop.peft.load_peft_adapter", lambda: ipeft.load_peft_adapter(model(), "/nonexistent/peft"), E, "/nonexistent/peft"),
    ("salr.interop.peft.read_adapter_config", lambda: ipeft.read_adapter_config("/nonexistent/peft"), E, "/nonexistent/peft"),
    ("salr.eval.lm_eval.evaluate_tasks", lambda: lm_eval.evaluate_tasks(model(), None, []), E, "tasks"),
    ("salr.eval.lm_eval.lm_eval_model", lambda: lm_eval.lm_eval_model(model(), None), E, "tokenizer"),
    ("salr.methods.salor.config.FactorSparsityConfig.check_dims", lambda: salor_config.FactorSparsityConfig(0.5, "2:4").check_dims(10, 4), E, "10"),
    ("salr.methods.salor.config.FactorSparsityConfig.from_dict", lambda: salor_config.FactorSparsityConfig.from_dict({"sparsity": 0.5, "colour": 1}), E, "colour"),
    ("salr.methods.salor.config.FactorSparsityConfig.last_update", lambda: fc().last_update(-1), E, "step"),
    ("salr.methods.salor.config.FactorSparsityConfig.pruned_count", lambda: fc().pruned_count(-1, 0.5), E, "numel"),
    ("salr.methods.salor.factors.SparseFactors.from_dense", lambda: salor_factors.SparseFactors.from_dense(torch.ones(3), torch.ones(2, 2)), E, "a"),
    ("salr.methods.salor.factors.has_factor_masks", lambda: salor_factors.has_factor_masks("model"), E, "model: expected a torch.nn.Module"),
    ("salr.methods.salor.layer.SALORLinear", lambda: salor_layer.SALORLinear(16, 16, factor_config=None, lora_rank=4), E, "factor_config"),
    ("salr.methods.salor.layer.SALORLinear.from_salr", lambda: salor_layer.SALORLinear.from_salr(torch.nn.Linear(8, 8), fc()), E, "layer"),
    ("salr.methods.salor.layer.SALORLinear.forward", lambda: salor_layer.SALORLinear(16, 16, factor_config=fc(), lora_rank=4)(torch.ones(2, 15)), (RuntimeError, E), "x must have shape"),
    ("salr.methods.salor.model.check_targets", lambda: salor_model.check_targets(model(), SALRConfig(lora_rank=0), fc()), E, "lora_rank"),
    ("salr.io.saved_model.layer_record_fields", lambda: saved_model.layer_record_fields("layer"), E, "module"),
    ("salr.io.saved_model.layer_skeleton", lambda: saved_model.layer_skeleton({"in_features": 8}), E, "info"),
    ("salr.methods.convert.pop_factor_config", lambda: legacy.pop_factor_config("salr", fc(), {}), E, "factor_config"),
    ("salr.methods.salor.model.salor_layers", lambda: salor_model.salor_layers("model"), E, "model: expected a torch.nn.Module"),
    ("salr.methods.salor.model.to_salor", lambda: salor_model.to_salor(model(), None), E, "factor_config"),
    # ---- one entry point per method (salr.sparsify_ / salr.merge_), the configs, the deprecated convert
    ("salr.methods.registry.sparsify_", lambda: salr.sparsify_(model(), {"sparsity": 0.5}), E, "config: no method is registered for dict"),
    ("salr.methods.registry.sparsify_", lambda: salr.sparsify_("model", SALRConfig()), E, "model: expected a torch.nn.Module"),
    ("salr.methods.registry.handler_for", lambda: registry.handler_for(3), E, "config: no method is registered for int"),
    ("salr.methods.registry.merge_", lambda: salr.merge_(None), E, "model: expected a torch.nn.Module"),
    ("salr.methods.registry.register", lambda: registry.register("SALRConfig"), E, "config_type"),
    ("salr.methods.registry.register_layer", lambda: registry.register_layer(int), E, "layer_type"),
    ("salr.methods.salor.config.SALORConfig", lambda: salr.SALORConfig(factor_sparsity=0.5, lora_rank=0), E, "lora_rank"),
    ("salr.methods.salor.config.SALORConfig", lambda: salr.SALORConfig(), E, "factor_sparsity"),
    ("salr.methods.salor.config.SALORConfig", lambda: salr.SALORConfig(factor_sparsity=0.5, factor_update_every=0), E,
     "factor_update_every"),
    ("salr.methods.salor.config.SALORConfig.from_parts", lambda: salr.SALORConfig.from_parts(SALRConfig(lora_rank=0), fc()), E,
     "lora_rank"),
    ("salr.methods.salr.config.SALRConfig", lambda: SALRConfig(lora_alpha=0), E, "lora_alpha"),
    ("salr.methods.salr.config.SALRConfig", lambda: SALRConfig(lora_dropout=1.0), E, "lora_dropout"),
    ("salr.methods.salr.config.SALRConfig.from_dict", lambda: SALRConfig.from_dict({"alpha": 8.0, "lora_alpha": 8.0}), E,
     "lora_alpha: given twice"),
    ("salr.methods.salr.config.rename_legacy", lambda: rename_legacy({"dropout": 0.1, "lora_dropout": 0.1}), E,
     "lora_dropout: given twice"),
    ("salr.methods.salr.model.apply_salr", lambda: salr_model.apply_salr(model(), SALRConfig(criterion="wanda", svd_rank=4, lora_rank=4)), E, "calibration"),
    ("salr.methods.salr.model.convert_linears", lambda: salr_model.convert_linears(
        model(), SALRConfig(criterion="magnitude", target_modules=["qproj"]), None, progress=False, method="salr"), E,
     "target_modules"),
    ("salr.methods.salr.model.make_config", lambda: salr_model.make_config({"sparsity": 0.5}, {}), E, "config: expected a salr.SALRConfig"),
    ("salr.methods.salor.model.apply_salor", lambda: salor_model.apply_salor(
        model(), salr.SALORConfig(factor_pattern="2:4", lora_rank=6), progress=False), E, "factor_pattern"),
    ("salr.losa.model.losa_layers", lambda: losa.losa_layers("model"), E, "model: expected a torch.nn.Module"),
    ("salr.prune.masks.prune_smallest", lambda: masks.prune_smallest(torch.ones(2, 4), 5, dim=1), E, "k: must be in [0, 4]"),
    ("salr.methods.salor.factors.update_all_masks", lambda: salor_factors.update_all_masks("model", 1), E, "model: expected a torch.nn.Module"),
]


@pytest.mark.parametrize("name, call, error, fragment", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_argument_is_named(name, call, error, fragment):
    with pytest.raises(error) as caught:
        call()
    assert fragment in str(caught.value), f"{name}: the message does not say {fragment!r}: {caught.value}"


def public_callables() -> dict[str, object]:
    """Qualified name -> object for every public function, class and method of PUBLIC_MODULES."""
    found = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        for n in names:
            obj = getattr(module, n)
            if inspect.ismodule(obj) or not callable(obj) or not getattr(obj, "__module__", "").startswith("salr"):
                continue
            if not hasattr(module, "__all__") and obj.__module__ != module_name:
                continue  # imported helpers belong to their own module
            key = f"{obj.__module__}.{obj.__qualname__}"
            found[key] = obj
            if inspect.isclass(obj):
                for method, member in vars(obj).items():
                    function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                    if not method.startswith("_") and inspect.isfunction(function):
                        found[f"{key}.{method}"] = function
    return found


def test_every_public_callable_is_covered():
    covered = {c[0] for c in CASES} | NO_ARGUMENTS_TO_CHECK
    missing = sorted(set(public_callables()) - covered)
    assert not missing, (f"public callables without a bad-argument case in CASES (or an entry in "
                         f"NO_ARGUMENTS_TO_CHECK): {missing}")
    stale = sorted(covered - set(public_callables()))
    assert not stale, f"entries for callables that are not public (renamed or removed?): {stale}"


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
from salr import BitmapSparseWeight, checkpoint, ops, pruning, salor, svd_adapter
from salr import batches, evaluate, generation, losa, training
from salr import lm_eval_adapter as lea
from salr import salor_linear as sl
from salr.interop import compressed_tensors as ict
from salr.interop import hf
from salr.interop import peft as ipeft
from salr.salr_linear import SALRConfig, SALRLinear, dtype_from_name
from salr_helpers import one_thread, tiny_model  # noqa: F401  (autouse fixture)

PUBLIC_MODULES = ["salr", "salr.ops", "salr.format", "salr.convert", "salr.pruning", "salr.svd_adapter",
                  "salr.salr_linear", "salr.training", "salr.batches", "salr.evaluate", "salr.losa", "salr.salor",
                  "salr.generation", "salr.checkpoint", "salr.salor_linear", "salr.interop.hf", "salr.interop.peft",
                  "salr.interop.compressed_tensors", "salr.lm_eval_adapter"]

# Callables with nothing a caller could get wrong (no arguments, or only `self`), and result records.
NO_ARGUMENTS_TO_CHECK = {
    "salr._native.available_cpu_isas", "salr._native.cpu_isa", "salr._native.native_available",
    "salr._native.native_error", "salr.training.distributed_context", "salr.checkpoint.capture_rng_state",
    "salr.format.BitmapSparseWeight.to_dense", "salr.format.BitmapSparseWeight.validate",
    "salr.format.BitmapSparseWeight.bytes_per_weight",
    "salr.salr_linear.SALRConfig.to_dict", "salr.salr_linear.SALRLinear.compressed_bytes",
    "salr.salr_linear.SALRLinear.to_dense", "salr.salr_linear.SALRLinear.base_dense",
    "salr.salr_linear.SALRLinear.merge", "salr.salr_linear.SALRLinear.extra_repr",
    "salr.salr_linear.SALRLinear.combined_adapter", "salr.salor_linear.SALORLinear.combined_adapter",
    "salr.training.TrainConfig.to_dict", "salr.batches.IterableBatches.state_dict",
    "salr.batches.TokenWindows.state_dict", "salr.batches.IterableBatches.take",  # rows: the iterable decides
    "salr.losa.pipeline.LoSAConfig.to_dict",
    "salr.losa.pipeline.LoSAReport.to_dict", "salr.losa.masked_lora.LoSALinear.extra_repr",
    "salr.losa.masked_lora.LoSALinear.mask", "salr.losa.masked_lora.LoSALinear.delta_values",
    "salr.losa.masked_lora.LoSALinear.merged_values", "salr.losa.masked_lora.LoSALinear.effective_weight",
    "salr.losa.masked_lora.LoSALinear.merge", "salr.losa.rmi.StreamingCKA.matrix",
    "salr.salor.FactorMasks", "salr.salor.FactorMasks.apply_masks", "salr.salor.FactorMasks.masked_factors",
    "salr.salor.FactorMasks.factor_sparsity", "salr.salor.SALORAdapter.to_sparse",
    "salr.salor.FactorSparsityConfig.to_dict", "salr.salor_linear.SALORLinear.compressed_bytes",
    "salr.salor_linear.SALORLinear.lora_bytes", "salr.salor_linear.SALORLinear.merge",
    "salr.salor_linear.SALORLinear.to_dense", "salr.salor_linear.SALORLinear.extra_repr",
    "salr.lm_eval_adapter.available",
    # Result records filled in by salr itself, not by callers.
    "salr.losa.pipeline.LoSAReport", "salr.losa.pipeline.RoundReport", "salr.generation.DecodeResult",
    "salr.salor.SparseFactors",
    # torch.autograd.Function: called through salr.losa.masked_lora_linear (in the table).
    "salr.losa.masked_lora.MaskedLoRAFunction", "salr.losa.masked_lora.MaskedLoRAFunction.forward",
    "salr.losa.masked_lora.MaskedLoRAFunction.backward",
}

W = torch.zeros(16, 16)
E = ValueError


def weight():
    return BitmapSparseWeight.from_dense(torch.eye(16))


def layer():
    return SALRLinear.from_weights(torch.eye(16), svd_a=torch.randn(2, 16), svd_b=torch.randn(16, 2))


def fc():
    return salor.FactorSparsityConfig(0.5)


def model():
    return tiny_model("llama", hidden=32, layers=1)


# (qualified name, bad call, error type, message fragment)
CASES = [
    # ---- ops (the native ops raise at the C++ boundary: RuntimeError naming op and argument)
    ("salr.ops.bitmap_encode", lambda: ops.bitmap_encode(torch.zeros(3)), (RuntimeError, E), "bitmap_encode: dense must be 2-D"),
    ("salr.ops.bitmap_decode", lambda: ops.bitmap_decode(*ops.bitmap_encode(W), 16, 24), (RuntimeError, E), "bitmap must have shape"),
    ("salr.ops.sparse_lowrank_gemm", lambda: ops.sparse_lowrank_gemm(torch.ones(2, 15), *ops.bitmap_encode(W), 16, 16),
     (RuntimeError, E), "x must have shape"),
    ("salr.ops.sparse_gemm_transposed", lambda: ops.sparse_gemm_transposed(torch.ones(2, 15), *ops.bitmap_encode(W), 16, 16),
     (RuntimeError, E), "grad_out must have shape"),
    ("salr.ops.sampled_gemm", lambda: ops.sampled_gemm(torch.ones(2, 16), torch.ones(3, 16), *ops.bitmap_encode(W), 16, 16),
     (RuntimeError, E), "right must have shape"),
    # ---- format
    ("salr.format.BitmapSparseWeight", lambda: BitmapSparseWeight(*ops.bitmap_encode(W), 16, -1), E, "rows and cols must be >= 0"),
    ("salr.format.BitmapSparseWeight.from_dense", lambda: BitmapSparseWeight.from_dense(torch.zeros(3)), E, "dense must be 2-D"),
    ("salr.format.BitmapSparseWeight.to", lambda: weight().to(dtype=torch.int8), E, "dtype: must be"),
    ("salr.format.BitmapSparseWeight.linear", lambda: weight().linear(torch.ones(2, 15)), (RuntimeError, E), "x must have shape"),
    ("salr.format.BitmapSparseWeight.save", lambda: weight().save("/nonexistent-dir/w.safetensors"), E, "path: "),
    ("salr.format.BitmapSparseWeight.load", lambda: BitmapSparseWeight.load("/nonexistent/w.safetensors"), E, "cannot read"),
    ("salr.format.tensors_sha256", lambda: salr.format.tensors_sha256({"a": [1]}), E, "tensors['a']: expected a tensor"),
    # ---- SALR config and layer
    ("salr.salr_linear.SALRConfig", lambda: SALRConfig(sparsity=1.5), E, "sparsity"),
    ("salr.salr_linear.SALRConfig", lambda: SALRConfig(criterion="random"), E, "criterion"),
    ("salr.salr_linear.SALRConfig.layer_sparsity", lambda: SALRConfig(sparsity=(0.5, 0.5)).layer_sparsity(5, "x"), E, "block_index"),
    ("salr.salr_linear.SALRConfig.from_dict", lambda: SALRConfig.from_dict({"sparsity": 0.5, "colour": 1}), E, "colour"),
    ("salr.salr_linear.SALRLinear", lambda: SALRLinear(0, 8), E, "in_features"),
    ("salr.salr_linear.SALRLinear.from_weights", lambda: SALRLinear.from_weights(torch.zeros(3)), E, "pruned_weight"),
    ("salr.salr_linear.SALRLinear.from_linear", lambda: SALRLinear.from_linear(torch.nn.Linear(8, 8), sparsity=2.0), E, "sparsity"),
    ("salr.salr_linear.SALRLinear.set_base", lambda: layer().set_base(torch.zeros(8, 16)), E, "pruned_weight"),
    ("salr.salr_linear.SALRLinear.forward", lambda: layer()(torch.ones(2, 15)), (RuntimeError, E), "x must have shape"),
    ("salr.salr_linear.dtype_from_name", lambda: dtype_from_name("float7"), E, "dtype"),
    # ---- whole models
    ("salr.convert.convert", lambda: salr.convert.convert(model(), sparsity=-0.5, progress=False), E, "sparsity"),
    ("salr.convert.convert", lambda: salr.convert.convert(model(), method="dense", progress=False), E, "method"),
    ("salr.convert.prune_model", lambda: salr.convert.prune_model(model(), criterion="wanda", progress=False), E, "calibration"),
    ("salr.convert.save", lambda: salr.convert.save(torch.nn.Linear(2, 2), "/tmp/salr-never-written"), E, "model"),
    ("salr.convert.load", lambda: salr.convert.load("/nonexistent/model"), E, "directory"),
    ("salr.convert.read_record", lambda: salr.convert.read_record("/nonexistent/model"), E, "directory"),
    ("salr.convert.salr_layers", lambda: salr.convert.salr_layers("model"), E, "model: expected a torch.nn.Module"),
    ("salr.convert.freeze_all_but_adapters", lambda: salr.convert.freeze_all_but_adapters(None), E, "model: expected a torch.nn.Module"),
    ("salr.evaluate.perplexity", lambda: evaluate.perplexity(model(), torch.zeros(2, 8, dtype=torch.long), batch_size=0), E, "batch_size"),
    ("salr.evaluate.mean_nll", lambda: evaluate.mean_nll(model(), torch.ones(2, 8)), E, "windows"),
    ("salr.generation.decode_speed", lambda: generation.decode_speed(None, None, "hi", new_tokens=1), E, "new_tokens"),
    # ---- pruning and SVD
    ("salr.pruning.check_criterion", lambda: pruning.check_criterion("random"), E, "criterion"),
    ("salr.pruning.check_nm_width", lambda: pruning.check_nm_width(10, (2, 4)), E, "weight"),
    ("salr.pruning.check_sparsity", lambda: pruning.check_sparsity(1.0), E, "sparsity"),
    ("salr.pruning.count", lambda: pruning.count(1.5, 10), E, "fraction"),
    ("salr.pruning.magnitude_scores", lambda: pruning.magnitude_scores(torch.zeros(3)), E, "weight"),
    ("salr.pruning.wanda_scores", lambda: pruning.wanda_scores(torch.zeros(4, 4), torch.ones(5)), E, "input_norms"),
    ("salr.pruning.mask_from_scores", lambda: pruning.mask_from_scores(torch.zeros(4, 4), 0.5, group="diagonal"), E, "group"),
    ("salr.pruning.mask_sparsity", lambda: pruning.mask_sparsity(torch.zeros(4)), E, "keep"),
    ("salr.pruning.parse_pattern", lambda: pruning.parse_pattern("4:2"), E, "pattern"),
    ("salr.pruning.prune_weight", lambda: pruning.prune_weight(torch.zeros(4, 4), "wanda", 0.5), E, "input_norms"),
    ("salr.pruning.resolve_group", lambda: pruning.resolve_group("diagonal", "magnitude", None), E, "group"),
    ("salr.pruning.resolve_sparsity", lambda: pruning.resolve_sparsity(0.3, "2:4"), E, "sparsity"),
    ("salr.svd_adapter.check_rank", lambda: svd_adapter.check_rank(20, 8, 8), E, "rank"),
    ("salr.svd_adapter.eckart_young_bound", lambda: svd_adapter.eckart_young_bound(-1, 8, 8), E, "rank"),
    ("salr.svd_adapter.randomized_svd", lambda: svd_adapter.randomized_svd(torch.zeros(8, 8), 0), E, "rank"),
    ("salr.svd_adapter.residual_adapter", lambda: svd_adapter.residual_adapter(torch.zeros(8, 8), torch.zeros(8, 9), 2), E, "pruned"),
    ("salr.svd_adapter.svd_factors", lambda: svd_adapter.svd_factors(torch.zeros(8, 8), 2, method="qr"), E, "method"),
    # ---- training
    ("salr.training.TrainConfig", lambda: training.TrainConfig(lr=-1.0), E, "TrainConfig.lr"),
    ("salr.training.TrainConfig", lambda: training.TrainConfig(schedule="step"), E, "TrainConfig.schedule"),
    ("salr.training.lr_factor", lambda: training.lr_factor(-1, training.TrainConfig()), E, "step"),
    ("salr.training.train", lambda: training.train(torch.nn.Linear(2, 2), [], {"lr": 1}), E, "config"),
    ("salr.training.init_distributed_from_env", lambda: training.init_distributed_from_env("carrier-pigeon"), E, "backend"),
    ("salr.batches.TokenWindows", lambda: batches.TokenWindows(torch.arange(10), 1), E, "seq_len"),
    ("salr.batches.TokenWindows.take", lambda: batches.TokenWindows(torch.arange(10), 2).take(-1), E, "rows"),
    ("salr.batches.TokenWindows.load_state_dict", lambda: batches.TokenWindows(torch.arange(10), 2).load_state_dict({}), E, "state"),
    ("salr.batches.IterableBatches", lambda: batches.IterableBatches(5), E, "iterable"),
    ("salr.batches.IterableBatches.load_state_dict", lambda: batches.IterableBatches([]).load_state_dict({"taken": -1}), E, "state"),
    ("salr.batches.as_source", lambda: batches.as_source(5), E, "train_batches"),
    ("salr.batches.shard_batch", lambda: batches.shard_batch({"labels": 1}, 0, 1, torch.device("cpu")), E, "input_ids"),
    ("salr.checkpoint.save_checkpoint", lambda: checkpoint.save_checkpoint("/tmp/salr-never", -1, torch.nn.Linear(2, 2), None, None,
                                                                          data_state={}), E, "step"),
    ("salr.checkpoint.full_tensor", lambda: checkpoint.full_tensor([1.0]), E, "t: expected a torch.Tensor"),
    ("salr.checkpoint.load_checkpoint", lambda: checkpoint.load_checkpoint("/nonexistent", torch.nn.Linear(2, 2)), E, "not a complete checkpoint"),
    ("salr.checkpoint.save_trainable", lambda: checkpoint.save_trainable(torch.nn.Linear(2, 2).requires_grad_(False), "/tmp/x"), E,
     "no parameter with requires_grad"),
    ("salr.checkpoint.load_trainable", lambda: checkpoint.load_trainable(torch.nn.Linear(2, 2), "/nonexistent.safetensors"), E, "cannot read"),
    ("salr.checkpoint.verify_checkpoint", lambda: checkpoint.verify_checkpoint(None), E, "path"),
    ("salr.checkpoint.find_latest_checkpoint", lambda: checkpoint.find_latest_checkpoint(None), E, "run_dir"),
    ("salr.checkpoint.checkpoint_root", lambda: checkpoint.checkpoint_root(None), E, "run_dir"),
    ("salr.checkpoint.read_checkpoint_state", lambda: checkpoint.read_checkpoint_state("/nonexistent"), E, "state.json"),
    ("salr.checkpoint.restore_rng_state", lambda: checkpoint.restore_rng_state({}, {}), E, "rng.torch"),
    ("salr.checkpoint.trainable_parameters", lambda: checkpoint.trainable_parameters("model"), E, "model: expected a torch.nn.Module"),
    ("salr.checkpoint.unwrap_model", lambda: checkpoint.unwrap_model(None), E, "model: expected a torch.nn.Module"),
    # ---- LoSA
    ("salr.losa.pipeline.LoSAConfig", lambda: losa.LoSAConfig(sparsity=1.2), E, "sparsity"),
    ("salr.losa.pipeline.run", lambda: losa.run(model(), {"sparsity": 0.5}, None, None), E, "config"),
    ("salr.losa.pipeline.block_cka", lambda: losa.block_cka(model(), torch.ones(2, 8)), E, "calibration"),
    ("salr.losa.pipeline.wanda_keep", lambda: losa.wanda_keep(torch.zeros(4, 4), torch.ones(5), 0.5), E, "column_norms"),
    ("salr.losa.pipeline.export_salr", lambda: losa.export_salr("model"), E, "model: expected a torch.nn.Module"),
    ("salr.losa.masked_lora.LoSALinear", lambda: losa.LoSALinear(torch.zeros(3)), E, "weight"),
    ("salr.losa.masked_lora.LoSALinear.from_linear", lambda: losa.LoSALinear.from_linear(torch.nn.Linear(8, 8), rank=-1), E, "rank"),
    ("salr.losa.masked_lora.LoSALinear.forward", lambda: losa.LoSALinear(torch.eye(8))(torch.ones(2, 7)), E, "x: last dimension 7"),
    ("salr.losa.masked_lora.LoSALinear.apply_mask", lambda: losa.LoSALinear(torch.eye(8)).apply_mask(torch.ones(3, 3, dtype=torch.bool)), E, "keep"),
    ("salr.losa.masked_lora.LoSALinear.resize_rank", lambda: losa.LoSALinear(torch.eye(8)).resize_rank(-1), E, "rank: must be an integer >= 0"),
    ("salr.losa.masked_lora.masked_lora_linear", lambda: losa.masked_lora_linear(
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
    ("salr.salor.FactorSparsityConfig", lambda: salor.FactorSparsityConfig(sparsity=1.0), E, "sparsity"),
    ("salr.salor.FactorSparsityConfig.ratio_at", lambda: salor.FactorSparsityConfig(0.5).ratio_at(-1), E, "step"),
    ("salr.salor.SALORAdapter", lambda: salor.SALORAdapter(8, 8, 0, 1.0, salor.FactorSparsityConfig(0.5)), E, "rank"),
    ("salr.salor.FactorMasks.update_masks", lambda: salor.SALORAdapter(8, 8, 2, 1.0, salor.FactorSparsityConfig(0.5)).update_masks(-1), E, "step"),
    ("salr.salor.SALORAdapter.forward", lambda: salor.SALORAdapter(8, 8, 2, 1.0, salor.FactorSparsityConfig(0.5))(torch.ones(2, 7)), E, "x: last dimension 7"),
    ("salr.salor.magnitude_mask", lambda: salor.magnitude_mask(torch.ones(4), 1.5), E, "sparsity"),
    ("salr.salor.nm_mask", lambda: salor.nm_mask(torch.ones(2, 8), 2, 3), E, "M=3"),
    # ---- SALOR layers, files and interop, lm-eval
    ("salr.convert.is_saved_model", lambda: salr.convert.is_saved_model(None), E, "directory"),
    ("salr.interop.hf.is_saved_model", lambda: hf.is_saved_model(None), E, "directory"),
    ("salr.interop.hf.load", lambda: hf.load("/nonexistent/model"), E, "directory"),
    ("salr.interop.hf.read_record", lambda: hf.read_record("/nonexistent/model"), E, "directory"),
    ("salr.interop.hf.save", lambda: hf.save(torch.nn.Linear(2, 2), "/tmp/salr-never-written"), E, "model"),
    ("salr.interop.hf.salr_layers", lambda: hf.salr_layers("model"), E, "model: expected a torch.nn.Module"),
    ("salr.interop.hf.conv1d_layers", lambda: hf.conv1d_layers("model"), E, "model: expected a torch.nn.Module"),
    ("salr.interop.hf.dense_state_dict", lambda: hf.dense_state_dict("model"), E, "model: expected a torch.nn.Module"),
    ("salr.interop.hf.fill_tied_aliases", lambda: hf.fill_tied_aliases(model(), None), E, "state"),
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
    ("salr.lm_eval_adapter.evaluate_tasks", lambda: lea.evaluate_tasks(model(), None, []), E, "tasks"),
    ("salr.lm_eval_adapter.lm_eval_model", lambda: lea.lm_eval_model(model(), None), E, "tokenizer"),
    ("salr.salor.FactorSparsityConfig.check_dims", lambda: salor.FactorSparsityConfig(0.5, "2:4").check_dims(10, 4), E, "10"),
    ("salr.salor.FactorSparsityConfig.from_dict", lambda: salor.FactorSparsityConfig.from_dict({"sparsity": 0.5, "colour": 1}), E, "colour"),
    ("salr.salor.FactorSparsityConfig.last_update", lambda: fc().last_update(-1), E, "step"),
    ("salr.salor.FactorSparsityConfig.pruned_count", lambda: fc().pruned_count(-1, 0.5), E, "numel"),
    ("salr.salor.SparseFactors.from_dense", lambda: salor.SparseFactors.from_dense(torch.ones(3), torch.ones(2, 2)), E, "a"),
    ("salr.salor.has_factor_masks", lambda: salor.has_factor_masks("model"), E, "model: expected a torch.nn.Module"),
    ("salr.salor_linear.SALORLinear", lambda: sl.SALORLinear(16, 16, factor_config=None, lora_rank=4), E, "factor_config"),
    ("salr.salor_linear.SALORLinear.from_salr", lambda: sl.SALORLinear.from_salr(torch.nn.Linear(8, 8), fc()), E, "layer"),
    ("salr.salor_linear.SALORLinear.forward", lambda: sl.SALORLinear(16, 16, factor_config=fc(), lora_rank=4)(torch.ones(2, 15)), (RuntimeError, E), "x must have shape"),
    ("salr.salor_linear.check_targets", lambda: sl.check_targets(model(), SALRConfig(lora_rank=0), fc()), E, "lora_rank"),
    ("salr.salor_linear.layer_record_fields", lambda: sl.layer_record_fields("layer"), E, "module"),
    ("salr.salor_linear.layer_skeleton", lambda: sl.layer_skeleton({"in_features": 8}), E, "info"),
    ("salr.salor_linear.pop_factor_config", lambda: sl.pop_factor_config("salr", fc(), {}), E, "factor_config"),
    ("salr.salor_linear.salor_layers", lambda: sl.salor_layers("model"), E, "model: expected a torch.nn.Module"),
    ("salr.salor_linear.to_salor", lambda: sl.to_salor(model(), None), E, "factor_config"),
    ("salr.salor.update_all_masks", lambda: salor.update_all_masks("model", 1), E, "model: expected a torch.nn.Module"),
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


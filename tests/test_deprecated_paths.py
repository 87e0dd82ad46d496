"""The module paths of salr 0.1 keep working for one release: importing each one warns
DeprecationWarning, and it holds the same objects as their new homes (every class, function and
constant the old module defined; the table was generated from main at ea258b7). The unused
``salr.workflow.Stage`` was removed with the redesign and is the one name left out."""

from __future__ import annotations

import importlib
import inspect
import sys

import pytest

import salr
from salr._compat import ALIASES

# old module -> the public names it defined on main (classes, functions, constants).
OLD_NAMES = {
    "salr._meta": ["gemm_backward_products"],
    "salr.assets": ["EVAL_WINDOWS", "MissingAssetError", "SEQ_LEN", "SMOLLM2", "SMOLLM2_CACHE_NAME",
        "SMOLLM2_GGUF", "SMOLLM2_MODULE", "SMOLLM2_PACKAGE", "TRAIN_FRACTION", "TextSplits",
        "WIKIPEDIA", "WIKI_FILE", "cache_dir", "calibration_windows", "eval_windows", "load_model",
        "read_documents", "resolve_model_dir", "smollm2_dir", "smollm2_gguf_path",
        "split_documents", "text_splits", "tokenize", "wikipedia_articles", "wikipedia_path",
        "write_directory_atomically"],
    "salr.batches": ["IterableBatches", "TokenWindows", "as_source", "shard_batch"],
    "salr.benchmark": ["ADAPTER_RANK", "DTYPES", "HEADER", "Rotation", "bench_case",
        "bulk_read_gbps", "crossover", "format_row", "machine_line", "main", "median_seconds",
        "random_sparse_weight", "run_grid"],
    "salr.calibration": ["LinearStats", "capture_first_block_inputs", "check_calibration",
        "run_sequential"],
    "salr.checkpoint": ["CHECKPOINT_DIRNAME", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION",
        "STATE_FILE", "TRAINABLE_FILE", "TRAIN_STATE_FILE", "capture_rng_state", "checkpoint_root",
        "find_latest_checkpoint", "full_tensor", "load_checkpoint", "load_trainable",
        "read_checkpoint_state", "restore_rng_state", "save_checkpoint", "save_trainable",
        "trainable_parameters", "unwrap_model", "verify_checkpoint"],
    "salr.convert": ["CONFIG_FILE", "METHODS", "convert", "freeze_all_but_adapters",
        "is_saved_model", "load", "prune_model", "read_record", "salr_layers", "save"],
    "salr.demo": ["RELOAD_TOLERANCE", "run_demo"],
    "salr.evaluate": ["mean_nll", "perplexity"],
    "salr.format": ["BitmapSparseWeight", "FORMAT_NAME", "FORMAT_VERSION", "tensors_sha256"],
    "salr.generation": ["DecodeResult", "decode_speed"],
    "salr.lm_eval_adapter": ["INSTALL_HINT", "available", "evaluate_tasks", "lm_eval_model"],
    "salr.models": ["BLOCK_PATHS", "block_linears", "find_blocks", "is_conv1d", "is_linear",
        "iter_linears", "linear_dims", "model_device", "set_submodule", "vocab_size", "weight_view"],
    "salr.pipeline": ["METHOD_OPTIONS", "cmd_bench", "cmd_demo", "cmd_eval", "cmd_finetune",
        "cmd_prune"],
    "salr.pruning": ["CRITERIA", "DEFAULT_GROUP", "GROUPS", "check_criterion", "check_nm_width",
        "check_sparsity", "count", "magnitude_scores", "mask_from_scores", "mask_sparsity",
        "parse_pattern", "prune_weight", "resolve_group", "resolve_sparsity", "wanda_scores"],
    "salr.reference": ["TILE", "TILES_PER_GROUP", "bitmap_decode", "bitmap_encode", "check_weight",
        "from_tiles", "group_counts", "groups_per_band", "num_bands", "num_offsets",
        "offsets_from_counts", "popcount64", "sampled_gemm", "sparse_gemm_transposed",
        "sparse_lowrank_gemm", "tiles_per_band", "to_tiles", "unpack_bitmap"],
    "salr.runs": ["RunDirectory", "atomic_write_text", "environment", "markdown_table", "plot_bars",
        "plot_loss", "plot_per_layer"],
    "salr.salor": ["FactorMasks", "FactorSparsityConfig", "NAMES", "SALORAdapter", "SparseFactors",
        "has_factor_masks", "magnitude_mask", "nm_mask", "update_all_masks"],
    "salr.salor_linear": ["FACTOR_OPTIONS", "SALORLinear", "check_targets", "layer_record_fields",
        "layer_skeleton", "pop_factor_config", "salor_layers", "to_salor"],
    "salr.salr_linear": ["SALRConfig", "SALRLinear", "SVD_METHODS", "dtype_from_name"],
    "salr.sparsegpt": ["sparsegpt_prune"],
    "salr.svd_adapter": ["SVD_METHODS", "check_rank", "eckart_young_bound", "randomized_svd",
        "residual_adapter", "svd_factors"],
    "salr.training": ["AUTOCAST_CHOICES", "PARALLEL", "SCHEDULES", "TrainConfig",
        "distributed_context", "init_distributed_from_env", "lr_factor", "train"],
    "salr.workflow": ["Budget", "PROMPT", "Timer", "compare_speed", "dense_copy", "evaluate",
        "finetune", "layer_table", "load", "merge_all", "prune", "reload_matches"],
    "salr.interop.files": ["CHECKSUM_PLACEHOLDER", "check_destination", "file_digest", "parse_size",
        "read_json", "read_shards", "unique_tensors", "verify_checksummed_json", "verify_files",
        "write_checksummed_json", "write_json", "write_shards"],
    "salr.losa.masked_lora": ["LoSALinear", "MaskedLoRAFunction", "masked_lora_linear"],
    "salr.losa.pipeline": ["LAYERWISE", "LoSAConfig", "LoSAReport", "RANK_ALLOCATION",
        "RoundReport", "block_cka", "export_salr", "losa_layers", "round_warmup", "run",
        "trainable_count", "wanda_keep"],
}


def fresh_import(name: str):
    sys.modules.pop(name, None)  # an alias imported by an earlier test would not warn again
    return importlib.import_module(name)


def test_every_old_module_is_aliased():
    assert sorted(OLD_NAMES) == sorted(ALIASES)


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_path_warns_and_exposes_the_same_objects(old):
    with pytest.warns(DeprecationWarning, match=f"{old} is deprecated.*import from {ALIASES[old][0]}"):
        module = fresh_import(old)
    for name in OLD_NAMES[old]:
        assert hasattr(module, name), f"{old}.{name} is gone"
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            home = importlib.import_module(obj.__module__)
            assert obj.__module__.split(".")[1] in {"ops", "nn", "prune", "methods", "train", "eval", "io", "interop",
                                                    "losa", "cli"}, f"{old}.{name} lives in {obj.__module__}"
            assert getattr(home, obj.__name__) is obj


def test_the_warning_points_at_the_importing_line():
    sys.modules.pop("salr.pruning", None)
    with pytest.warns(DeprecationWarning) as caught:
        import salr.pruning  # noqa: F401
    assert caught[0].filename == __file__


def test_old_attribute_access_on_the_package():
    sys.modules.pop("salr.convert", None)
    vars(salr).pop("convert", None)  # set by an earlier import of the alias
    with pytest.warns(DeprecationWarning):
        legacy = salr.convert  # no import statement: the package's __getattr__ imports the alias
    from salr.methods.convert import convert

    assert legacy.convert is convert
    with pytest.raises(AttributeError):
        salr.no_such_module  # noqa: B018


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_deprecated_convert_is_sparsify_with_the_old_keywords():
    """salr.convert.convert(model, **old keywords) builds the same model as salr.sparsify_ with the
    config of the new names (alpha -> lora_alpha), and warns."""
    from salr_helpers import tiny_model

    from salr.methods.convert import convert

    with pytest.warns(DeprecationWarning, match="use salr.sparsify_"):
        old = convert(tiny_model("llama"), criterion="magnitude", svd_rank=4, lora_rank=4, alpha=8.0, progress=False)
    new = salr.sparsify_(tiny_model("llama"), salr.SALRConfig(criterion="magnitude", svd_rank=4, lora_rank=4,
                                                              lora_alpha=8.0), progress=False)
    assert old.salr_config == new.salr_config and old.salr_method == new.salr_method == "salr"
    old_state, new_state = old.state_dict(), new.state_dict()
    assert old_state.keys() == new_state.keys()
    assert all(k.endswith("lora_a") or old_state[k].equal(new_state[k]) for k in old_state)  # LoRA A is random

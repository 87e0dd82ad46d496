"""`--quantize int8` on the command line (issue 21), on a tiny local Llama + word-level tokenizer:
prune and finetune save int8 bases that reload with the reported perplexity, LoSA quantizes after
its last merge, and a bad value is one line on stderr with exit status 2 before any run directory."""

from __future__ import annotations

import json

import pytest
import torch

import salr
from salr import cli
from salr.methods.salr.model import salr_layers
from salr_helpers import write_tiny_cli_assets

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("tokenizers", reason="tokenizers is not installed")

SEQ = ["--seq-len", "32", "--eval-windows", "4", "--calib-windows", "4"]
TRAIN = ["--train-seq-len", "32", "--batch-size", "2", "--warmup", "1", "--steps", "3", "--lora-rank", "4",
         "--svd-rank", "4"]


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    return write_tiny_cli_assets(tmp_path_factory.mktemp("tiny_int8"))


def run(tiny_assets, command, out, *extra):
    model_dir, text = tiny_assets
    return cli.main([command, "--model", str(model_dir), "--text", str(text), "--out", str(out), *SEQ, *extra])


def _reloaded_perplexity(tiny_assets, directory):
    from salr.cli import assets
    from salr.eval.perplexity import perplexity

    model = salr.load(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    windows = assets.text_splits(tokenizer, tiny_assets[1]).eval_windows(4, 32)
    return model, perplexity(model, windows, desc="reload")


@pytest.mark.parametrize("criterion, group", [("wanda", []), ("sparsegpt", ["--quantize-group-size", "64"])])
def test_prune_quantize_int8(tiny_assets, tmp_path, criterion, group):
    out = tmp_path / "run"
    assert run(tiny_assets, "prune", out, "--criterion", criterion, "--svd-rank", "4", "--quantize", "int8",
               *group) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    model, ppl = _reloaded_perplexity(tiny_assets, out / "model")
    layers = salr_layers(model)
    assert layers and all(m.values.dtype == torch.int8 for m in layers.values())
    assert all((m.scales.dim() == 2) == bool(group) for m in layers.values())
    assert ppl == pytest.approx(metrics["stages"]["pruned"]["perplexity"], rel=1e-5)


def test_finetune_quantize_int8(tiny_assets, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_assets, "finetune", out, *TRAIN, "--quantize", "int8") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    model, ppl = _reloaded_perplexity(tiny_assets, out / "model")
    assert all(m.values.dtype == torch.int8 and m.lora_rank == 0 for m in salr_layers(model).values())
    assert model.salr_config.quantize == "int8"
    assert ppl == pytest.approx(metrics["stages"]["fine-tuned"]["perplexity"], rel=1e-5)


def test_finetune_quantize_adapters_int8(tiny_assets, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_assets, "finetune", out, *TRAIN, "--quantize", "int8", "--quantize-adapters", "int8") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["stages"]) == ["pruned", "fine-tuned", "int8 adapters"]
    model, ppl = _reloaded_perplexity(tiny_assets, out / "model")
    layers = salr_layers(model).values()
    assert all(m.svd_a.dtype == m.svd_b.dtype == torch.int8 and m.adapter_scales.shape == (m.out_features,)
               for m in layers)
    record = json.loads((out / "model" / "config.json").read_text())["salr"]
    assert record["adapter_quantize"] == "int8"
    assert all(r["adapter_quantize"] == "int8" for r in record["layers"].values())
    # The saved model is the one evaluated after the adapters were rounded, and rounding moved it a little.
    assert ppl == pytest.approx(metrics["stages"]["int8 adapters"]["perplexity"], rel=1e-5)
    assert ppl != metrics["stages"]["fine-tuned"]["perplexity"]
    assert ppl == pytest.approx(metrics["stages"]["fine-tuned"]["perplexity"], rel=0.05)


def test_losa_quantizes_after_its_last_merge(tiny_assets, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_assets, "finetune", out, "--method", "losa", "--rounds", "2", "--steps", "2",
               "--lora-rank", "2", "--train-seq-len", "32", "--batch-size", "2", "--warmup", "1",
               "--quantize", "int8") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["stages"]) == ["dense", "LoSA (merged)", "LoSA (merged, int8)"]
    model, ppl = _reloaded_perplexity(tiny_assets, out / "model")
    assert all(m.values.dtype == torch.int8 for m in salr_layers(model).values())
    assert ppl == pytest.approx(metrics["stages"]["LoSA (merged, int8)"]["perplexity"], rel=1e-5)


@pytest.mark.parametrize("command, extra, message", [
    ("prune", ["--quantize", "int4"], "salr prune: error: --quantize: expected None or one of int8, got 'int4'"),
    ("finetune", ["--quantize", "fp8"], "salr finetune: error: --quantize: expected None or one of int8"),
    ("finetune", ["--method", "losa", "--quantize", "int3"], "--quantize: expected None or one of int8"),
    ("prune", ["--quantize", "int8", "--quantize-group-size", "32"], "--quantize-group-size: expected None"),
    ("prune", ["--quantize-group-size", "64"], "--quantize-group-size: only with --quantize int8"),
    ("finetune", ["--quantize-adapters", "int4"], "salr finetune: error: --quantize-adapters: expected None or one"),
    ("finetune", ["--method", "losa", "--quantize-adapters", "int8"],
     "--quantize-adapters: a merged LoSA model has no adapters"),
])
def test_bad_quantize_is_one_line(tiny_assets, tmp_path, command, extra, message, capsys):
    out = tmp_path / "run"
    assert run(tiny_assets, command, out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before the run directory was made


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "int4"], "salr demo: error: --quantize: expected None or one of int8"),
    (["--quantize-adapters", "int4"], "salr demo: error: --quantize-adapters: expected None or one of int8"),
    (["--method", "losa", "--quantize-adapters", "int8"], "--quantize-adapters: a merged LoSA model has no adapters"),
])
def test_demo_bad_quantize_is_one_line(tmp_path, capsys, extra, message):
    assert cli.main(["demo", *extra, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_bench_int8_rows_stream_the_quantized_weight():
    from salr.cli import bench

    rows = bench.run_grid([(64, 128)], [1], [0.5], ["bf16", "int8"], 2**18, 1, 10.0)
    by_dtype = {r["dtype"]: r for r in rows}
    assert set(by_dtype) == {"bf16", "int8"}
    assert by_dtype["int8"]["rel_err"] < 2e-2  # against the dequantized weight, x in bf16
    rot = bench.Rotation(64, 128, 0.5, torch.bfloat16, 2**18, torch.Generator().manual_seed(0), int8=True)
    weight = rot.sparse[0]
    assert weight.values.dtype == torch.int8 and weight.scales.shape == (64,)
    assert rot.compressed_bytes == weight.nbytes < rot.dense_bytes / 2

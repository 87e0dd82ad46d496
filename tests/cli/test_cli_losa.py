"""`salr finetune --method losa` end to end on a tiny local Llama + word-level tokenizer + text file:
the run directory's numbers follow the LoSA schedule, and the saved model reproduces the reported
perplexity with plain sparse layers and no adapters."""

from __future__ import annotations

import json
import math

import pytest
import torch

import salr
from salr import cli
from salr_helpers import write_tiny_cli_assets

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed")

SEQ = ["--seq-len", "32", "--eval-windows", "4", "--calib-windows", "4", "--train-seq-len", "32",
       "--batch-size", "2", "--warmup", "2", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    return write_tiny_cli_assets(tmp_path_factory.mktemp("tiny_losa"))


def finetune(tiny_assets, out, *extra):
    model_dir, text = tiny_assets
    return cli.main(["finetune", "--method", "losa", "--model", str(model_dir), "--text", str(text),
                     "--out", str(out), *SEQ, *extra])


def test_losa_run_directory(tiny_assets, tmp_path):
    from salr.cli import assets
    from salr.eval.perplexity import perplexity
    from salr.losa.schedule import sparsity_schedule, split_steps
    from salr.methods.salr.layer import SALRLinear

    out = tmp_path / "run"
    assert finetune(tiny_assets, out, "--sparsity", "0.6", "--rounds", "3", "--steps", "10",
                    "--final-share", "0.5", "--lora-rank", "4", "--r-max", "9") == 0
    for name in ("config.json", "metrics.json", "report.md", "loss.png", "blocks.png", "model"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "losa"
    rounds = metrics["losa"]["rounds"]
    assert [r["steps"] for r in rounds] == split_steps(10, 3, 0.5) == [3, 2, 5]
    assert [r["target"] for r in rounds] == pytest.approx(sparsity_schedule(0.6, 3))
    for r in rounds:
        assert sum(r["ranks"]) == 4 * 3 and all(1 <= k <= 9 for k in r["ranks"])  # the budget, exactly
        assert sum(r["block_sparsity"]) / 3 == pytest.approx(r["target"], abs=0.02)
    assert [h["step"] for h in metrics["history"]] == list(range(1, 11))
    assert [h["round"] for h in metrics["history"]] == [1] * 3 + [2] * 2 + [3] * 5
    assert all(math.isfinite(h["loss"]) for h in metrics["history"])
    # Every decoder linear is a plain sparse layer at the reported sparsity, with no adapter.
    assert len(metrics["layers"]) == 3 * 7
    assert all(row["svd_rank"] == 0 and row["lora_rank"] == 0 for row in metrics["layers"])
    assert metrics["final_sparsity"] == pytest.approx(0.6, abs=0.02)
    # The saved model reproduces the reported perplexity (same windows, same protocol).
    model = salr.load(out / "model")
    layers = [m for m in model.modules() if isinstance(m, SALRLinear)]
    assert len(layers) == 21
    total = sum(m.out_features * m.in_features for m in layers)
    kept = sum(int(torch.count_nonzero(m.to_dense())) for m in layers)
    assert 1 - kept / total == pytest.approx(metrics["final_sparsity"], abs=1e-9)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "model")
    windows = assets.text_splits(tokenizer, tiny_assets[1]).eval_windows(4, 32)
    reported = metrics["stages"]["LoSA (merged)"]["perplexity"]
    assert perplexity(model, windows, desc="reload") == pytest.approx(reported, rel=1e-5)
    assert "## Rounds" in (out / "report.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--criterion", "sparsegpt"], "--criterion: not available with --method losa"),
    (["--pattern", "2:4"], "--pattern: not available with --method losa"),
    (["--lora-rank", "4", "--r-max", "2"], "LoSAConfig.r_max"),
    (["--rounds", "4", "--steps", "4", "--final-share", "0.6"], "LoSAConfig.final_share"),
])
def test_losa_bad_flags_are_one_line(tiny_assets, tmp_path, extra, message, capsys):
    out = tmp_path / "run"
    assert finetune(tiny_assets, out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # refused before the run directory was made

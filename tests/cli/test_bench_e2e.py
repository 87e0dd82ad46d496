"""`salr bench --e2e --quick`: a tiny Llama through the end-to-end decode benchmark (dense vs SALR):
the converted copy is what the report says it is, the byte limit is the bytes of both copies, and
the run directory holds the numbers."""

from __future__ import annotations

import json

import pytest
import torch

import salr
from salr import cli
from salr.cli import bench_e2e
from salr.cli.layer_report import byte_limit
from salr.methods.salr.model import salr_layers

pytest.importorskip("transformers", reason="transformers is not installed")


def test_salr_copy_is_the_merged_50_percent_model():
    shape = bench_e2e.QUICK
    dense = bench_e2e.build_dense(shape)
    sparse = bench_e2e.to_salr(dense)
    layers = salr_layers(sparse)
    assert len(layers) == 7 * shape.layers
    for layer in layers.values():
        assert layer.values.dtype == torch.bfloat16 and layer.lora_a is None  # merged
        assert layer.svd_rank == min(bench_e2e.SVD_RANK, layer.in_features, layer.out_features) + bench_e2e.LORA_RANK
        assert layer.sparsity == pytest.approx(0.5, abs=0.01)
    h, i = shape.hidden, shape.intermediate
    limit = byte_limit(dense, sparse)
    assert limit["dense"]["block_linears"] == shape.layers * (4 * h * h + 3 * h * i) * 2
    assert limit["salr"]["block_linears"] + limit["salr"]["adapters"] == sum(
        layer.compressed_bytes() for layer in layers.values())
    assert limit["salr"]["lm_head"] == limit["dense"]["lm_head"] == shape.vocab * h * 2
    assert not any(isinstance(p, torch.nn.Linear) for p in sparse.model.layers.modules())


@pytest.mark.skipif(not salr.native_available(), reason=salr.native_error() or "")
def test_cli_quick_run_writes_the_ratio_beside_the_byte_limit(tmp_path, capsys):
    assert cli.main(["bench", "--e2e", "--quick", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dense_tok_s"] > 0 and metrics["salr_tok_s"] > 0
    assert metrics["ratio"] == pytest.approx(metrics["salr_tok_s"] / metrics["dense_tok_s"])
    assert metrics["byte_limit"] == pytest.approx(metrics["dense_bytes"]["total"] / metrics["salr_bytes"]["total"])
    report = (tmp_path / "run" / "report.md").read_text()
    assert "byte limit" in report and f"{metrics['ratio']:.2f}×" in report
    assert "byte limit" in capsys.readouterr().out

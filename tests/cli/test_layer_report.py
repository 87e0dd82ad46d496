"""salr.cli.layer_report and salr.cli.machine: the demo's per-layer errors, its bytes per decoded token and
the facts recorded beside a speed figure, each checked against a direct computation on a tiny Llama."""

from __future__ import annotations

import copy

import pytest
import torch

import salr
from salr.cli.layer_report import byte_limit, decode_bytes, layer_plot_series, plot_layer_errors, reconstruction_errors
from salr.cli.machine import cpu_model, speed_context, speed_context_line
from salr.cli.runs import RunDirectory
from salr.cli.steps import layer_table
from salr.methods.salr.model import salr_layers
from tiny_lm import make_tiny_lm

ADAPTERS = ("svd_a", "svd_b", "lora_a", "lora_b")


def tiny_pair(sparsity=0.5, svd_rank=4, lora_rank=0):
    """(dense copy, converted model) of the 2-block tiny Llama, magnitude-pruned (no calibration)."""
    dense = make_tiny_lm(targets=()).eval()
    config = salr.SALRConfig(sparsity=sparsity, criterion="magnitude", svd_rank=svd_rank, lora_rank=lora_rank)
    model = salr.sparsify_(copy.deepcopy(dense), config, progress=False)
    return dense, model


def test_reconstruction_errors_match_a_direct_computation():
    dense, model = tiny_pair()
    rows = reconstruction_errors(dense, model)
    layers = salr_layers(model)
    assert [r["layer"] for r in rows] == list(layers) and len(rows) == 14
    for row in rows:
        w = dense.get_submodule(row["layer"]).weight.double()
        layer = layers[row["layer"]]
        # Magnitude pruning keeps a subset of W's entries: ||W - W_s||^2 = ||W||^2 - ||kept values||^2.
        kept = layer.values.double().square().sum()
        assert row["pruned_error"] == pytest.approx(((w.square().sum() - kept) / w.square().sum()).sqrt().item(),
                                                    rel=1e-9)
        # lora_rank 0: the layer's effective weight is W_s + B_svd·A_svd.
        direct = (torch.linalg.norm(w - layer.to_dense().double()) / torch.linalg.norm(w)).item()
        assert row["adapted_error"] == pytest.approx(direct, rel=1e-5)
        assert row["adapted_error"] < row["pruned_error"]  # the SVD of the residual only removes error
        assert row["kind"] == row["layer"].rsplit(".", 1)[-1] and row["block"] == int(row["layer"].split(".")[2])


def test_without_an_svd_adapter_both_errors_agree():
    dense, model = tiny_pair(svd_rank=0, lora_rank=2)
    for row in reconstruction_errors(dense, model):
        assert row["adapted_error"] == row["pruned_error"] > 0


def test_reconstruction_errors_refuse_a_model_that_is_not_the_original():
    dense, model = tiny_pair()
    _, other = tiny_pair()
    with pytest.raises(ValueError, match="reconstruction_errors: dense.model.layers.0.self_attn.q_proj is a SALRLinear"):
        reconstruction_errors(other, model)


def test_plotted_series_vary_and_constant_panels_are_dropped(tmp_path):
    dense, model = tiny_pair()
    errors, layers = reconstruction_errors(dense, model), layer_table(model)
    series = layer_plot_series(errors, layers)
    assert "sparsity" not in series and "adapter rank" not in series  # uniform 50 %, rank 4: nothing to see
    for key in ("pruned_error", "adapted_error"):
        values = [v for kind in series[key].values() for _, v in kind]
        assert len(values) == 14 and len({round(v, 9) for v in values}) > 1, key
    assert sorted(series["pruned_error"]) == sorted({r["kind"] for r in errors})
    assert plot_layer_errors(RunDirectory(tmp_path / "run"), "layers.png", errors, layers).stat().st_size > 0

    dense, model = tiny_pair(sparsity=(0.3, 0.7))  # per-block sparsity (LoSA / OWL-like): the panel stays
    errors, layers = reconstruction_errors(dense, model), layer_table(model)
    series = layer_plot_series(errors, layers)
    assert series["sparsity"] == pytest.approx([0.3 if r["block"] == 0 else 0.7 for r in errors], abs=0.01)
    assert "adapter rank" not in series
    assert plot_layer_errors(RunDirectory(tmp_path / "run2"), "layers.png", errors, layers).stat().st_size > 0


def _direct_block_and_head_bytes(model):
    """Every tensor of the blocks' linears (norms excluded) and the lm_head, from the state dict."""
    state = model.state_dict()
    blocks = {k: v for k, v in state.items() if k.startswith("model.layers.") and "norm" not in k}
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    adapters = size(v for k, v in blocks.items() if k.rsplit(".", 1)[-1] in ADAPTERS)
    return size(blocks.values()) - adapters, adapters, size([state["lm_head.weight"]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_bytes_equal_a_direct_count_of_the_tensors(dtype):
    dense, model = tiny_pair(lora_rank=2)
    dense, model = dense.to(dtype), model.to(dtype)
    for m in (dense, model):
        base, adapters, head = _direct_block_and_head_bytes(m)
        assert decode_bytes(m) == {"block_linears": base, "adapters": adapters, "lm_head": head,
                                   "total": base + adapters + head}
    assert decode_bytes(dense)["adapters"] == 0 and decode_bytes(model)["adapters"] > 0
    limit = byte_limit(dense, model)
    assert limit["limit"] == sum(_direct_block_and_head_bytes(dense)) / sum(_direct_block_and_head_bytes(model))
    assert limit["limit"] > 1.0  # 50 % sparse with rank 4 + 2 adapters is smaller than dense


def test_speed_context_names_what_the_numbers_ran_on():
    context = speed_context(torch.bfloat16)
    assert context == {"cpu_path": salr.cpu_isa(), "cpu_model": cpu_model(), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "dtype": "bfloat16"}
    assert speed_context(None)["dtype"] == "float32" and cpu_model()
    line = speed_context_line(context)
    assert all(str(v) in line for v in context.values())

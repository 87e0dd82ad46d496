"""bench/recovery.py's machinery on a tiny local Llama (--quick): every recipe kind runs on one budget,
one JSON per recipe, a finished recipe is not re-run, the table and the plot are written. The numbers
of a tiny random model mean nothing; the structure does."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import salr
from salr.methods.salr.layer import SALRLinear
from salr_helpers import load_bench_script, tiny_model, write_tiny_cli_assets

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("tokenizers", reason="tokenizers is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")

RECIPES = ["dense+lora", "wanda+svd+distill+owl+types", "sparsegpt+svd+salor", "losa+rmi", "wanda+svd+distill-lora",
           "wanda+svd@2:4", "sparsegpt+svd+int8"]


@pytest.fixture(scope="module")
def recovery():
    return load_bench_script("recovery")


def test_recipe_names(recovery):
    assert recovery.parse_recipe("dense+lora") == {"kind": "dense", "target": None}
    assert recovery.parse_recipe("losa+owl") == {"kind": "losa", "layerwise": "owl", "target": None}
    assert recovery.parse_recipe("sparsegpt+svd+owl+distill") == {
        "kind": "salr", "criterion": "sparsegpt", "distill": True, "distill_lora": False, "owl": True, "types": False,
        "salor": False, "int8": False, "target": None}
    assert recovery.parse_recipe("wanda+svd+distill-lora")["distill_lora"]
    assert recovery.parse_recipe("wanda+svd@2:4")["target"] == {"sparsity": 0.5, "pattern": "2:4"}
    assert recovery.parse_recipe("losa+rmi@0.7")["target"] == {"sparsity": 0.7, "pattern": None}
    for bad in ("wanda", "wanda+svd+owl+owl", "magnitude+svd", "losa+uniform", "wanda+svd+lora",
                "wanda+svd+distill+distill-lora", "dense+lora@0.5", "losa+rmi@2:4", "wanda+svd@1.5",
                "wanda+svd@3:2", "wanda+svd@", "wanda+svd+types@2:4"):
        with pytest.raises(ValueError, match="recipe"):
            recovery.parse_recipe(bad)


def test_quick_run_table_plot_and_resume(recovery, tmp_path, monkeypatch, capsys):
    model_dir, text = write_tiny_cli_assets(tmp_path)
    out = tmp_path / "out"
    argv = ["--quick", "--model", str(model_dir), "--text", str(text), "--out", str(out), "--eval-windows", "2",
            "--rounds", "2", *RECIPES]
    teachers = []
    finetune = recovery.steps.finetune

    def finetune_spy(model, splits, budget, teacher=None, **options):
        teachers.append(teacher)
        return finetune(model, splits, budget, teacher=teacher, **options)

    pruned_with = {}
    prune = recovery.steps.prune

    def prune_spy(model, splits, budget, **options):
        pruned = prune(model, splits, budget, **options)
        pruned_with[len(pruned_with)] = {**options, "resolved": pruned.salr_config}
        return pruned

    monkeypatch.setattr(recovery.steps, "finetune", finetune_spy)
    monkeypatch.setattr(recovery.steps, "prune", prune_spy)
    assert recovery.main(argv) == 0
    monkeypatch.setattr(recovery.steps, "finetune", finetune)
    monkeypatch.setattr(recovery.steps, "prune", prune)
    # +types: a per-linear mapping around OWL's block ratios (q pruned harder than v), global mean kept.
    typed = pruned_with[1]["resolved"].sparsity
    assert pruned_with[1]["type_allocation"] == 1.0 and pruned_with[1]["layerwise"] == "owl" and len(typed) == 3 * 7
    assert typed["model.layers.0.self_attn.q_proj"] > typed["model.layers.0.self_attn.v_proj"]
    rows = {r: json.loads((out / f"{r.replace('+', '_').replace(':', '-')}.json").read_text()) for r in RECIPES}
    budget = recovery.quick_budget()
    for name, row in rows.items():
        assert row["recipe"] == name and row["eval_windows"] == 2
        assert row["sparsity"] == (0.0 if name == "dense+lora" else 0.5)
        assert row["pattern"] == ("2:4" if name.endswith("@2:4") else None)
        assert row["fine_tuned"] > 1 and row["bytes"] > 0 and row["wall_s"] > 0
        steps = len(row["loss"])
        assert steps == budget.train_steps, name  # the same budget for every recipe
    # LoRA r=4 on every linear of 3 blocks (q, k, v, o: 48x48 / 48x24; gate, up: 80x48; down: 48x80).
    shapes = [(48, 48), (24, 48), (24, 48), (48, 48), (80, 48), (80, 48), (48, 80)]
    assert rows["dense+lora"]["trainable"] == 3 * sum(4 * (n + k) for n, k in shapes)
    types = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    size = {t: n * k for t, (n, k) in zip(types, shapes)}
    assert sum(r * size[n.rsplit(".", 1)[-1]] for n, r in typed.items()) / (3 * sum(size.values())) == \
        pytest.approx(0.5, abs=1e-9)
    assert rows["wanda+svd+distill+owl+types"]["trainable"] == rows["dense+lora"]["trainable"]
    assert rows["losa+rmi"]["final_sparsity"] == pytest.approx(0.5, abs=0.02)
    # The merged LoSA model is plain 50 % BM8x8 layers: smaller than the dense model with LoRA folded in.
    assert rows["losa+rmi"]["bytes"] < rows["dense+lora"]["bytes"]
    # int8 values: the same adapters on a base of ~half the bytes (bitmaps, offsets and scales stay).
    assert rows["sparsegpt+svd+int8"]["trainable"] == rows["dense+lora"]["trainable"]
    assert rows["sparsegpt+svd+int8"]["bytes"] < rows["sparsegpt+svd+salor"]["bytes"]
    # ... and with its merged adapters rounded to int8: close to, not exactly, the float adapters' score.
    int8_row = rows["sparsegpt+svd+int8"]
    assert int8_row["int8_adapters"] != int8_row["fine_tuned"]
    assert int8_row["int8_adapters"] == pytest.approx(int8_row["fine_tuned"], rel=0.05)
    assert "int8_adapters" not in rows["wanda+svd@2:4"]
    # distill-lora's teacher is the dense + lora recipe's model: the same perplexity, and it was trained
    # (its own fine-tuning is the spied call just before the student's, which gets it as teacher).
    last = max(i for i, t in enumerate(teachers) if t is not None)  # distill-lora's: the last recipe with one
    teacher = teachers[last]
    _, _, splits = recovery.steps.load(str(model_dir), str(text))
    evaluation = dataclasses.replace(budget, eval_windows=2)
    assert recovery.steps.evaluate(teacher, splits, evaluation, "teacher") == pytest.approx(
        rows["dense+lora"]["fine_tuned"], rel=1e-6)
    assert teachers[last - 1] is None and not any(p.requires_grad for p in teacher.parameters())
    assert rows["wanda+svd+distill-lora"]["teacher_s"] > 0
    table = (out / "table.md").read_text().splitlines()
    assert [line.split(" | ")[0].lstrip("| ") for line in table[3:]] == RECIPES
    assert table[3].split(" | ")[4] == "1.000"  # the baseline against itself
    assert [line.split(" | ")[1] for line in table[3:]] == ["0%", "50%", "50%", "50%", "50%", "2:4", "50%"]
    assert table[-1].endswith(f" {int8_row['int8_adapters']:.2f} |") and table[-2].endswith(" – |")
    assert (out / "recovery.png").stat().st_size > 0
    assert not list(out.glob("*.running"))

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("a finished recipe ran again")

    monkeypatch.setattr(recovery, "run_recipe", must_not_run)
    assert recovery.main(argv) == 0
    (out / "losa_owl.running").touch()  # claimed by another process: skipped, not run
    assert recovery.main([*argv, "losa+owl"]) == 0
    # One --out holds one budget: more steps over finished rows of fewer is refused before any work.
    with pytest.raises(SystemExit):
        recovery.main([*argv, "--train-steps", str(budget.train_steps + 1)])
    assert "--train-steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # likewise another LoRA rank
        recovery.main([*argv, "--lora-rank", str(budget.lora_rank + 1)])
    assert "--lora-rank" in capsys.readouterr().err


def test_int8_adapters_copy(recovery):
    """with_int8_adapters stores a copy's merged adapters as int8; the model itself is untouched."""
    model = tiny_model("llama")
    salr.sparsify_(model, salr.SALRConfig(sparsity=0.5, criterion="magnitude", svd_rank=4, lora_rank=2))
    salr.merge_(model)
    rounded = recovery.with_int8_adapters(model)
    pairs = [(a, b) for a, b in zip(model.modules(), rounded.modules()) if isinstance(a, SALRLinear)]
    assert pairs
    for before, after in pairs:
        assert before.svd_a.dtype == torch.float32 and before.adapter_scales is None
        assert after.svd_a.dtype == after.svd_b.dtype == torch.int8 and after.adapter_scales is not None
        assert torch.allclose(after.to_dense(), before.to_dense(), atol=0.02 * before.to_dense().abs().max().item())

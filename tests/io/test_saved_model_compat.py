"""A format-2 model directory written by salr before the package redesign (main at ea258b7, see
tests/data/make_saved_model_v2_fixture.py: SALR layers, a SALOR layer in training form and one in the
stored BM8x8-factor form) loads with today's code and gives the logits it gave then."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import salr
from salr.io.saved_model import read_record
from salr.methods.salor.layer import SALORLinear

DATA = Path(__file__).resolve().parents[1] / "data"
DIRECTORY = DATA / "saved_model_v2"
LOGITS = DATA / "saved_model_v2_logits.safetensors"

pytest.importorskip("transformers", reason="transformers is not installed")


def recorded():
    with safe_open(str(LOGITS), framework="pt") as f:
        return f.get_tensor("input_ids"), f.get_tensor("logits"), f.metadata()["cpu_isa"]


def test_the_old_directory_loads_with_identical_logits(monkeypatch):
    ids, expected, isa = recorded()
    if isa not in salr.available_cpu_isas():
        pytest.skip(f"the logits were recorded on the {isa} kernel path, which this machine lacks")
    monkeypatch.setenv("SALR_CPU_ISA", isa)  # the same kernel, so the same summation order: exact
    model = salr.load(DIRECTORY)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(logits, expected)


def test_the_old_directory_keeps_its_layers_and_config():
    model = salr.load(DIRECTORY)
    salor = {name: m for name, m in model.named_modules() if isinstance(m, SALORLinear)}
    assert sorted(salor) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert salor["model.layers.0.self_attn.q_proj"].lora_rank == 4  # training form: masks + dense factors
    assert salor["model.layers.0.self_attn.v_proj"].factor_rank == 4  # stored form: BM8x8 factors
    assert len([m for m in model.modules() if isinstance(m, salr.SALRLinear)]) == 14
    # The record's old field names (alpha, dropout) are read into the config's lora_alpha / lora_dropout.
    assert read_record(DIRECTORY)["salr"]["salr_config"]["alpha"] == 8.0
    assert model.salr_config.lora_alpha == 8.0 and model.salr_config.lora_dropout == 0.0
    assert model.salr_method == "salr"


def without_version_stamp(raw: bytes) -> bytes:
    """config.json less what follows the installed transformers, not salr: the version stamp its
    config writer adds, and the checksum of the file's bytes, which changes with that stamp."""
    raw = re.sub(rb'"transformers_version": "[^"]*"', b'"transformers_version": ""', raw, count=1)
    return re.sub(rb'"checksum": "[0-9a-f]{64}"', b'"checksum": ""', raw, count=1)


def test_saving_it_again_writes_the_same_bytes(tmp_path):
    """Format 2 did not change: loading the old directory and saving it again gives the same files,
    byte for byte (config.json with its record, checksum and file digests; the weights file) but for
    transformers' version stamp and the checksum over it, which load verifies."""
    again = salr.save(salr.load(DIRECTORY), tmp_path / "again")
    assert sorted(p.name for p in again.iterdir()) == sorted(p.name for p in DIRECTORY.iterdir())
    for old in DIRECTORY.iterdir():
        new, expected = (again / old.name).read_bytes(), old.read_bytes()
        if old.name == "config.json":
            new, expected = without_version_stamp(new), without_version_stamp(expected)
        assert new == expected, old.name
    salr.load(again)  # its checksum holds

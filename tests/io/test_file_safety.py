"""Saved files: a truncated or altered file is refused with a ValueError that names the file (or the
field), never a crash and never silently different weights; and writes are atomic (a writer that
dies midway leaves no partial file or directory, and the previous one intact).

Every artifact salr writes: BitmapSparseWeight.save, training checkpoints (save_checkpoint,
save_trainable) and saved model directories (salr.save). The damage is generic: cuts and byte
flips spread over every file a save wrote, so the tests survive layout changes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import salr
from salr import BitmapSparseWeight
from salr.train import checkpoint as ckpt
from conftest import make_generator, random_sparse
from salr_helpers import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def damages(raw: bytes) -> dict[str, bytes]:
    """Truncations (empty, inside the 8-byte safetensors length, mid-header, mid-data, one byte
    short) and single-byte flips (all bits / lowest bit) at places spread over the file."""
    n = len(raw)
    out = {f"cut to {k} bytes": raw[:k] for k in sorted({0, 1, 7, 9, n // 3, n // 2, n - 1}) if k < n}
    for fraction in (0.0, 0.002, 0.01, 0.03, 0.06, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 1.0):
        i = min(n - 1, int(fraction * n))
        for mask in (0xFF, 0x01):
            flipped = bytearray(raw)
            flipped[i] ^= mask
            out[f"byte {i} ^ {mask:#x}"] = bytes(flipped)
    return out


def check_refused_or_identical(load, expected, damaged_file: Path, original: bytes):
    """For every damage of `damaged_file`: load() raises a ValueError naming the file, or returns
    something equal to `expected` (a flip in JSON whitespace changes nothing). Returns the failures."""
    failures = []
    for what, raw in damages(original).items():
        damaged_file.write_bytes(raw)
        try:
            result = load()
        except ValueError as exc:
            if damaged_file.name not in str(exc):
                failures.append(f"{damaged_file.name}, {what}: the error does not name the file: {exc}")
        except Exception as exc:  # noqa: BLE001  (what we are looking for)
            failures.append(f"{damaged_file.name}, {what}: {type(exc).__name__} instead of ValueError: {exc}")
        else:
            if not equal(result, expected):
                failures.append(f"{damaged_file.name}, {what}: loaded silently different contents "
                                f"(file starts {raw[:160]!r})")
    damaged_file.write_bytes(original)
    return failures


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                         b.view(-1).view(torch.uint8))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


# ---- BitmapSparseWeight ----------------------------------------------------------------------

def weight_fields(w: BitmapSparseWeight):
    return [w.bitmap, w.values, w.offsets, w.rows, w.cols]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_weight_file_damage(tmp_path, dtype):
    weight = BitmapSparseWeight.from_dense(random_sparse(19, 70, 0.5, dtype, make_generator("tamper", dtype)))
    path = tmp_path / "w.safetensors"
    weight.save(path)
    failures = check_refused_or_identical(lambda: weight_fields(BitmapSparseWeight.load(path)),
                                          weight_fields(weight), path, path.read_bytes())
    assert not failures, "\n".join(failures)


def test_sparse_weight_file_with_a_valid_checksum_is_still_validated(tmp_path):
    """A file whose sha256 matches but whose bitmap disagrees with offsets (written by another tool)."""
    from safetensors.torch import save_file

    from salr.ops.format import tensors_sha256
    weight = BitmapSparseWeight.from_dense(random_sparse(16, 64, 0.5, torch.float32, make_generator("crafted")))
    bitmap = weight.bitmap.clone()
    bitmap[0, 0] ^= 1 << 9
    tensors = {"bitmap": bitmap, "values": weight.values, "offsets": weight.offsets}
    meta = {"format": salr.FORMAT_NAME, "format_version": str(salr.FORMAT_VERSION), "shape": "[16, 64]", "dtype": "float32"}
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata={**meta, "sha256": tensors_sha256(tensors, "[16, 64]float32")})
    with pytest.raises(ValueError, match=r"c\.safetensors: salr\.BitmapSparseWeight: bitmap, values and offsets are inconsistent"):
        BitmapSparseWeight.load(tmp_path / "c.safetensors")


def test_sparse_weight_save_is_atomic(tmp_path, monkeypatch):
    old = BitmapSparseWeight.from_dense(random_sparse(8, 16, 0.5, torch.float32, make_generator("old")))
    new = BitmapSparseWeight.from_dense(random_sparse(8, 16, 0.9, torch.float32, make_generator("new")))
    path = tmp_path / "w.safetensors"
    old.save(path)

    def dies_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"bitmap\"")  # a partial file
        raise KeyboardInterrupt

    monkeypatch.setattr("salr.ops.format.save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        new.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"], "no temporary file left"
    assert equal(weight_fields(BitmapSparseWeight.load(path)), weight_fields(old))


# ---- training checkpoints --------------------------------------------------------------------

def tiny_training_state(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model(torch.randn(4, 6)).square().sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def loaded_checkpoint(path: Path):
    model, optimizer, scheduler = tiny_training_state(seed=1)  # other values: a load must overwrite them
    state = ckpt.load_checkpoint(path, model, optimizer, scheduler, restore_rng=False)
    return [dict(model.state_dict()), optimizer.state_dict()["state"], scheduler.state_dict(), state]


def test_checkpoint_file_damage(tmp_path):
    model, optimizer, scheduler = tiny_training_state()
    path = ckpt.save_checkpoint(tmp_path, 7, model, optimizer, scheduler, data_state={"position": 11},
                                history=[{"step": 7, "loss": 1.25, "lr": 5e-3}], config={"lr": 1e-2})
    expected = loaded_checkpoint(path)
    files = sorted(p for p in path.rglob("*") if p.is_file())
    assert {p.name for p in files} == {ckpt.TRAINABLE_FILE, ckpt.TRAIN_STATE_FILE, ckpt.STATE_FILE}
    failures = []
    for file in files:
        failures += check_refused_or_identical(lambda: loaded_checkpoint(path), expected, file, file.read_bytes())
    assert not failures, "\n".join(failures)


def test_trainable_file_damage(tmp_path):
    model, _, _ = tiny_training_state()
    path = ckpt.save_trainable(model, tmp_path / "adapters.safetensors")

    def load():
        target, _, _ = tiny_training_state(seed=1)
        ckpt.load_trainable(target, path)
        return {n: p.detach() for n, p in ckpt.trainable_parameters(target).items()}

    expected = {n: p.detach() for n, p in ckpt.trainable_parameters(model).items()}
    failures = check_refused_or_identical(load, expected, path, path.read_bytes())
    assert not failures, "\n".join(failures)


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    model, optimizer, scheduler = tiny_training_state()
    first = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, data_state={})
    expected = loaded_checkpoint(first)
    real = ckpt._save_tensors
    calls = []

    def dies_on_the_second_file(tensors, path, metadata=None):
        calls.append(path)
        real(tensors, path, metadata)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "_save_tensors", dies_on_the_second_file)
    for step in (2, 1):  # a new step, and re-saving the existing one
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            ckpt.save_checkpoint(tmp_path, step, model, optimizer, scheduler, data_state={"changed": True})
        assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name], "no partial directory left"
        assert ckpt.find_latest_checkpoint(tmp_path) == first
        assert equal(loaded_checkpoint(first), expected)


def test_trainable_save_is_atomic(tmp_path, monkeypatch):
    model, _, _ = tiny_training_state()
    path = ckpt.save_trainable(model, tmp_path / "a.safetensors")
    before = path.read_bytes()

    def dies_midway(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("salr.train.state.save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_trainable(tiny_training_state(seed=3)[0], path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"] and path.read_bytes() == before


# ---- saved model directories (salr.save / salr.load) -----------------------------------------

@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers is not installed")
    model = tiny_model("llama", hidden=32, layers=1)
    salr.sparsify_(model, salr.SALRConfig(criterion="magnitude", sparsity=0.5, svd_rank=2, lora_rank=2), progress=False)
    directory = salr.save(model, tmp_path_factory.mktemp("model") / "m")
    return directory, dict(salr.load(directory).state_dict())


def test_model_directory_damage(saved_model, tmp_path):
    source, expected = saved_model
    directory = tmp_path / "m"
    shutil.copytree(source, directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    assert files, "the save wrote no file"
    failures = []
    for file in files:
        failures += check_refused_or_identical(lambda: dict(salr.load(directory).state_dict()), expected, file,
                                               file.read_bytes())
    assert not failures, f"{len(failures)} damaged files were not refused:\n" + "\n".join(failures)


def test_model_save_is_atomic(saved_model, tmp_path, monkeypatch):
    import salr.io.files as files

    source, expected = saved_model
    directory = tmp_path / "m"
    shutil.copytree(source, directory)
    model = salr.load(directory)

    def dies_midway(tensors, filename, metadata=None, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        salr.save(model, directory, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        salr.save(model, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "no partial or temporary directory left"
    assert equal(dict(salr.load(directory).state_dict()), expected)

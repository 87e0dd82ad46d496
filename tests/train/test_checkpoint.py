"""Checkpoints: exact resume, Ctrl-C, atomicity (a truncated / missing file is never picked up),
pruning, no pickle, and the trainable-parameter files."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from salr.train import checkpoint as ckpt
from salr.train.config import TrainConfig
from salr.train.data import TokenWindows
from salr.train.loop import train
from tiny_lm import make_tiny_lm, make_tokens, trainable_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(autocast_dtype=None, progress=False)


def config(**overrides) -> TrainConfig:
    base = dict(lr=1e-2, steps=6, warmup_steps=2, batch_size=2, grad_accum=2, save_every=3, keep_checkpoints=0)
    return TrainConfig(**{**base, **overrides, **FAST})


def data() -> TokenWindows:
    return TokenWindows(make_tokens(), 16, seed=7)


def model() -> torch.nn.Module:
    return make_tiny_lm(dropout=0.2)  # dropout: the loss depends on the restored RNG stream too


def losses(history):
    return [e["loss"] for e in history]


def assert_same_run(history, params, ref_history, ref_params, tol=1e-6):
    assert [e["step"] for e in history] == [e["step"] for e in ref_history]
    assert losses(history) == pytest.approx(losses(ref_history), abs=tol, rel=0)
    assert [e["lr"] for e in history] == pytest.approx([e["lr"] for e in ref_history], rel=1e-12)
    assert params.keys() == ref_params.keys()
    for name, p in params.items():
        torch.testing.assert_close(p, ref_params[name], atol=tol, rtol=0)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """6 steps in one go, with checkpoints at steps 3 and 6."""
    run_dir = tmp_path_factory.mktemp("full")
    m = model()
    history = train(m, data(), config(), run_dir=run_dir)
    return run_dir, history, trainable_snapshot(m)


def test_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    full_dir, ref_history, ref_params = uninterrupted
    assert [p.name for p in ckpt._step_dirs(ckpt.checkpoint_root(full_dir))] == ["step-00000003", "step-00000006"]
    # A fresh process would see only the step-3 checkpoint: copy it into a new run directory.
    shutil.copytree(full_dir / "checkpoints" / "step-00000003", tmp_path / "checkpoints" / "step-00000003")
    m = model()
    history = train(m, data(), config(), run_dir=tmp_path)
    assert_same_run(history, trainable_snapshot(m), ref_history, ref_params)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]  # rewritten from the checkpoint, then appended


def test_resume_from_an_explicit_path_and_when_already_done(uninterrupted, tmp_path):
    full_dir, ref_history, ref_params = uninterrupted
    m = model()
    history = train(m, data(), config(), run_dir=tmp_path, resume=full_dir / "checkpoints" / "step-00000003")
    assert_same_run(history, trainable_snapshot(m), ref_history, ref_params)
    # Resuming a finished run trains nothing and returns its history.
    m2 = model()
    again = train(m2, data(), config(), run_dir=full_dir)
    assert losses(again) == losses(ref_history)
    assert_same_run(again, trainable_snapshot(m2), ref_history, ref_params, tol=0)


def test_resume_false_starts_over(uninterrupted):
    full_dir, ref_history, _ = uninterrupted
    history = train(model(), data(), config(steps=2, save_every=0), run_dir=full_dir / "fresh", resume=False)
    assert losses(history) == pytest.approx(losses(ref_history)[:2], abs=1e-6)


@pytest.fixture
def ctrl_c_raises():
    """Python's own Ctrl-C handler, whatever the process started with: a shell that runs pytest in the
    background starts it with SIGINT ignored, and then nothing would raise (the trainer defers Ctrl-C
    only around the update, and otherwise relies on this handler)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_mid_step_saves_the_last_finished_step(uninterrupted, tmp_path, ctrl_c_raises):
    _, ref_history, ref_params = uninterrupted
    m = model()
    calls = []

    def interrupt(module, args, kwargs):
        calls.append(1)
        if len(calls) == 8:  # step 4, second micro-batch: one micro-batch of it already consumed
            os.kill(os.getpid(), signal.SIGINT)

    handle = m.register_forward_pre_hook(interrupt, with_kwargs=True)
    with pytest.raises(KeyboardInterrupt):
        train(m, data(), config(save_every=0), run_dir=tmp_path)
    handle.remove()
    latest = ckpt.find_latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "step-00000003"
    state = ckpt.read_checkpoint_state(latest)
    assert state["data"]["consumed"] == 3 * 2 * 2  # rolled back to the end of step 3
    m2 = model()
    history = train(m2, data(), config(save_every=0), run_dir=tmp_path)
    assert_same_run(history, trainable_snapshot(m2), ref_history, ref_params)


def test_ctrl_c_during_the_update_finishes_it_first(uninterrupted, tmp_path, ctrl_c_raises):
    _, ref_history, ref_params = uninterrupted
    updates = []

    def interrupt(optimizer, args, kwargs):
        updates.append(1)
        if len(updates) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives inside optimizer.step(): deferred

    from torch.optim.optimizer import register_optimizer_step_pre_hook
    handle = register_optimizer_step_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(model(), data(), config(save_every=0), run_dir=tmp_path)
    finally:
        handle.remove()
    assert ckpt.find_latest_checkpoint(tmp_path).name == "step-00000002"
    m = model()
    history = train(m, data(), config(save_every=0), run_dir=tmp_path)
    assert_same_run(history, trainable_snapshot(m), ref_history, ref_params)


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "delete_tensors", "delete_state", "bad_json"])
def test_a_damaged_checkpoint_is_never_picked_up(uninterrupted, tmp_path, damage):
    full_dir, ref_history, ref_params = uninterrupted
    shutil.copytree(full_dir / "checkpoints", tmp_path / "checkpoints")
    newest = tmp_path / "checkpoints" / "step-00000006"
    if damage == "truncate":
        path = newest / ckpt.TRAINABLE_FILE
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "flip_bytes":
        path = newest / ckpt.TRAIN_STATE_FILE
        raw = bytearray(path.read_bytes())
        raw[-5] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif damage == "delete_tensors":
        (newest / ckpt.TRAIN_STATE_FILE).unlink()
    elif damage == "delete_state":
        (newest / ckpt.STATE_FILE).unlink()
    else:
        (newest / ckpt.STATE_FILE).write_text('{"format": "salr-train-')
    # Debris of a save that died before its rename, with a higher step: ignored too.
    (tmp_path / "checkpoints" / ".tmp-step-00000009.123.abcd").mkdir()
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        assert ckpt.find_latest_checkpoint(tmp_path).name == "step-00000003"
    assert ckpt.verify_checkpoint(newest) is not None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(newest, model())
    m = model()
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        history = train(m, data(), config(), run_dir=tmp_path)
    assert_same_run(history, trainable_snapshot(m), ref_history, ref_params)
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "checkpoints").iterdir())


def test_keep_prunes_old_checkpoints(tmp_path):
    train(model(), data(), config(steps=5, save_every=1, keep_checkpoints=2), run_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]


def test_files_are_safetensors_and_json_only(uninterrupted):
    full_dir, _, ref_params = uninterrupted
    path = full_dir / "checkpoints" / "step-00000006"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [ckpt.TRAINABLE_FILE, ckpt.TRAIN_STATE_FILE, ckpt.STATE_FILE])
    state = json.loads((path / ckpt.STATE_FILE).read_text())
    assert state["step"] == 6 and state["data"]["consumed"] == 6 * 2 * 2 and len(state["history"]) == 6
    trainable = load_file(str(path / ckpt.TRAINABLE_FILE))
    assert trainable.keys() == ref_params.keys()
    assert all(torch.equal(trainable[n], p) for n, p in ref_params.items())
    tensors = load_file(str(path / ckpt.TRAIN_STATE_FILE))
    assert "rng.torch" in tensors and any(k.endswith(".exp_avg_sq") for k in tensors)


def test_load_refuses_a_model_with_other_trainable_params(uninterrupted):
    full_dir, _, _ = uninterrupted
    other = make_tiny_lm(targets=("q_proj",))
    with pytest.raises(ValueError, match="trainable parameters differ"):
        ckpt.load_checkpoint(full_dir / "checkpoints" / "step-00000006", other)
    with pytest.raises(ValueError, match="seq_len"):
        train(model(), TokenWindows(make_tokens(), 8, seed=7), config(steps=7), run_dir=full_dir)


def test_save_and_load_trainable(tmp_path):
    a, b = make_tiny_lm(seed=1), make_tiny_lm(seed=2)
    path = ckpt.save_trainable(a, tmp_path / "adapters.safetensors")
    assert ckpt.load_trainable(b, path) == list(trainable_snapshot(b))
    for name, p in trainable_snapshot(b).items():
        assert torch.equal(p, trainable_snapshot(a)[name])
    with pytest.raises(ValueError, match="missing from the file"):
        ckpt.load_trainable(make_tiny_lm(targets=("q_proj", "v_proj", "down_proj", "o_proj")), path)
    assert [p.name for p in tmp_path.iterdir()] == ["adapters.safetensors"]  # no temp file left


def test_rng_state_round_trip():
    import random
    tensors, meta = ckpt.capture_rng_state()
    expected = (torch.rand(3), random.random())
    torch.rand(10), random.random()
    ckpt.restore_rng_state(tensors, json.loads(json.dumps(meta)))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_resume_with_changed_settings_warns_and_a_bad_path_fails(uninterrupted, tmp_path):
    full_dir, _, _ = uninterrupted
    step3 = full_dir / "checkpoints" / "step-00000003"
    with pytest.warns(UserWarning, match=r"changed settings \['lr'\]"):
        train(model(), data(), config(lr=5e-3, steps=4), run_dir=tmp_path / "a", resume=step3)
    with pytest.raises(ValueError, match="resume: .* is not a complete checkpoint"):
        train(model(), data(), config(), run_dir=tmp_path / "b", resume=tmp_path / "nowhere")


def test_save_with_write_false_gathers_but_writes_nothing(tmp_path):
    """What every rank but rank 0 does under FSDP: join the gather, leave the disk alone."""
    m = make_tiny_lm()
    optimizer = torch.optim.AdamW(ckpt.trainable_parameters(m).values())
    m(input_ids=make_tokens()[:16][None], labels=make_tokens()[:16][None]).loss.backward()
    optimizer.step()
    assert ckpt.save_checkpoint(tmp_path / "run", 1, m, optimizer, None, data_state={}, write=False) is None
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="write: expected True or False"):
        ckpt.save_checkpoint(tmp_path / "run", 1, m, optimizer, None, data_state={}, write="rank0")
    t = torch.ones(3)
    assert ckpt.full_tensor(t) is t  # a plain tensor is already whole

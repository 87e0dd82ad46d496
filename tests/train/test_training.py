"""The training loop: config checks, schedule, data stream, loss drop, accumulation, checkpointing
of activations, evaluation, and HF Trainer compatibility. Tiny random Llama + a test-only LoRA."""

from __future__ import annotations

import math

import pytest
import torch

from salr.train.config import lr_factor, TrainConfig
from salr.train.data import TokenWindows
from salr.train.loop import train
from tiny_lm import frozen_snapshot, make_tiny_lm, make_tokens, trainable_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(autocast_dtype=None, progress=False)


def losses(history):
    return [e["loss"] for e in history]


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("field, value", [
    ("lr", 0.0), ("lr", -1e-3), ("lr", float("nan")), ("weight_decay", -0.1), ("steps", 0), ("steps", 2.5),
    ("warmup_steps", -1), ("warmup_steps", 200), ("schedule", "exponential"), ("batch_size", 0),
    ("grad_accum", 0), ("max_grad_norm", 0.0), ("max_grad_norm", -1.0), ("autocast_dtype", "float8"),
    ("eval_every", -1), ("save_every", -2), ("seed", -1), ("log_every", 0), ("min_lr_ratio", 1.5),
    ("betas", (0.9,)), ("grad_checkpointing", "yes"), ("keep_checkpoints", -1), ("eps", 0.0),
    ("parallel", "zero3"), ("parallel", None),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}\b"):
        TrainConfig(**{field: value})


def test_config_normalizes_aliases():
    assert TrainConfig(autocast_dtype="bf16").autocast_dtype == "bfloat16"
    assert TrainConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)
    assert TrainConfig(max_grad_norm=None).max_grad_norm is None
    assert TrainConfig(autocast_dtype=None).to_dict()["autocast_dtype"] is None


# ----------------------------------------------------------------------------- schedule

def test_schedule_values():
    cos = TrainConfig(steps=10, warmup_steps=2, schedule="cosine")
    assert [lr_factor(s, cos) for s in (0, 1)] == [0.5, 1.0]             # warmup: 1/2, 2/2
    assert lr_factor(2, cos) == pytest.approx(1.0)                         # decay starts at 1
    assert lr_factor(6, cos) == pytest.approx(0.5)                         # half-way: cos(pi/2)
    assert lr_factor(10, cos) == pytest.approx(0.0, abs=1e-12)             # one past the last update
    lin = TrainConfig(steps=10, warmup_steps=2, schedule="linear", min_lr_ratio=0.2)
    assert lr_factor(6, lin) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_factor(10, lin) == pytest.approx(0.2)
    const = TrainConfig(steps=10, warmup_steps=4, schedule="constant")
    assert [lr_factor(s, const) for s in (0, 3, 4, 9)] == [0.25, 1.0, 1.0, 1.0]
    no_warmup = TrainConfig(steps=4, warmup_steps=0, schedule="cosine")
    assert lr_factor(0, no_warmup) == 1.0


def test_history_lr_follows_the_schedule():
    config = TrainConfig(lr=1e-2, steps=8, warmup_steps=3, schedule="cosine", batch_size=2, **FAST)
    history = train(make_tiny_lm(), TokenWindows(make_tokens(), 16), config)
    assert [e["step"] for e in history] == list(range(1, 9))
    for i, entry in enumerate(history):
        assert entry["lr"] == pytest.approx(1e-2 * lr_factor(i, config), rel=1e-12)
        assert entry["tokens"] == 2 * 16 and entry["tokens_per_s"] > 0 and entry["eval"] is None


# ----------------------------------------------------------------------------- data

def test_token_windows_deterministic_resumable_and_covering():
    tokens = torch.arange(1000)
    a = TokenWindows(tokens, 32, seed=3)
    assert len(a) == 31
    epoch = a.take(31)
    starts = sorted(int(w[0]) for w in epoch)
    assert len(set(starts)) == 31 and all((s - starts[0]) % 32 == 0 for s in starts)   # an epoch = every window once
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 32)) for w in epoch)  # contiguous text
    state = a.state_dict()
    following = a.take(5)                      # crosses into epoch 2
    b = TokenWindows(tokens, 32, seed=3)
    b.load_state_dict(state)
    assert torch.equal(b.take(5), following)
    assert torch.equal(TokenWindows(tokens, 32, seed=3).take(7), TokenWindows(tokens, 32, seed=3).take(7))
    assert not torch.equal(TokenWindows(tokens, 32, seed=4).take(7), TokenWindows(tokens, 32, seed=3).take(7))
    with pytest.raises(ValueError, match="seed"):
        TokenWindows(tokens, 32, seed=4).load_state_dict(state)


def test_token_windows_bad_input():
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenWindows(torch.arange(10), 32)
    with pytest.raises(ValueError, match="1-D integer"):
        TokenWindows(torch.zeros(100), 8)
    with pytest.raises(ValueError, match="seq_len"):
        TokenWindows(torch.arange(100), 1)


# ----------------------------------------------------------------------------- the loop

def test_loss_drops_and_only_trainable_params_change():
    model = make_tiny_lm()
    before_frozen, before_trainable = frozen_snapshot(model), trainable_snapshot(model)
    config = TrainConfig(lr=3e-2, steps=30, warmup_steps=3, batch_size=4, weight_decay=0.01, **FAST)
    history = train(model, TokenWindows(make_tokens(), 32), config)
    first, last = sum(losses(history)[:5]) / 5, sum(losses(history)[-5:]) / 5
    assert last < first - 0.2, (first, last)
    assert all(torch.equal(p, before_frozen[n]) for n, p in frozen_snapshot(model).items())
    assert all(not torch.equal(p, before_trainable[n]) for n, p in trainable_snapshot(model).items())
    assert model.training


def test_grad_accum_equals_a_bigger_batch():
    runs = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        model = make_tiny_lm()
        config = TrainConfig(lr=1e-2, steps=4, batch_size=batch, grad_accum=accum, **FAST)
        runs.append((losses(train(model, TokenWindows(make_tokens(), 16), config)), trainable_snapshot(model)))
    (ref_loss, ref_params), *others = runs
    for loss, params in others:
        assert loss == pytest.approx(ref_loss, abs=1e-5)
        for name, p in params.items():
            torch.testing.assert_close(p, ref_params[name], atol=1e-5, rtol=1e-4)


def test_grad_checkpointing_gives_the_same_run():
    results = []
    for checkpointing in (False, True):
        model = make_tiny_lm()
        config = TrainConfig(lr=1e-2, steps=3, batch_size=2, grad_checkpointing=checkpointing, **FAST)
        results.append((losses(train(model, TokenWindows(make_tokens(), 16), config)), trainable_snapshot(model)))
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-6)
    for name, p in results[1][1].items():
        torch.testing.assert_close(p, results[0][1][name], atol=1e-6, rtol=1e-5)


def test_clipping_bounds_the_update():
    # With max_grad_norm tiny, the first AdamW step is still lr-sized (Adam normalizes), but the
    # reported grad_norm is the pre-clip one, and training stays finite.
    config = TrainConfig(lr=1e-2, steps=2, batch_size=2, max_grad_norm=1e-3, **FAST)
    history = train(make_tiny_lm(), TokenWindows(make_tokens(), 16), config)
    assert all(e["grad_norm"] > 1e-3 and math.isfinite(e["loss"]) for e in history)


def test_bf16_autocast_runs_on_cpu():
    config = TrainConfig(lr=1e-2, steps=2, batch_size=2, autocast_dtype="bfloat16", progress=False)
    history = train(make_tiny_lm(), TokenWindows(make_tokens(), 16), config)
    assert all(math.isfinite(e["loss"]) for e in history)


def test_eval_fn_runs_periodically_and_leaves_rng_alone():
    calls = []

    def eval_fn(model):
        assert not model.training and not torch.is_grad_enabled()
        calls.append(1)
        torch.rand(100)  # consuming random numbers here must not change the training run
        return {"ppl": 3.0 + len(calls)}

    config = TrainConfig(lr=1e-2, steps=5, batch_size=2, eval_every=2, **FAST)
    model = make_tiny_lm(dropout=0.2)
    history = train(model, TokenWindows(make_tokens(), 16), config, eval_fn=eval_fn)
    assert [e["eval"] for e in history] == [None, {"ppl": 4.0}, None, {"ppl": 5.0}, {"ppl": 6.0}]
    plain = train(make_tiny_lm(dropout=0.2), TokenWindows(make_tokens(), 16), config)
    assert losses(history) == losses(plain)


def test_log_file_follows_log_every_and_evals(tmp_path):
    import json
    config = TrainConfig(lr=1e-2, steps=5, batch_size=2, log_every=2, eval_every=3, **FAST)
    train(make_tiny_lm(), TokenWindows(make_tokens(), 16), config, run_dir=tmp_path, eval_fn=lambda m: 1.5)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 3, 4, 5]          # every 2nd, the evals (3, 5) and the last
    assert [e["eval"] for e in log] == [None, 1.5, None, 1.5]
    assert (tmp_path / "checkpoints" / "step-00000005").is_dir()  # the end of training always saves


def test_iterable_of_batches():
    stream = TokenWindows(make_tokens(), 16, seed=5)
    batches = [stream.take(2) for _ in range(3)]  # a re-iterable list: epochs wrap around it
    dicts = [{"input_ids": b, "labels": b, "attention_mask": torch.ones_like(b)} for b in batches]
    config = TrainConfig(lr=1e-2, steps=5, batch_size=2, **FAST)
    a = train(make_tiny_lm(), batches, config)
    b = train(make_tiny_lm(), dicts, config)
    assert losses(a) == pytest.approx(losses(b), abs=1e-6)
    assert a[3]["loss"] != a[0]["loss"]  # the 4th step sees the 1st batch again, after 3 updates
    with pytest.raises(ValueError, match="ran out"):
        train(make_tiny_lm(), iter(batches), config)


def test_needs_trainable_parameters():
    model = make_tiny_lm()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=True"):
        train(model, TokenWindows(make_tokens(), 16), TrainConfig(steps=1, **FAST))


def test_non_finite_loss_stops_with_the_step():
    model = make_tiny_lm()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 1"):
        train(model, TokenWindows(make_tokens(), 16), TrainConfig(steps=2, batch_size=2, **FAST))


def test_bad_train_batches():
    with pytest.raises(ValueError, match="TokenWindows"):
        train(make_tiny_lm(), make_tokens(), TrainConfig(steps=1, **FAST))


# ----------------------------------------------------------------------------- HF Trainer

def test_hf_trainer_trains_the_adapters(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    model = make_tiny_lm()
    before_frozen, before_trainable = frozen_snapshot(model), trainable_snapshot(model)
    windows = TokenWindows(make_tokens(), 32, seed=0).take(48)
    dataset = [{"input_ids": w, "labels": w} for w in windows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=24, per_device_train_batch_size=4, learning_rate=3e-2,
        warmup_steps=2, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 24
    assert sum(logged[-5:]) / 5 < sum(logged[:5]) / 5 - 0.1, logged
    assert all(torch.equal(p, before_frozen[n]) for n, p in frozen_snapshot(model).items())
    assert all(not torch.equal(p, before_trainable[n]) for n, p in trainable_snapshot(model).items())

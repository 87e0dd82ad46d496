"""Distillation from the dense model (salr.train.distill + TrainConfig.distill_*): the sparse student's
KL to its dense teacher falls under distillation (and rises under plain fine-tuning), the step loss is
the hand-computed mix, distill_weight = 0 is the plain run bit for bit, bad settings are refused, and
`salr finetune --distill` runs end to end."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from salr import cli
from salr.methods.registry import sparsify_
from salr.methods.salr.config import SALRConfig
from salr.train.config import TrainConfig
from salr.train.data import TokenWindows
from salr.train.distill import frozen_teacher, hidden_nmse, kl_to_teacher, logit_kl
from salr.train.loop import train
from salr_helpers import token_ids, tiny_model, write_tiny_cli_assets
from tiny_lm import make_tiny_lm, make_tokens, trainable_snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = dict(autocast_dtype=None, progress=False)


def sparse_student_and_teacher():
    """(student, teacher): a tiny Llama with sharpened logits (a random one predicts nearly uniformly,
    so there would be little to distil), its frozen dense copy, and the model pruned to 70% by
    magnitude with a LoRA and no SVD residual, so the student starts visibly away from the teacher."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    teacher = frozen_teacher(model)
    sparsify_(model, SALRConfig(sparsity=0.7, criterion="magnitude", svd_rank=0, lora_rank=4, lora_alpha=4),
              None, progress=False)
    return model.train(), teacher


def train_windows() -> TokenWindows:
    return TokenWindows(token_ids(1, 4000, seed=2).flatten(), 32, seed=0)


PROBE = token_ids(4, 32, seed=5)  # held-out windows (another seed than the training stream)
SHORT_RUN = dict(lr=3e-3, steps=12, batch_size=4, warmup_steps=0, schedule="constant", **FAST)


def test_kl_to_the_teacher_falls_under_distillation():
    student, teacher = sparse_student_and_teacher()
    plain = copy.deepcopy(student)
    kl_before = kl_to_teacher(student, teacher, PROBE)
    train(student, train_windows(), TrainConfig(distill_weight=1.0, distill_temperature=2.0, **SHORT_RUN),
          teacher=teacher)
    train(plain, train_windows(), TrainConfig(**SHORT_RUN))
    kl_distilled, kl_plain = kl_to_teacher(student, teacher, PROBE), kl_to_teacher(plain, teacher, PROBE)
    assert kl_before > 0.1  # measured 0.23: pruning moved the student away
    assert kl_distilled < 0.8 * kl_before  # measured 0.15
    assert kl_distilled < 0.8 * kl_plain  # cross-entropy alone drifts away from the teacher (measured 0.25)


def test_hidden_state_matching_brings_the_layers_closer():
    student, teacher = sparse_student_and_teacher()
    plain = copy.deepcopy(student)

    def probe_nmse(model) -> float:
        with torch.no_grad():
            return float(hidden_nmse(model(input_ids=PROBE, output_hidden_states=True).hidden_states,
                                     teacher(input_ids=PROBE, output_hidden_states=True).hidden_states))

    before = probe_nmse(student)
    # A large weight: the cross-entropy term stays at full weight (distill_weight = 0) beside it.
    train(student, train_windows(), TrainConfig(distill_hidden_weight=20.0, **SHORT_RUN), teacher=teacher)
    train(plain, train_windows(), TrainConfig(**SHORT_RUN))
    assert probe_nmse(student) < 0.85 * before  # measured 0.119 -> 0.094
    assert probe_nmse(student) < 0.8 * probe_nmse(plain)  # plain fine-tuning: 0.132


def _float64_pair():
    student = make_tiny_lm(seed=0).double()
    teacher = frozen_teacher(make_tiny_lm(seed=1).double())
    batch = make_tokens()[: 2 * 16].view(2, 16)
    return student, teacher, batch


def _hand_loss(student, teacher, batch, w: float, temperature: float, h: float) -> float:
    """(1-w)*CE + w*T^2*KL(teacher || student) + h*NMSE, written out in float64."""
    with torch.no_grad():
        out_s = student(input_ids=batch, output_hidden_states=True)
        out_t = teacher(input_ids=batch, output_hidden_states=True)
    logp = torch.log_softmax(out_s.logits[:, :-1], dim=-1)
    ce = -logp.gather(-1, batch[:, 1:, None]).mean()
    p_t = torch.softmax(out_t.logits / temperature, dim=-1)
    kl = (p_t * (p_t.log() - torch.log_softmax(out_s.logits / temperature, dim=-1))).sum(-1).mean()
    nmse = torch.stack([(((hs - ht) ** 2).sum(-1) / (ht ** 2).sum(-1)).mean()
                        for hs, ht in zip(out_s.hidden_states[1:], out_t.hidden_states[1:])]).mean()
    return float((1 - w) * ce + w * temperature ** 2 * kl + h * nmse)


@pytest.mark.parametrize("w, temperature, h, rel", [
    (1.0, 2.0, 0.0, 1e-12),   # no cross-entropy term: float64 end to end
    (1.0, 0.5, 0.7, 1e-12),
    (0.3, 2.0, 0.5, 1e-6),    # Hugging Face computes the cross-entropy in float32
])
def test_step_loss_is_the_hand_computed_mix(w, temperature, h, rel):
    student, teacher, batch = _float64_pair()
    expected = _hand_loss(student, teacher, batch, w, temperature, h)
    config = TrainConfig(steps=1, batch_size=2, distill_weight=w, distill_temperature=temperature,
                         distill_hidden_weight=h, **FAST)
    history = train(student, [batch], config, teacher=teacher)  # history[0]: the loss before the update
    assert history[0]["loss"] == pytest.approx(expected, rel=rel)


def test_bf16_teacher_gives_nearly_the_float32_loss():
    """The teacher may be kept in bf16 (half the memory): its logits are only targets."""
    student, teacher32, batch = _float64_pair()
    student, teacher32 = student.float(), teacher32.float()
    config = TrainConfig(steps=1, batch_size=2, distill_weight=0.5, distill_temperature=2.0, **FAST)
    losses = [train(copy.deepcopy(student), [batch], config, teacher=t)[0]["loss"]
              for t in (teacher32, frozen_teacher(teacher32, dtype=torch.bfloat16))]
    assert losses[1] != losses[0] and losses[1] == pytest.approx(losses[0], rel=1e-3)  # measured 3e-7 apart


def test_logit_kl_masks_padding_and_is_zero_for_equal_logits():
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    assert float(logit_kl(logits, logits.clone(), 3.0)) == pytest.approx(0.0, abs=1e-15)
    other = torch.randn(2, 5, 7, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kept = torch.cat([logit_kl(logits[:1, :3], other[:1, :3]).expand(3), logit_kl(logits[1:], other[1:]).expand(5)])
    assert float(logit_kl(logits, other, mask=mask)) == pytest.approx(float(kept.mean()), rel=1e-12)


def test_zero_weight_is_the_plain_run_exactly():
    with_teacher, plain = make_tiny_lm(), make_tiny_lm()
    teacher = frozen_teacher(make_tiny_lm(seed=1))
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    config = TrainConfig(lr=1e-2, steps=3, batch_size=2, **FAST)
    a = train(with_teacher, TokenWindows(make_tokens(), 16), config, teacher=teacher)
    b = train(plain, TokenWindows(make_tokens(), 16), config)
    assert [e["loss"] for e in a] == [e["loss"] for e in b]
    snap_a, snap_b = trainable_snapshot(with_teacher), trainable_snapshot(plain)
    assert all(torch.equal(snap_a[k], snap_b[k]) for k in snap_b)
    assert calls == []  # weight 0: the teacher is not even run


@pytest.mark.parametrize("field, value", [
    ("distill_weight", -0.1), ("distill_weight", 1.5), ("distill_weight", float("nan")), ("distill_weight", True),
    ("distill_temperature", 0.0), ("distill_temperature", -1.0), ("distill_temperature", float("inf")),
    ("distill_hidden_weight", -0.5), ("distill_hidden_weight", "1"),
])
def test_bad_distill_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}\b"):
        TrainConfig(**{field: value})


def test_bad_teachers_are_refused():
    student = make_tiny_lm()
    data = TokenWindows(make_tokens(), 16)
    config = TrainConfig(steps=1, batch_size=2, distill_weight=0.5, **FAST)
    with pytest.raises(ValueError, match=r"train: TrainConfig\.distill_weight.*needs a teacher"):
        train(student, data, config)
    with pytest.raises(ValueError, match=r"train: teacher is the student"):
        train(student, data, config, teacher=student)
    with pytest.raises(ValueError, match=r"train: teacher: expected a torch.nn.Module"):
        train(student, data, config, teacher="dense")
    with pytest.raises(ValueError, match=r"logit_kl: student logits"):
        logit_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


# ----------------------------------------------------------------------------- CLI

TRAIN = ["--seq-len", "32", "--eval-windows", "2", "--calib-windows", "2", "--train-seq-len", "32",
         "--batch-size", "2", "--steps", "3", "--warmup", "1", "--lr", "3e-3", "--svd-rank", "4",
         "--lora-rank", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    return write_tiny_cli_assets(tmp_path_factory.mktemp("tiny_cli_distill"))


def _finetune(tiny_assets, out, *extra) -> int:
    model_dir, text = tiny_assets
    return cli.main(["finetune", "--model", str(model_dir), "--text", str(text), "--out", str(out), *TRAIN, *extra])


def test_cli_distill_runs_and_records_its_settings(tiny_assets, tmp_path):
    assert _finetune(tiny_assets, tmp_path / "plain") == 0
    assert _finetune(tiny_assets, tmp_path / "distil", "--distill", "0.5", "--distill-temperature", "2") == 0
    recorded = json.loads((tmp_path / "distil" / "config.json").read_text())["config"]
    assert recorded["distill"] == 0.5 and recorded["distill_temperature"] == 2.0
    plain, distilled = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("plain", "distil"))
    # Same pruned model and data: the first step's loss differs only by the teacher term.
    assert plain["stages"]["pruned"] == distilled["stages"]["pruned"]
    assert plain["history"][0]["loss"] != distilled["history"][0]["loss"]
    assert all(e["loss"] > 0 for e in distilled["history"])


@pytest.mark.parametrize("extra, message", [
    (["--distill-temperature", "0"], "TrainConfig.distill_temperature"),
    (["--distill-hidden", "-1"], "TrainConfig.distill_hidden_weight"),
    (["--method", "losa", "--distill", "0.5"], "--distill: not available with --method losa"),
])
def test_cli_bad_distill_flags_are_one_line(tiny_assets, tmp_path, capsys, extra, message):
    assert _finetune(tiny_assets, tmp_path / "run", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err

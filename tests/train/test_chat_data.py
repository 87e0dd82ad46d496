"""Instruction / chat data: jsonl records ({prompt, completion} and {messages}) rendered with a tiny
tokenizer's chat template; the labels cover exactly the completion tokens (checked against a hand
tokenization), training uses them, completion perplexity equals a direct float64 computation, the CLI
fine-tunes on such a file, and bad records raise errors naming the file, line and key."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from salr.cli import assets, steps
from salr.eval.perplexity import completion_perplexity
from salr.train import TrainConfig, train
from salr.train.chat_data import (ChatExamples, is_chat_jsonl, read_chat_jsonl, tokenize_conversation,
                                  tokenize_conversations)
from salr_helpers import write_tiny_cli_assets

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("tokenizers", reason="tokenizers is not installed")

# ChatML-like in the tiny word vocabulary: w50 = user turn, w52 = assistant turn (and the generation
# prompt), w53 = system turn, w51 = end of turn.
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}w52 {% elif m['role'] == 'system' %}"
                 "w53 {% else %}w50 {% endif %}{{ m['content'] }} w51 {% endfor %}"
                 "{% if add_generation_prompt %}w52 {% endif %}")

PAIRS = [("w1 w2 w3", "w4 w5"), ("w6 w7", "w8 w9 w10"), ("w11", "w12"), ("w13 w14 w15 w16", "w17 w18 w19"),
         ("w20 w21", "w22"), ("w23", "w24 w25 w26 w27")]
MESSAGES = [[{"role": "system", "content": "w30 w31"}, {"role": "user", "content": "w32 w33"},
             {"role": "assistant", "content": "w34 w35"}, {"role": "user", "content": "w36"},
             {"role": "assistant", "content": "w37 w38 w39"}],
            [{"role": "user", "content": "w40 w41"}, {"role": "assistant", "content": "w42"},
             {"role": "user", "content": "w43 w44"}]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory with the chat template, the tokenizer, the model, a plain-text file)."""
    root = tmp_path_factory.mktemp("chat")
    model_dir, text = write_tiny_cli_assets(root)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    return model_dir, tokenizer, model, text


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def hand_tokens(tokenizer, words_and_flags):
    """Ids and completion flags from (space-separated words, is_completion) pieces."""
    ids, flags = [], []
    for words, completion in words_and_flags:
        piece = tokenizer(words, add_special_tokens=False)["input_ids"]
        assert len(piece) == len(words.split())  # one word, one token
        ids += piece
        flags += [completion] * len(piece)
    return ids, flags


def test_labels_mask_exactly_the_completion_tokens(tiny, tmp_path):
    _, tokenizer, _, _ = tiny
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS[:1]]
                       + [{"messages": m} for m in MESSAGES])
    assert is_chat_jsonl(path)
    conversations = read_chat_jsonl(path)
    got = [tokenize_conversation(tokenizer, c) for c in conversations]
    expected = [
        hand_tokens(tokenizer, [("w50 w1 w2 w3 w51 w52", False), ("w4 w5 w51", True)]),
        hand_tokens(tokenizer, [("w53 w30 w31 w51 w50 w32 w33 w51 w52", False), ("w34 w35 w51", True),
                                ("w50 w36 w51 w52", False), ("w37 w38 w39 w51", True)]),
        hand_tokens(tokenizer, [("w50 w40 w41 w51 w52", False), ("w42 w51", True), ("w50 w43 w44 w51", False)]),
    ]
    for conv, (ids, flags) in zip(got, expected):
        assert conv.ids.tolist() == ids
        assert conv.completion.tolist() == flags

    # Padding (seq_len 12 > 9 tokens) and truncation (seq_len 12 < 20 tokens).
    batch = ChatExamples(got[:2], seq_len=12, shuffle=False, pad_id=0).take(2)
    ids0, flags0 = expected[0]
    assert len(ids0) == 9
    assert batch["input_ids"][0].tolist() == ids0 + [0] * 3
    assert batch["attention_mask"][0].tolist() == [1] * 9 + [0] * 3
    assert batch["labels"][0].tolist() == [i if f else -100 for i, f in zip(ids0, flags0)] + [-100] * 3
    ids1, flags1 = expected[1]
    assert batch["input_ids"][1].tolist() == ids1[:12]
    assert batch["labels"][1].tolist() == [i if f else -100 for i, f in zip(ids1[:12], flags1[:12])]
    assert batch["attention_mask"][1].tolist() == [1] * 12


def test_chat_examples_resume_and_drop_truncated_completions(tiny):
    _, tokenizer, _, _ = tiny
    examples = tokenize_conversations(tokenizer, [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                                                  for p, c in PAIRS])
    source = ChatExamples(examples, seq_len=16, seed=3)
    first = [source.take(2) for _ in range(5)]  # crosses an epoch (6 conversations)
    resumed = ChatExamples(examples, seq_len=16, seed=3)
    resumed.load_state_dict(ChatExamples(examples, seq_len=16, seed=3).state_dict() | {"consumed": 4})
    for a, b in zip(first[2:], [resumed.take(2) for _ in range(3)]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    with pytest.raises(ValueError, match="seq_len"):
        resumed.load_state_dict(ChatExamples(examples, seq_len=15, seed=3).state_dict())
    # The 4th prompt renders to 7 tokens before its completion: at seq_len 7 it has none left.
    with pytest.warns(UserWarning, match="1 of 6 conversations"):
        short = ChatExamples(examples, seq_len=7)
    assert len(short) == 5
    with pytest.raises(ValueError, match="ChatExamples: no conversation"), pytest.warns(UserWarning):
        ChatExamples(examples[3:4], seq_len=7)


def test_completion_perplexity_equals_float64_computation(tiny):
    _, tokenizer, model, _ = tiny
    examples = tokenize_conversations(tokenizer, [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                                                  for p, c in PAIRS])
    batch = ChatExamples(examples, seq_len=14, shuffle=False).take(len(examples))
    got = completion_perplexity(model, batch, batch_size=4, progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:  # each conversation alone, unpadded, in float64
            logp = torch.log_softmax(model(input_ids=e.ids[None]).logits[0].double(), dim=-1)
            for t in range(1, e.ids.numel()):
                if e.completion[t]:
                    total -= float(logp[t - 1, e.ids[t]])
                    count += 1
    assert count == int((batch["labels"] != -100).sum())
    assert got == pytest.approx(math.exp(total / count), rel=1e-5)
    with torch.no_grad():
        all_tokens = math.exp(float(model(input_ids=batch["input_ids"][:1], labels=batch["input_ids"][:1]).loss))
    assert got != pytest.approx(all_tokens, rel=1e-3)  # it is not the all-token perplexity


def test_training_lowers_the_completion_loss_only(tiny):
    """The loop's loss is the labelled-token mean: training on a fixed completion drives it down."""
    _, tokenizer, _, _ = tiny
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny[0])
    for name, p in model.named_parameters():
        p.requires_grad_("lm_head" in name)
    examples = tokenize_conversations(tokenizer, [[{"role": "user", "content": p}, {"role": "assistant",
                                                                                   "content": "w57 w58 w59"}]
                                                  for p, _ in PAIRS])
    eval_batch = ChatExamples(examples, seq_len=16, shuffle=False).take(len(examples))
    before = completion_perplexity(model, eval_batch, progress=False)
    history = train(model, ChatExamples(examples, seq_len=16, seed=0),
                    TrainConfig(steps=30, batch_size=2, lr=5e-2, warmup_steps=0, schedule="constant", progress=False),
                    resume=False)
    after = completion_perplexity(model, eval_batch, progress=False)
    assert after < before / 4
    assert history[0]["loss"] == pytest.approx(math.log(before), rel=0.2)


@pytest.mark.parametrize("record, key", [
    ({"prompt": "w1"}, "'completion'"),
    ({"completion": "w1"}, "'prompt'"),
    ({"prompt": "w1", "completion": "  "}, "'completion': empty completion"),
    ({"messages": [{"role": "user", "content": "w1"}]}, "'messages': no assistant turn"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "w2"}]}, r"'messages\[0\].content'"),
    ({"messages": []}, "'messages'"),
])
def test_bad_records_name_file_line_and_key(tmp_path, record, key):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "w1", "completion": "w2"}, record])
    with pytest.raises(ValueError, match=rf"read_chat_jsonl: .*bad\.jsonl:2: key {key}"):
        read_chat_jsonl(path)


def test_plain_text_jsonl_keeps_token_windows(tiny, tmp_path):
    _, tokenizer, _, _ = tiny
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": f"w{i} w{i + 1} w{i + 2}"} for i in range(1, 40)])
    assert not is_chat_jsonl(path)
    splits = assets.text_splits(tokenizer, path)
    assert type(splits) is assets.TextSplits
    assert splits.train[:3].tolist() == tokenizer("w1 w2 w3", add_special_tokens=False)["input_ids"]


def test_chat_splits_evaluate_completion_perplexity(tiny, tmp_path):
    _, tokenizer, model, _ = tiny
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS * 2])
    splits = assets.text_splits(tokenizer, path)
    assert isinstance(splits, assets.ChatSplits) and len(splits.eval_examples) == 3  # the last 20 %
    budget = steps.Budget(eval_windows=2, eval_seq_len=16)
    expected = completion_perplexity(model, ChatExamples(splits.eval_examples[:2], 16, shuffle=False).take(2),
                                     progress=False)
    assert steps.evaluate(model, splits, budget, "chat") == pytest.approx(expected, rel=1e-12)


def test_cli_finetune_on_chat_jsonl(tiny, tmp_path):
    model_dir, _, _, _ = tiny
    records = [{"prompt": p, "completion": c} for p, c in PAIRS * 3] + [{"messages": m} for m in MESSAGES * 3]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "salr", "finetune", "--model", str(model_dir), "--text", str(path),
           "--out", str(out), "--steps", "3", "--batch-size", "2", "--train-seq-len", "24", "--seq-len", "24",
           "--calib-windows", "2", "--eval-windows", "4", "--svd-rank", "4", "--lora-rank", "2", "--warmup", "1",
           "--criterion", "magnitude", "--threads", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    pruned, tuned = metrics["stages"]["pruned"]["perplexity"], metrics["stages"]["fine-tuned"]["perplexity"]
    assert math.isfinite(pruned) and math.isfinite(tuned) and pruned > 1
    assert metrics["perplexity_over"] == "completion tokens"
    assert len(metrics["history"]) == 3 and all(math.isfinite(h["loss"]) for h in metrics["history"])


def test_cli_bad_record_exits_with_the_location(tiny, tmp_path):
    model_dir, _, _, _ = tiny
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "w1", "completion": "w2"}] * 3 + [{"prompt": "w3"}])
    result = subprocess.run([sys.executable, "-m", "salr", "eval", "--model", str(model_dir), "--text", str(path),
                             "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "chat.jsonl:4: key 'completion'" in result.stderr

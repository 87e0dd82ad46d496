"""lm-eval drives a salr-converted model: a local multiple-choice task (offline YAML + JSONL), whose
accuracy must equal the one computed here from the model's own log-likelihoods."""

from __future__ import annotations

import json

import pytest
import torch

from salr.eval import lm_eval as lm_eval_adapter
from salr.methods.convert import convert
from salr_helpers import tiny_model, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("lm_eval", reason="lm-eval is not installed (the `eval` extra)")

ALPHABET = " abcdefghijklmnopqrstuvwxyz?."
DOCS = [
    {"question": "is the sky blue?", "choices": ["yes", "no", "maybe"], "label": 0},
    {"question": "cats bark.", "choices": ["true", "false"], "label": 1},
    {"question": "one plus one is", "choices": ["two", "three", "ten"], "label": 0},
    {"question": "water is", "choices": ["dry", "wet"], "label": 1},
    {"question": "the sun rises in the", "choices": ["east", "west", "north", "south"], "label": 0},
    {"question": "ice is", "choices": ["cold", "hot"], "label": 0},
]


def char_tokenizer():
    """A character-level fast tokenizer (no merges, no specials added to the text): token = character."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, **{c: i + 2 for i, c in enumerate(ALPHABET)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def write_task(folder, name="salr_toy_mc"):
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    return name


@torch.no_grad()
def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) in float64 from the model's logits."""
    ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    return logp.gather(-1, ids[0, 1:, None])[len(ctx) - 1:].sum().item()


def expected_accuracy(model, tokenizer) -> float:
    """acc as lm-eval defines it: argmax over choices of log p(" " + choice | question)."""
    correct = 0
    for doc in DOCS:
        scores = [loglikelihood(model, tokenizer, doc["question"], " " + c) for c in doc["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return correct / len(DOCS)


@pytest.fixture(scope="module")
def converted():
    tokenizer = char_tokenizer()
    model = tiny_model("llama", vocab=len(tokenizer))
    convert(model, sparsity=0.5, criterion="magnitude", svd_rank=4, lora_rank=2, progress=False)
    model.eval()
    return model, tokenizer


def test_accuracy_matches_the_models_own_loglikelihoods(converted, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    model, tokenizer = converted
    task = write_task(tmp_path)
    scores = lm_eval_adapter.evaluate_tasks(model, tokenizer, [task], task_dir=tmp_path)
    assert set(scores) == {task}
    assert scores[task]["acc"] == pytest.approx(expected_accuracy(model, tokenizer), abs=1e-12)


def test_every_loglikelihood_matches_float64(converted):
    from lm_eval.api.instance import Instance

    model, tokenizer = converted
    pairs = [(d["question"], " " + c) for d in DOCS for c in d["choices"]]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    got = lm_eval_adapter.lm_eval_model(model, tokenizer, batch_size=3).loglikelihood(requests)
    want = [loglikelihood(model, tokenizer, *pair) for pair in pairs]
    assert len(set(round(w, 6) for w in want)) == len(want), "the choices must be distinguishable"
    for (logp, _greedy), ref in zip(got, want):
        assert logp == pytest.approx(ref, rel=1e-5, abs=1e-4)


def test_bad_arguments(converted, tmp_path):
    model, tokenizer = converted
    with pytest.raises(ValueError, match="tasks: expected one or more"):
        lm_eval_adapter.evaluate_tasks(model, tokenizer, [])
    with pytest.raises(ValueError, match="task_dir: .* is not a directory"):
        lm_eval_adapter.evaluate_tasks(model, tokenizer, ["x"], task_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="tasks: lm-eval does not know"):
        lm_eval_adapter.evaluate_tasks(model, tokenizer, ["no_such_task_salr"], task_dir=tmp_path)
    with pytest.raises(ValueError, match="limit: expected"):
        lm_eval_adapter.evaluate_tasks(model, tokenizer, ["x"], limit=0)
    with pytest.raises(ValueError, match="tokenizer: expected"):
        lm_eval_adapter.lm_eval_model(model, None)


def test_cli_eval_runs_lm_eval_tasks_on_a_saved_model(converted, tmp_path, monkeypatch):
    from salr import cli
    from salr.io.saved_model import save

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    model, tokenizer = converted
    save(model, tmp_path / "model", tokenizer=tokenizer)
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(d["question"] for d in DOCS * 4) for _ in range(5)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task = write_task(tasks)
    assert cli.main(["eval", "--model", str(tmp_path / "model"), "--text", str(text), "--seq-len", "16",
                     "--eval-windows", "2", "--tasks", task, "--task-dir", str(tasks), "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["lm_eval"][task]["acc"] == pytest.approx(expected_accuracy(model, tokenizer), abs=1e-12)
    assert "lm-eval" in (tmp_path / "run" / "report.md").read_text()

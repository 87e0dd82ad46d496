"""`salr generate` on a tiny Llama saved by the test (dense, and converted by salr): the streamed greedy
text equals transformers' own generate on the same model, --chat applies the chat template, and bad
input ends with one line on stderr and exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import salr
from salr import cli
from salr.cli.generate import generate, load_model, prompt_ids
from salr.methods.salr.model import salr_layers
from salr_helpers import write_tiny_cli_assets

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("tokenizers", reason="tokenizers is not installed")

PROMPT = "w3 w14 w15 w9"
CHAT_TEMPLATE = ("{% for m in messages %}w50 {{ m['content'] }} w51 {% endfor %}"
                 "{% if add_generation_prompt %}w52{% endif %}")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{'dense': HF directory, 'salr': salr format-2 directory, 'chat': dense + chat template}."""
    root = tmp_path_factory.mktemp("generate")
    dense_dir, _ = write_tiny_cli_assets(root)
    tokenizer = transformers.AutoTokenizer.from_pretrained(dense_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(dense_dir)
    chat_dir = root / "chat"
    model.save_pretrained(chat_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(chat_dir)
    torch.manual_seed(0)
    salr.sparsify_(model, salr.SALRConfig(sparsity=0.5, criterion="magnitude", svd_rank=4, lora_rank=0), progress=False)
    salr_dir = salr.save(model, root / "salr", tokenizer=transformers.AutoTokenizer.from_pretrained(dense_dir))
    return {"dense": dense_dir, "salr": salr_dir, "chat": chat_dir}


def reference(model, input_ids, n):
    """transformers' own greedy generate: the continuation's ids."""
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                         max_new_tokens=n)
    return out[:, input_ids.shape[1]:]


@pytest.mark.parametrize("kind", ["dense", "salr"])
def test_streamed_greedy_text_equals_transformers_generate(dirs, kind, capsys):
    assert cli.main(["generate", "--model", str(dirs[kind]), "--prompt", PROMPT, "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    if kind == "dense":
        model = transformers.AutoModelForCausalLM.from_pretrained(dirs[kind]).eval()
    else:
        model = salr.load(dirs[kind]).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(dirs[kind])
    expected = reference(model, tokenizer(PROMPT, return_tensors="pt").input_ids, 12)
    assert expected.shape[1] >= 1
    assert out.strip() == tokenizer.decode(expected[0], skip_special_tokens=True).strip()
    assert "tokens/s" in err and f"{expected.shape[1]} tokens in" in err


def test_generate_returns_the_ids_transformers_generates(dirs):
    model, tokenizer = load_model(str(dirs["salr"]))
    assert salr_layers(model) and not model.training
    ids = prompt_ids(tokenizer, PROMPT, chat=False)
    result = generate(model, tokenizer, ids, 10, stream=False)
    assert torch.equal(result.ids, reference(model, ids, 10))
    assert result.tokens_per_s > 0 and result.text == tokenizer.decode(result.ids[0], skip_special_tokens=True)


def test_chat_applies_the_template(dirs, capsys):
    tokenizer = transformers.AutoTokenizer.from_pretrained(dirs["chat"])
    ids = prompt_ids(tokenizer, PROMPT, chat=True)
    assert ids[0].tolist() == tokenizer(f"w50 {PROMPT} w51 w52", return_tensors="pt").input_ids[0].tolist()
    assert cli.main(["generate", "--model", str(dirs["chat"]), "--chat", "--prompt", PROMPT,
                     "--max-new-tokens", "6"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(dirs["chat"]).eval()
    expected = tokenizer.decode(reference(model, ids, 6)[0], skip_special_tokens=True)
    assert capsys.readouterr().out.strip() == expected.strip()


def _format_1_dir(root):
    old = root / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"format": "salr.model", "format_version": 1, "layers": {}}))
    return old


@pytest.mark.parametrize("case, message", [
    ("missing", "is not a directory"),
    ("empty prompt", "--prompt: empty"),
    ("blank prompt", "--prompt: empty"),
    ("format 1", "format_version' is 1"),
    ("zero tokens", "--max-new-tokens: must be a positive integer, got 0"),
    ("negative tokens", "--max-new-tokens: must be a positive integer, got -3"),
    ("chat without template", "no chat template"),
    ("not a model", "neither 'smollm2' nor a directory holding a Hugging Face config.json"),
])
def test_bad_input_is_one_line_and_status_2(dirs, tmp_path, case, message, capsys):
    model, extra, prompt = str(dirs["dense"]), [], PROMPT
    if case == "missing":
        model = str(tmp_path / "no-such-model")
    elif case == "empty prompt":
        prompt = ""
    elif case == "blank prompt":
        prompt = "  \n"
    elif case == "format 1":
        model = str(_format_1_dir(tmp_path))
    elif case == "zero tokens":
        extra = ["--max-new-tokens", "0"]
    elif case == "negative tokens":
        extra = ["--max-new-tokens=-3"]
    elif case == "chat without template":
        extra = ["--chat"]
    elif case == "not a model":
        model = str(tmp_path)
    assert cli.main(["generate", "--model", model, "--prompt", prompt, *extra]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("salr generate: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert out == ""


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "salr", "generate", "--model", str(tmp_path / "nope"),
                             "--prompt", "hi"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"salr generate: error: model: {str(tmp_path / 'nope')!r} is not a directory " \
                                    f"(nor 'smollm2')"


def test_help_lists_generate(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert all(opt in out for opt in ("--model", "--prompt", "--max-new-tokens", "--chat"))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "generate" in capsys.readouterr().out

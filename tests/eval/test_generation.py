"""Greedy decode + tokens/s: the ids equal transformers' own greedy generate."""

import pytest
import torch

from salr.eval.generation import decode_speed

transformers = pytest.importorskip("transformers", reason="transformers is not installed")


class ByteTokenizer:
    """Bytes as token ids (vocab 256): enough to drive a tiny random model."""

    def __call__(self, text, return_tensors="pt", add_special_tokens=False):
        ids = torch.tensor([list(text.encode())], dtype=torch.long)
        return type("Encoded", (), {"input_ids": ids})()

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids).decode(errors="replace")


def tiny_llama():
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_decode_matches_greedy_generate_and_reports_a_rate():
    model, tok = tiny_llama(), ByteTokenizer()
    result = decode_speed(model, tok, "sparse weights", new_tokens=12, repeats=2)
    prompt = tok("sparse weights").input_ids
    expected = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=0)[0, prompt.shape[1]:]
    assert result.text == tok.decode(expected)
    assert result.new_tokens == 12 and result.tokens_per_s > 0 and result.prefill_ms > 0
    assert not model.training


@pytest.mark.parametrize("kwargs, match", [({"new_tokens": 1}, "new_tokens"), ({"repeats": 0}, "repeats")])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decode_speed(tiny_llama(), ByteTokenizer(), "x", **kwargs)

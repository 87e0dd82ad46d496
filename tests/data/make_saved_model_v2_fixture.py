"""Writes tests/data/saved_model_v2/ (a format-2 model directory) and saved_model_v2_logits.safetensors
(the logits of the directory, loaded, on a fixed input), with the code of salr's main branch as of commit ea258b7 (before the
package was split into subpackages), so that tests/io/test_saved_model_compat.py proves that models
saved before the redesign still load and give identical logits.

The frozen recipe: the tiny Llama of tests/tiny_lm.py (vocab 128, hidden 64, MLP 128, 2 layers) in
bfloat16, converted by SALR (magnitude, 50 %, SVD rank 4, LoRA rank 4, random LoRA values so the LoRA
term is not zero); then in block 0 q_proj and v_proj become SALOR layers (factor sparsity 50 %), and
v_proj is merged into the stored BM8x8-factor form. So the directory holds SALR layers, a SALOR layer
in training form (masks) and one in stored form.

Re-running it with the new code must give the same files byte for byte only if nothing changed the
recipe's arithmetic; it is a record of how the fixture was made, not part of the test.

    PYTHONPATH=python .venv/bin/python tests/data/make_saved_model_v2_fixture.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

import salr
from salr.salor import FactorSparsityConfig
from salr.salor_linear import SALORLinear

HERE = Path(__file__).parent
OUT = HERE / "saved_model_v2"
LOGITS = HERE / "saved_model_v2_logits.safetensors"


def build() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    salr.convert(model, sparsity=0.5, criterion="magnitude", svd_rank=4, lora_rank=4, alpha=8.0,
                 progress=False)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, salr.SALRLinear):
                module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=gen) * 0.05)
    factor = FactorSparsityConfig(sparsity=0.5)
    attn = model.model.layers[0].self_attn
    attn.q_proj = SALORLinear.from_salr(attn.q_proj, factor)
    attn.v_proj = SALORLinear.from_salr(attn.v_proj, factor)
    attn.q_proj.update_masks(0)
    attn.v_proj.update_masks(0)
    attn.v_proj.merge()
    return model.eval()


def main() -> None:
    model = build()
    if OUT.exists():
        shutil.rmtree(OUT)
    salr.save(model, OUT)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    # The logits of the directory as loaded (not of the in-memory model: its rotary inv_freq buffer
    # was cast to bf16 with the model, a loaded model recomputes it in fp32).
    with torch.no_grad():
        logits = salr.load(OUT)(input_ids=ids).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, str(LOGITS), metadata={"cpu_isa": salr.cpu_isa()})
    size = sum(p.stat().st_size for p in OUT.iterdir()) + LOGITS.stat().st_size
    print(f"wrote {OUT} and {LOGITS} ({size} bytes), CPU path {salr.cpu_isa()}")


if __name__ == "__main__":
    main()

"""Interop on SmolLM2-135M-Instruct: a SALR model (pruned base + SVD residual adapter) exported to
compressed-tensors (sparse base) + PEFT (adapter), reloaded by those libraries, evaluated; and the
file sizes of the dense, salr and compressed-tensors checkpoints.

    python bench/interop_sizes.py --output runs/interop_sizes.md

Rows (perplexity = exp(mean NLL) over the first --eval-windows 512-token windows of the Wikipedia
evaluation split, design.md §5):

* dense: the packaged model;
* salr: after ``salr.convert`` (criterion, 50 %, SVD rank --svd-rank, no LoRA), salr kernels;
* salr reloaded: ``salr.save`` then ``salr.load``;
* compressed-tensors + PEFT: the exported sparse-bitmask checkpoint decompressed by
  compressed-tensors into a dense transformers model (``ModelCompressor.decompress`` where the
  installed compressed-tensors still has the sparse-bitmask compressor, <= 0.14; otherwise its
  ``unpack_bitmasks`` and the format's row-major scatter, said in the output), plus the exported
  adapter loaded by ``peft.PeftModel``;
* back into salr: ``import_compressed_tensors`` + ``load_peft_adapter``.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from pruning_quality import machine  # noqa: E402

from salr.cli import assets  # noqa: E402
from salr.io.saved_model import load, save
from salr.methods.convert import convert  # noqa: E402
from salr.eval.perplexity import perplexity  # noqa: E402
from salr.interop.compressed_tensors import export_compressed_tensors, import_compressed_tensors  # noqa: E402
from salr.interop.peft import export_peft_adapter, load_peft_adapter  # noqa: E402
from salr.cli.runs import markdown_table
from salr.io.files import atomic_write_text  # noqa: E402


def dir_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.name.endswith(suffix))


def decompress_with_compressed_tensors(path: Path) -> tuple[torch.nn.Module, str]:
    """A dense transformers model from the sparse-bitmask checkpoint, decompressed by the library."""
    import compressed_tensors
    import transformers
    from compressed_tensors.utils import unpack_bitmasks
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    try:
        from compressed_tensors.compressors import ModelCompressor, BitmaskCompressor  # noqa: F401  (<= 0.14)
    except ImportError:
        state = load_file(str(path / "model.safetensors"))
        dense = {}
        for key in [k for k in state if k.endswith(".bitmask")]:
            layer = key.removesuffix(".bitmask")
            mask = unpack_bitmasks(state.pop(key), state.pop(f"{layer}.shape").tolist())
            weight = torch.zeros(mask.shape, dtype=state[f"{layer}.compressed"].dtype)
            weight[mask] = state.pop(f"{layer}.compressed")
            state.pop(f"{layer}.row_offsets")
            dense[f"{layer}.weight"] = weight
        model.load_state_dict({**state, **dense}, strict=False)
        model.tie_weights()
        how = f"compressed-tensors {compressed_tensors.__version__}: unpack_bitmasks + row-major scatter"
    else:
        ModelCompressor.from_pretrained(str(path)).decompress(str(path), model)
        # decompress re-registers every parameter it loads, which unties lm_head from the embedding
        # (stored once, as save_pretrained does); transformers' loader would tie them again
        model.tie_weights()
        how = f"compressed-tensors {compressed_tensors.__version__}: ModelCompressor.decompress + tie_weights"
    return model, how


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--criterion", default="magnitude", choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--svd-rank", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    model, tokenizer = assets.load_model(assets.SMOLLM2)
    splits = assets.text_splits(tokenizer)
    windows = splits.eval_windows(args.eval_windows, args.seq_len)
    rows, sizes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def evaluate(name: str, m: torch.nn.Module, note: str = "") -> float:
            ppl = perplexity(m, windows, desc=name)
            rows.append((name, f"{ppl:.4f}", note))
            print(f"{name}: {ppl:.4f} {note}", flush=True)
            return ppl

        evaluate("dense", model)
        model.save_pretrained(tmp / "dense32")
        sizes.append(("dense fp32 (save_pretrained)", dir_bytes(tmp / "dense32")))
        # a copy: casting the model itself to bf16 and back would round its weights and its rotary
        # inv_freq buffer (not saved, so reloaded models would recompute it exactly)
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp / "dense16")
        sizes.append(("dense bf16 (save_pretrained)", dir_bytes(tmp / "dense16")))

        start = time.perf_counter()
        calib = splits.calibration_windows(args.calib_windows, args.seq_len) if args.criterion != "magnitude" else None
        convert(model, criterion=args.criterion, sparsity=args.sparsity, svd_rank=args.svd_rank, lora_rank=0,
                calibration=calib)
        label = f"salr: {args.criterion} {args.sparsity:.0%} + SVD r={args.svd_rank}"
        salr_ppl = evaluate(label, model, f"convert {time.perf_counter() - start:.0f} s")
        save(model, tmp / "salr", tokenizer=tokenizer)
        sizes.append(("salr fp32 (salr.save: base + SVD adapter)", dir_bytes(tmp / "salr")))
        evaluate("salr.save -> salr.load", load(tmp / "salr"))

        export_compressed_tensors(model, tmp / "ct", adapters="drop", tokenizer=tokenizer)
        export_peft_adapter(model, tmp / "peft", base_model_name_or_path="SmolLM2-135M-Instruct")
        sizes.append(("compressed-tensors fp32 sparse-bitmask (base)", dir_bytes(tmp / "ct")))
        sizes.append(("PEFT LoRA fp32 (exported SVD adapter)", dir_bytes(tmp / "peft")))
        dense, how = decompress_with_compressed_tensors(tmp / "ct")
        served = peft.PeftModel.from_pretrained(dense, str(tmp / "peft")).eval()
        ct_ppl = evaluate("compressed-tensors + PEFT (dense transformers)", served, how)
        back = import_compressed_tensors(tmp / "ct")
        load_peft_adapter(back, tmp / "peft", trainable=False)
        back_ppl = evaluate("import_compressed_tensors + load_peft_adapter (salr)", back)

        bf16 = model.to(torch.bfloat16)
        save(bf16, tmp / "salr16")
        sizes.append(("salr bf16 (salr.save: base + SVD adapter)", dir_bytes(tmp / "salr16")))
        export_compressed_tensors(bf16, tmp / "ct16", adapters="drop")
        sizes.append(("compressed-tensors bf16 sparse-bitmask (base)", dir_bytes(tmp / "ct16")))
        export_peft_adapter(bf16, tmp / "peft16")
        sizes.append(("PEFT LoRA bf16 (exported SVD adapter)", dir_bytes(tmp / "peft16")))

    command = "python bench/interop_sizes.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    size_rows = [(name, f"{n / 1e6:.1f}", f"{n / sizes[0][1]:.3f}") for name, n in sizes]
    text = "\n".join([
        f"Command: `{command}`", "",
        f"Machine: {machine()}; transformers {transformers.__version__}, peft {peft.__version__}.",
        f"Perplexity over {windows.shape[0]} x {windows.shape[1]}-token evaluation windows.", "",
        markdown_table(["model", "perplexity", "note"], rows), "",
        f"|salr - compressed-tensors+PEFT| = {abs(salr_ppl - ct_ppl):.2e}, "
        f"|salr - back into salr| = {abs(salr_ppl - back_ppl):.2e}", "",
        "Weights files (safetensors bytes, tokenizer and JSON excluded):", "",
        markdown_table(["checkpoint", "MB", "vs dense fp32"], size_rows), ""])
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.output, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Fine-tuning speed (issue 20): salr SmolLM2-135M (50% BM8x8 + SVD r=64 + LoRA r=16, only the LoRA
trains) against the dense SmolLM2 with a PEFT LoRA of the same rank on the same linears, both trained
by salr's own loop (salr.train.train) on the same windows, batch and sequence length.

Each round trains every model for --steps optimizer steps, alternating models round by round; the
first step of each round is dropped (optimizer state, allocator) and the table gives the median
tokens/s of the rest. Pruning is by magnitude (no calibration pass): speed does not depend on which
weights are kept.

  python bench/finetune_speed.py --threads 2 --rounds 3 --steps 4
  python bench/finetune_speed.py --profile      # adds a torch.profiler table of one salr step
  python bench/finetune_speed.py --per-linear   # one linear's forward + backward at SmolLM2's shapes
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import salr
from salr.cli import assets
from salr.train import TokenWindows, TrainConfig, train

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def dense_with_peft_lora(model, rank: int):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(LINEARS)))


def salr_model(model, rank: int, svd_rank: int):
    salr.sparsify_(model, salr.SALRConfig(sparsity=0.5, criterion="magnitude", svd_rank=svd_rank,
                                          svd_method="randomized", lora_rank=rank, lora_alpha=2 * rank),
                   None, progress=False)
    return model


def per_linear(args) -> None:
    """Forward + backward of one linear at M = batch · seq_len tokens (fp32, 50 % magnitude-pruned
    random weight): dense F.linear + LoRA r against salr's op with the SVD adapter frozen (what
    SALRLinear passes) and with every rank trainable (what a plain concatenation makes of it);
    contenders interleaved call by call, medians."""
    from salr import ops

    gen = torch.Generator().manual_seed(0)
    m = args.batch_size * args.seq_len
    print(f"one linear, fp32, M = {m}, {torch.get_num_threads()} threads, LoRA r = {args.rank}, SVD r = "
          f"{args.svd_rank}, 25 interleaved repeats, medians (ms, forward + backward)")
    print("| N×K | dense + LoRA | salr, SVD frozen | salr, every rank trainable | dense + LoRA / salr frozen |")
    print("|---|---|---|---|---|")
    for n, k in [(576, 576), (192, 576), (1536, 576), (576, 1536)]:
        w = torch.randn(n, k, generator=gen)
        w[torch.rand(n, k, generator=gen) < 0.5] = 0
        bitmap, values, offsets = ops.bitmap_encode(w)
        x0, grad = torch.randn(m, k, generator=gen), torch.randn(m, n, generator=gen)
        a_svd = torch.randn(args.svd_rank, k, generator=gen) / 10
        b_svd = torch.randn(n, args.svd_rank, generator=gen) / 10
        a = (torch.randn(args.rank, k, generator=gen) / 10).requires_grad_()
        b = (torch.randn(n, args.rank, generator=gen) / 10).requires_grad_()

        def dense_lora(x):
            return torch.nn.functional.linear(x, w) + (x @ a.T) @ b.T

        def salr_frozen(x):
            return ops.sparse_lowrank_gemm(x, bitmap, values, offsets, n, k, a, b, frozen_adapter=(a_svd, b_svd))

        def salr_trainable(x):
            return ops.sparse_lowrank_gemm(x, bitmap, values, offsets, n, k, torch.cat((a_svd, a)),
                                           torch.cat((b_svd, b), 1))

        contenders = [dense_lora, salr_frozen, salr_trainable]
        times = {f: [] for f in contenders}
        for repeat in range(26):
            for f in contenders:
                x = x0.clone().requires_grad_()
                start = time.perf_counter()
                f(x).backward(grad)
                if repeat:  # the first round warms the allocator and the decode scratch
                    times[f].append(1e3 * (time.perf_counter() - start))
        dense_ms, frozen_ms, trainable_ms = (statistics.median(times[f]) for f in contenders)
        print(f"| {n}×{k} | {dense_ms:.1f} | {frozen_ms:.1f} | {trainable_ms:.1f} | {dense_ms / frozen_ms:.2f}× |")


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--svd-rank", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per model per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--per-linear", action="store_true", help="time one linear per SmolLM2 shape instead")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.per_linear:
        return per_linear(args)
    base, tokenizer = assets.load_model("smollm2")
    splits = assets.text_splits(tokenizer)
    models = {"dense + PEFT LoRA": dense_with_peft_lora(copy.deepcopy(base), args.rank),
              "salr 50% + SVD + LoRA": salr_model(copy.deepcopy(base), args.rank, args.svd_rank)}
    del base
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-4, warmup_steps=0, progress=False)
    rates = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            model.train()
            history = train(model, TokenWindows(splits.train, args.seq_len), config, resume=False)
            rates[name] += [h["tokens_per_s"] for h in history[1:]]
    print(f"SmolLM2-135M fp32, {torch.get_num_threads()} threads, salr CPU path {salr.cpu_isa()}, batch "
          f"{args.batch_size} x {args.seq_len} tokens, {args.rounds} rounds x {args.steps - 1} timed steps")
    print("| model | trainable params | tokens/s (median) | vs dense + LoRA |\n|---|---|---|---|")
    baseline = statistics.median(rates["dense + PEFT LoRA"])
    for name, model in models.items():
        rate = statistics.median(rates[name])
        print(f"| {name} | {trainable(model) / 1e6:.2f} M | {rate:.0f} | {rate / baseline:.2f}× |")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        model = models["salr 50% + SVD + LoRA"]
        batch = TokenWindows(splits.train, args.seq_len).take(args.batch_size)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(input_ids=batch, labels=batch).loss.backward()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()

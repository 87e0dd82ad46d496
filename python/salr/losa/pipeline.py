"""The LoSA procedure: T rounds of (RMI layer-wise sparsity → prune the merged weight → error-based
ranks → fine-tune the masked LoRA), then one final merge into plain BM8x8 sparse layers.

Round t (t = 1..T) targets the mean sparsity s_t = S − S(1 − t/T)³:

1. **RMI**: the calibration windows run through the current model (LoRA included); every decoder
   block's input features feed a streaming linear CKA (one window's features of all blocks at a
   time); importance I = exp(−β·t̃) gives the per-block sparsity by the closed-form LP with
   |x_l − s_t| ≤ δ and x_l ≥ the block's current sparsity (masks only grow).
2. **Prune** (sequential, block by block, each block fed by the already-pruned ones): Wanda scores
   |W_eff|·‖X_j‖ on the *merged* weight W_eff = W_s + s·M⊙(BA), per output row, already-pruned
   entries first; the kept entries keep W_eff, i.e. the layer becomes M'⊙(W_s + s·BA). The LoRA
   factors stay (their trained directions carry over) instead of being folded in.
3. **Ranks**: E_l = per-feature-normalized error between the dense block (original weights) and
   the pruned block on the same inputs; r_l ∝ E_l in [1, r_max], Σ r_l = R̄·L; every linear of block
   l gets rank r_l (grow: fresh A rows, zero B columns; shrink: top directions kept, the rest merged).
4. **Fine-tune** the LoRA factors (everything else frozen) with :func:`salr.training.train` for the
   round's share of the steps.

After round T every layer is merged (``LoSALinear.merge``): a plain BM8x8 sparse model, no adapters.
Memory: one block boundary's activations (inputs, pruned outputs, dense outputs) plus a copy of the
targeted dense weights (for E_l), and one window of all blocks' features for the CKA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from salr.calibration import capture_first_block_inputs, check_calibration
from salr.losa.masked_lora import LoSALinear
from salr.losa.ranks import ErrorAccumulator, allocate_ranks
from salr.losa.rmi import StreamingCKA, block_importance, layerwise_sparsity, sparsity_delta
from salr.losa.schedule import check_final_share, check_rounds, sparsity_schedule, split_steps
from salr.models import block_linears, find_blocks, model_device, set_submodule, vocab_size
from salr.training import TrainConfig, train

LAYERWISE = ("rmi", "uniform")
RANK_ALLOCATION = ("error", "uniform")


@dataclass
class LoSAConfig:
    """Settings of :func:`run`; every field is checked here (ValueError names it).

    sparsity: the final mean sparsity S in [0, 1). rounds: T >= 1. total_steps: fine-tuning steps
    over all rounds (0 = prune only); final_share: f in (0, 1) gives the last round (the recovery at
    the target sparsity) round(f·total_steps) and the other rounds the rest evenly, None splits them
    evenly (see :func:`salr.losa.schedule.split_steps`; 0.6 beat the even split on SmolLM2-135M at 50 %
    and 70 %, bench/RESULTS.md). mean_rank: R̄, the mean LoRA rank per block (the
    budget is R̄·L); r_max: the largest rank a block may get (>= mean_rank). lora_alpha: the update
    scale is lora_alpha / mean_rank for every layer, fixed when ranks change. beta: importance
    temperature (the LP solution depends only on the order of the importances, so any beta > 0
    gives the same sparsities barring ties). delta: None = :func:`salr.losa.rmi.sparsity_delta`.
    layerwise: "rmi" or "uniform"; rank_allocation: "error" or "uniform"; masked: False trains a
    plain LoRA on the sparse base (the baseline; its update is then masked at the final merge).
    targets: linear names to adapt/prune (None = every linear in the decoder blocks).
    cka_tokens: tokens sampled per window for the CKA Gram matrices. train: the optimizer settings
    of every round (its ``steps`` is replaced by the round's share, its seed by seed + round, and its
    ``warmup_steps``, which counts over the whole run, by the round's proportional share: each round
    starts a fresh optimizer, so each warms up).
    final_merge: merge every layer at the end (False keeps the adapters, e.g. to compare merges).
    """

    sparsity: float
    rounds: int = 5
    total_steps: int = 100
    final_share: float | None = 0.6
    mean_rank: int = 8
    r_max: int = 32
    lora_alpha: float = 16.0
    beta: float = 1.0
    delta: float | None = None
    layerwise: str = "rmi"
    rank_allocation: str = "error"
    masked: bool = True
    targets: tuple[str, ...] | None = None
    cka_tokens: int | None = 256
    max_layer_sparsity: float = 0.99
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-4, steps=1, batch_size=4,
                                                                    max_grad_norm=1.0, progress=False))
    final_merge: bool = True
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"LoSAConfig.{name}: {why} (got {getattr(self, name)!r})")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
            raise bad("sparsity", "the target must be a number in [0, 1)")
        try:
            check_rounds(self.rounds)
        except ValueError as exc:
            raise bad("rounds", str(exc)) from None
        if not is_int(self.total_steps) or self.total_steps < 0:
            raise bad("total_steps", "must be an integer >= 0")
        if 0 < self.total_steps < self.rounds:
            raise bad("total_steps", f"must be 0 or at least rounds ({self.rounds}) so every round trains")
        try:
            check_final_share(self.final_share)
            if self.total_steps:
                split_steps(self.total_steps, self.rounds, self.final_share)
        except ValueError as exc:
            raise bad("final_share", str(exc)) from None
        if not is_int(self.mean_rank) or self.mean_rank < 1:
            raise bad("mean_rank", "must be an integer >= 1")
        if not is_int(self.r_max) or self.r_max < self.mean_rank:
            raise bad("r_max", f"must be an integer >= mean_rank ({self.mean_rank}): the budget mean_rank·L "
                               f"cannot be met otherwise")
        for name in ("lora_alpha", "beta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise bad(name, "must be a finite number > 0")
        if self.delta is not None:
            if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not math.isfinite(self.delta):
                raise bad("delta", "must be None or a finite number")
            if self.delta < 0:
                raise bad("delta", "a negative bound on |x_l - target| makes the layer-wise program infeasible")
        if self.layerwise not in LAYERWISE:
            raise bad("layerwise", f"must be one of {LAYERWISE}")
        if self.rank_allocation not in RANK_ALLOCATION:
            raise bad("rank_allocation", f"must be one of {RANK_ALLOCATION}")
        if not self.masked and self.rank_allocation != "uniform":
            raise bad("rank_allocation", "a plain (masked=False) LoRA cannot shrink its rank without changing "
                                         "its function: use 'uniform'")
        if self.cka_tokens is not None and (not is_int(self.cka_tokens) or self.cka_tokens < 4):
            raise bad("cka_tokens", "must be None or an integer >= 4")
        if not isinstance(self.max_layer_sparsity, (int, float)) or not s < self.max_layer_sparsity <= 1.0:
            raise bad("max_layer_sparsity", f"must be in (sparsity={s}, 1]")
        if not isinstance(self.train, TrainConfig):
            raise bad("train", "must be a salr.training.TrainConfig")
        if self.train.warmup_steps > self.total_steps:
            raise bad("train", f"its warmup_steps ({self.train.warmup_steps}) count over the whole run and "
                               f"must be <= total_steps ({self.total_steps})")
        if self.targets is not None:
            self.targets = tuple(self.targets)
        if not is_int(self.seed) or self.seed < 0:
            raise bad("seed", "must be an integer >= 0")

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.mean_rank

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "train"}
        d["train"] = self.train.to_dict()
        d["targets"] = list(self.targets) if self.targets is not None else None
        return d


@dataclass
class RoundReport:
    round: int
    target: float
    block_sparsity: list[float]
    ranks: list[int]
    errors: list[float]
    importance: list[float] | None
    cka: list[list[float]] | None
    steps: int
    first_loss: float | None
    last_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)  # salr.training.train's, one dict per step


@dataclass
class LoSAReport:
    config: dict[str, Any]
    rounds: list[RoundReport]
    final_sparsity: float
    trainable_parameters: list[int]  # per round, the number of trainable (LoRA) parameters

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "rounds": [dataclasses.asdict(r) for r in self.rounds],
                "final_sparsity": self.final_sparsity, "trainable_parameters": self.trainable_parameters}


# ----------------------------------------------------------------------------- helpers

def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _StopForward(Exception):
    """Raised after the last block in the CKA pass: the final norm and LM head need not run."""


@torch.no_grad()
def block_cka(model: nn.Module, calibration: torch.Tensor, cka_tokens: int | None = 256, seed: int = 0,
              progress: bool = True) -> torch.Tensor:
    """Streaming linear CKA [L, L] between the decoder blocks' input features, one window at a time."""
    check_calibration(calibration, vocab_size(model), name="calibration")
    _, blocks = find_blocks(model)
    device = model_device(model)
    feats: list[torch.Tensor | None] = [None] * len(blocks)

    def pre_hook(index):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            feats[index] = hidden.detach().reshape(-1, hidden.shape[-1])
        return hook

    def stop(_module, _args, _out):
        raise _StopForward

    handles = [b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[-1].register_forward_hook(stop))
    cka = StreamingCKA(len(blocks), cka_tokens, seed)
    was_training = model.training
    model.eval()
    try:
        for i in tqdm(range(calibration.shape[0]), desc="LoSA: block CKA", unit="window", disable=not progress,
                      leave=False):
            with contextlib.suppress(_StopForward):
                model(input_ids=calibration[i:i + 1].to(device), use_cache=False)
            cka.update(feats)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return cka.matrix()


def wanda_keep(weight: torch.Tensor, column_norms: torch.Tensor, sparsity: float,
               current: torch.Tensor | None = None) -> torch.Tensor:
    """Keep-mask pruning round(sparsity·K) entries per output row by |W|·‖X_j‖ (Wanda's rule);
    entries outside ``current`` are pruned first, so the result lies inside it (masks only grow)."""
    if weight.dim() != 2 or column_norms.shape != (weight.shape[1],):
        raise ValueError(f"column_norms: need one norm per column of the [N, K] weight, got {tuple(column_norms.shape)} "
                         f"for {tuple(weight.shape)}")
    scores = weight.detach().float().abs() * column_norms.to(weight.device).float()[None, :]
    if current is not None:
        scores = scores.masked_fill(~current, -1.0)  # below every real score (scores are >= 0)
    k = weight.shape[1]
    drop = min(k, int(math.floor(sparsity * k + 0.5)))  # round half up
    keep = torch.ones_like(weight, dtype=torch.bool)
    if drop > 0:
        keep.scatter_(1, torch.topk(scores, drop, dim=1, largest=False).indices, False)
    if current is not None:
        keep &= current
    return keep


@contextlib.contextmanager
def _dense_swap(model: nn.Module, dense: dict[str, nn.Linear]):
    """Temporarily put the original dense linears back (for the reconstruction error)."""
    saved = {name: model.get_submodule(name) for name in dense}
    try:
        for name, lin in dense.items():
            set_submodule(model, name, lin)
        yield
    finally:
        for name, mod in saved.items():
            set_submodule(model, name, mod)


def _column_sq_hook(store: dict[str, torch.Tensor], name: str, in_features: int):
    def hook(_module, args, _out):
        x = args[0].detach().reshape(-1, in_features).float()
        sq = (x * x).sum(0)
        store[name] = store[name] + sq if name in store else sq
    return hook


def losa_layers(model: nn.Module) -> dict[str, LoSALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoSALinear)}


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- the procedure

def run(model: nn.Module, config: LoSAConfig, calibration: Any, train_data: Any,
        eval_fn: Callable[[nn.Module], Any] | None = None,
        on_round: Callable[[int, nn.Module, RoundReport], None] | None = None) -> LoSAReport:
    """Apply LoSA to a causal LM in place (see the module docstring) and return the per-round report.

    calibration: token ids [n_windows, seq_len] (pruning statistics, CKA, reconstruction errors).
    train_data: what :func:`salr.training.train` accepts (a ``TokenWindows`` continues across rounds).
    eval_fn: passed to ``train`` (called at the end of every round's fine-tuning).
    on_round: ``on_round(t, model, report)`` after every round's fine-tuning (logging, checkpoints).
    The model's targeted ``nn.Linear`` layers become :class:`LoSALinear`; every other parameter is
    frozen. With ``final_merge`` they end merged: plain BM8x8 sparse layers with rank 0.
    """
    if not isinstance(config, LoSAConfig):
        raise ValueError(f"config: expected a LoSAConfig, got {type(config).__name__}")
    ids = check_calibration(calibration, vocab_size(model))
    path, blocks = find_blocks(model)
    per_block = block_linears(model, config.targets)
    if any(not isinstance(lin, (nn.Linear, LoSALinear)) for _, lins in per_block for lin in lins.values()):
        raise ValueError("model: LoSA wraps nn.Linear layers; GPT-2 style Conv1D is not supported")
    model.requires_grad_(False)
    dense = {name: lin for _, lins in per_block for name, lin in lins.items() if isinstance(lin, nn.Linear)}
    if not dense:
        raise ValueError("model: no nn.Linear to adapt (already converted?)")
    gen = torch.Generator().manual_seed(config.seed)
    for name, lin in dense.items():  # 0 % sparse at first; round 1 prunes
        set_submodule(model, name, LoSALinear.from_linear(lin, rank=0, scale=config.scale, masked=config.masked))
    names_by_block = [list(lins) for _, lins in per_block]
    targets = sparsity_schedule(config.sparsity, config.rounds)
    steps = (split_steps(config.total_steps, config.rounds, config.final_share) if config.total_steps
             else [0] * config.rounds)
    reports, trainable = [], []
    num_blocks = len(blocks)
    for t in range(1, config.rounds + 1):
        target = targets[t - 1]
        layers = losa_layers(model)
        current = torch.tensor([_block_sparsity([layers[n] for n in names]) for names in names_by_block],
                               dtype=torch.float64)
        importance = cka = None
        if config.layerwise == "rmi":
            cka = block_cka(model, ids, config.cka_tokens, config.seed + t, config.progress)
            importance = block_importance(cka, config.beta)
            delta = config.delta if config.delta is not None else sparsity_delta(target)
            try:
                ratios = layerwise_sparsity(importance, target, delta, current, config.max_layer_sparsity)
            except ValueError as exc:  # masks only grow and the band cannot hold the mean: stay put
                warnings.warn(f"LoSA round {t}: {exc}; using max(target, current) per block", stacklevel=2)
                ratios = torch.clamp(current, min=target)
        else:
            ratios = torch.clamp(current, min=target)
        errors = _prune_pass(model, ids, names_by_block, dense, ratios.tolist(), config.progress, t)
        if config.rank_allocation == "error":
            ranks = allocate_ranks(errors, config.mean_rank, config.r_max)
        else:
            ranks = [config.mean_rank] * num_blocks
        for names, rank in zip(names_by_block, ranks):
            for name in names:
                layers[name].resize_rank(rank, generator=gen)
        trainable.append(trainable_count(model))
        first = last = None
        history: list[dict[str, Any]] = []
        if steps[t - 1] > 0:
            round_cfg = dataclasses.replace(config.train, steps=steps[t - 1], seed=config.train.seed + t,
                                            warmup_steps=round_warmup(config.train.warmup_steps, steps[t - 1],
                                                                      config.total_steps))
            history = train(model, train_data, round_cfg, run_dir=None, eval_fn=eval_fn, resume=False)
            first, last = history[0]["loss"], history[-1]["loss"]
        layers = losa_layers(model)
        reports.append(RoundReport(
            round=t, target=target,
            block_sparsity=[_block_sparsity([layers[n] for n in names]) for names in names_by_block],
            ranks=list(ranks), errors=list(errors),
            importance=importance.tolist() if importance is not None else None,
            cka=cka.tolist() if cka is not None else None, steps=steps[t - 1], first_loss=first, last_loss=last,
            history=history))
        if on_round is not None:
            on_round(t, model, reports[-1])
    layers = losa_layers(model)
    if config.final_merge:
        for layer in layers.values():
            layer.merge()
    final = _block_sparsity(list(layers.values()))
    return LoSAReport(config.to_dict(), reports, final, trainable)


@torch.no_grad()
def export_salr(model: nn.Module) -> int:
    """Replace every merged (rank-0) :class:`LoSALinear` by an adapter-free ``SALRLinear`` holding the
    same bitmap, values and offsets (no re-encode: bit for bit), so the model goes through
    ``salr.save`` / ``salr.load``, generation and the CLI like any salr model. Returns the count.
    ValueError for a layer that still has an adapter (call ``merge()`` or run with final_merge)."""
    from salr._checks import check_module
    from salr.salr_linear import SALRLinear
    check_module(model)

    layers = losa_layers(model)
    unmerged = [name for name, m in layers.items() if m.rank > 0]
    if unmerged:
        raise ValueError(f"model: {len(unmerged)} LoSALinear layers still have adapters (first: {unmerged[0]}); "
                         f"merge them before exporting")
    for name, m in layers.items():
        out = SALRLinear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.values.dtype,
                         device=m.values.device)
        out.bitmap, out.values, out.offsets = m.bitmap.clone(), m.values.detach().clone(), m.offsets.clone()
        if m.bias is not None:
            out.bias.copy_(m.bias.detach())
        set_submodule(model, name, out)
    return len(layers)


def round_warmup(warmup_steps: int, round_steps: int, total_steps: int) -> int:
    """A round's share of the run's warmup: proportional to its steps, at least 1 when there is any
    warmup, at most the round's steps."""
    if warmup_steps <= 0:
        return 0
    return min(round_steps, max(1, int(math.floor(warmup_steps * round_steps / total_steps + 0.5))))


def _block_sparsity(layers: Sequence[LoSALinear]) -> float:
    total = sum(m.out_features * m.in_features for m in layers)
    return 1.0 - sum(m.nnz for m in layers) / max(1, total)


@torch.no_grad()
def _prune_pass(model: nn.Module, ids: torch.Tensor, names_by_block: list[list[str]], dense: dict[str, nn.Linear],
                ratios: list[float], progress: bool, round_index: int) -> list[float]:
    """Sequential calibration: per block, Wanda-prune its LoSALinears at the block's ratio on the
    merged weight, then measure E_l (dense vs pruned block, same inputs). Returns [E_l]."""
    _, blocks = find_blocks(model)
    was_training = model.training
    model.eval()
    errors = []
    try:
        inps, extras = capture_first_block_inputs(model, ids, progress)
        outs = torch.empty_like(inps)
        bar = tqdm(list(enumerate(names_by_block)), desc=f"LoSA round {round_index}: prune", unit="block",
                   disable=not progress, leave=False)
        for index, names in bar:
            block = blocks[index]
            layers = {n: model.get_submodule(n) for n in names}
            sq: dict[str, torch.Tensor] = {}
            handles = [m.register_forward_hook(_column_sq_hook(sq, n, m.in_features)) for n, m in layers.items()]
            try:
                for i, (args, kwargs) in enumerate(extras):
                    block(inps[i:i + 1], *args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            for name, layer in layers.items():
                keep = wanda_keep(layer.effective_weight(), sq[name].sqrt(), ratios[index], layer.mask())
                layer.apply_mask(keep)
            acc = ErrorAccumulator()
            for i, (args, kwargs) in enumerate(extras):
                outs[i:i + 1] = _block_output(block(inps[i:i + 1], *args, **kwargs))
            with _dense_swap(model, {n: dense[n] for n in names}):
                for i, (args, kwargs) in enumerate(extras):
                    acc.add(_block_output(block(inps[i:i + 1], *args, **kwargs)), outs[i:i + 1])
            errors.append(acc.value())
            inps, outs = outs, inps
    finally:
        model.train(was_training)
    return errors

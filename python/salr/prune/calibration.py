"""Sequential, block-by-block calibration of a causal LM (the scheme of Wanda and SparseGPT).

The calibration windows go through the embedding once; a forward pre-hook on the first decoder
block records that block's inputs (hidden states plus whatever positional arguments the model passes
it: attention mask, position ids, rotary ``position_embeddings``, cache position ...) and stops the
forward with an exception, so neither the other blocks nor the LM head ever run. Then, block by
block:

1. the block runs on its recorded inputs with forward hooks on its linear layers that accumulate
   input statistics (:class:`LinearStats`: per-column sums of squares, optionally ``Σ xᵀx``);
2. a callback prunes / replaces the block's linears using those statistics;
3. the (now modified) block runs again and its outputs become the next block's inputs.

So block l is calibrated on the outputs of the already-pruned blocks 0..l−1, and memory holds one
block boundary's activations (two [n, seq, hidden] buffers), never the whole model's.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from salr.nn.models import block_linears, find_blocks, linear_dims, model_device, vocab_size


def check_calibration(calibration: Any, vocab: int | None, name: str = "calibration") -> torch.Tensor:
    """Validate calibration token ids and return them as an int64 [n, seq_len] tensor.

    Accepts a 2-D integer tensor or a list of equal-length 1-D integer tensors. Raises ValueError
    naming the argument (`name`) for a wrong type, shape, dtype, an empty set or ids outside the vocabulary.
    """
    if isinstance(calibration, (list, tuple)):
        if not calibration or not all(isinstance(t, torch.Tensor) and t.dim() == 1 for t in calibration):
            raise ValueError(f"{name}: a list must hold 1-D token-id tensors (one window each)")
        if len({t.numel() for t in calibration}) != 1:
            raise ValueError(f"{name}: windows must share one length, got lengths "
                             f"{sorted({t.numel() for t in calibration})}")
        calibration = torch.stack(list(calibration))
    if not isinstance(calibration, torch.Tensor):
        raise ValueError(f"{name}: expected token ids as a [n, seq_len] integer tensor, "
                         f"got {type(calibration).__name__}")
    if calibration.dim() != 2:
        raise ValueError(f"{name}: expected shape [n_windows, seq_len], got {tuple(calibration.shape)}")
    if calibration.is_floating_point() or calibration.is_complex() or calibration.dtype == torch.bool:
        raise ValueError(f"{name}: token ids must be integers, got {calibration.dtype}")
    if calibration.shape[0] < 1 or calibration.shape[1] < 1:
        raise ValueError(f"{name}: needs at least one window of at least one token, got "
                         f"shape {tuple(calibration.shape)}")
    lo, hi = int(calibration.min()), int(calibration.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"{name}: token ids must lie in [0, {vocab}) (the model's vocabulary), "
                         f"found ids in [{lo}, {hi}]")
    return calibration.to(torch.long)


@dataclass
class LinearStats:
    """Input statistics of one linear layer over all calibration tokens.

    ``sq_sum[j] = Σ_t x_tj²`` (Wanda's ‖X_j‖₂² and the activation-aware SVD scales) and, when
    asked, ``xtx = Σ_t x_tᵀ x_t`` ([K, K], SparseGPT's Hessian up to the factor 2/tokens).
    """

    in_features: int
    with_hessian: bool = False
    tokens: int = 0
    sq_sum: torch.Tensor | None = None
    xtx: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.in_features).float()
        if self.sq_sum is None:
            self.sq_sum = torch.zeros(self.in_features, dtype=torch.float32, device=x.device)
            if self.with_hessian:
                self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float32, device=x.device)
        self.tokens += x.shape[0]
        self.sq_sum += (x * x).sum(0)
        if self.with_hessian:
            self.xtx.addmm_(x.t(), x)

    def column_norms(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens, per input column (Wanda's activation norm)."""
        return self.sq_sum.sqrt()

    def column_rms(self) -> torch.Tensor:
        """Root-mean-square input per column (scale-free activation magnitudes)."""
        return (self.sq_sum / max(1, self.tokens)).sqrt()

    def hessian(self) -> torch.Tensor:
        """H = (2/tokens)·XᵀX, the Hessian of the layer's squared reconstruction error."""
        if self.xtx is None:
            raise ValueError("LinearStats: the Hessian was not collected (with_hessian=False)")
        if self.tokens < self.in_features:
            # Why: XᵀX then has rank ≤ tokens; damping, not data, fills the other directions and
            # SparseGPT prunes worse than Wanda (the quick demo at 1,024 tokens: 70 vs 51 perplexity).
            warnings.warn(f"SparseGPT: {self.tokens} calibration tokens for {self.in_features} inputs leave the "
                          f"Hessian rank-deficient; calibrate on at least {self.in_features} tokens "
                          f"(--calib-windows) or prune with --criterion wanda", RuntimeWarning, stacklevel=2)
        return self.xtx * (2.0 / max(1, self.tokens))


class _Stop(Exception):
    """Raised by the first block's pre-hook: its inputs are recorded, the rest need not run."""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, str, bool, type(None))) and a == b)


def _clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    # No KV cache: a cache object recorded once and reused by every block would grow and be wrong.
    out = dict(kwargs)
    for key in ("past_key_values", "past_key_value", "layer_past"):
        if key in out:
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@torch.no_grad()
def capture_first_block_inputs(model: nn.Module, calibration: torch.Tensor, progress: bool = True
                               ) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """Run the embedding part of `model` on every window and return the first block's inputs.

    Returns ``(hidden [n, seq, hidden], extras)`` where ``extras[i] = (other positional args,
    keyword args)`` of window i (one shared object when they equal window 0's, which is the usual
    case: same length, no padding).
    """
    _, blocks = find_blocks(model)
    device = model_device(model)
    hidden, extras = [], []
    record: dict[str, Any] = {}

    def pre_hook(_module, args, kwargs):
        if args:
            record["hidden"], record["args"] = args[0], tuple(args[1:])
            record["kwargs"] = dict(kwargs)
        else:
            kw = dict(kwargs)
            record["hidden"], record["args"] = kw.pop("hidden_states"), ()
            record["kwargs"] = kw
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in tqdm(range(calibration.shape[0]), desc="calibration: embedding", unit="window",
                      disable=not progress, leave=False):
            try:
                model(input_ids=calibration[i:i + 1].to(device), use_cache=False)
            except _Stop:
                pass
            else:
                raise RuntimeError("calibration: the first decoder block was never called")
            hidden.append(record["hidden"].detach())
            kwargs = _clean_kwargs(record["kwargs"])
            args = record["args"]
            if extras and _same(args, extras[0][0]) and _same(kwargs, extras[0][1]):
                extras.append(extras[0])
            else:
                extras.append((args, kwargs))
    finally:
        handle.remove()
    return torch.cat(hidden, 0), extras


def block_output(out: Any) -> torch.Tensor:
    """The hidden states of a decoder block's output (HF blocks return a tuple or a tensor)."""
    return out[0] if isinstance(out, (tuple, list)) else out


BlockCallback = Callable[[int, nn.Module, dict[str, nn.Module], dict[str, LinearStats]], None]
# after_block(index, block, inputs [n, seq, hidden], outputs [n, seq, hidden], extras): the block's
# recorded inputs and its outputs after on_block changed it (extras as capture_first_block_inputs).
AfterBlock = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, list[tuple[tuple, dict]]], None]


@torch.no_grad()
def run_sequential(model: nn.Module, calibration: Any, on_block: BlockCallback, *,
                   targets: Sequence[str] | None = None, hessian: bool = False, progress: bool = True,
                   desc: str = "calibrate + prune", layers: Sequence[tuple[int, dict[str, nn.Module]]] | None = None,
                   after_block: AfterBlock | None = None) -> None:
    """Calibrate `model` block by block and let `on_block` modify each block in turn.

    ``on_block(index, block, linears, stats)`` gets the block's target linears (qualified name ->
    module) and their :class:`LinearStats`, collected on the outputs of the blocks already
    processed. It may replace the linears (e.g. with ``SALRLinear``); the block is then re-run to
    feed the next one. `hessian` also accumulates ``XᵀX`` (SparseGPT). `layers`: the per-block
    (index, {name: module}) to collect statistics for, instead of the linears `targets` selects
    (e.g. LoSA's own layer type). `after_block` sees each block's inputs and new outputs (LoSA
    measures its reconstruction error there).
    """
    ids = check_calibration(calibration, vocab_size(model))
    _, blocks = find_blocks(model)
    per_block = layers if layers is not None else block_linears(model, tuple(targets) if targets is not None else None)
    was_training = model.training
    model.eval()
    try:
        inps, extras = capture_first_block_inputs(model, ids, progress)
        outs = torch.empty_like(inps)
        bar = tqdm(per_block, desc=desc, unit="block", disable=not progress)
        for index, linears in bar:
            block = blocks[index]
            stats = {name: LinearStats(linear_dims(lin)[1], hessian) for name, lin in linears.items()}
            handles = [lin.register_forward_hook(_stats_hook(stats[name])) for name, lin in linears.items()]
            try:
                for i, (args, kwargs) in enumerate(extras if linears else ()):  # no targets: no stats pass
                    block(inps[i:i + 1], *args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
            on_block(index, block, linears, stats)
            del stats
            for i, (args, kwargs) in enumerate(extras):
                outs[i:i + 1] = block_output(block(inps[i:i + 1], *args, **kwargs))
            if after_block is not None:
                after_block(index, block, inps, outs, extras)
            inps, outs = outs, inps
    finally:
        model.train(was_training)


def _stats_hook(stats: LinearStats):
    def hook(_module, args, _output):
        stats.add(args[0])
    return hook

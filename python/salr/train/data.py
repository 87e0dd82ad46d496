"""Training data sources: deterministic, resumable global micro-batches for :func:`salr.train.train`.

A source has ``take(rows)`` (the next global micro-batch), ``state_dict()`` and ``load_state_dict()``;
its state goes into every checkpoint, so a resumed run reads exactly the batches the uninterrupted
run would have read. Every DDP rank builds the same source and keeps only its slice of each batch
(:func:`shard_batch`), so the data position is the same on every rank.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from salr._checks import check_int


class TokenWindows:
    """Deterministic, resumable [rows, seq_len] token windows cut from one 1-D token tensor.

    Each epoch uses non-overlapping windows starting at a seeded offset, visited in a seeded
    permutation; epochs follow each other seamlessly. The only state is how many windows have been
    handed out, so ``state_dict()`` / ``load_state_dict()`` make the stream resumable and the same
    seed gives the same stream in every process (each DDP rank slices the same global batch).
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, seed: int = 0, shuffle: bool = True) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.is_floating_point():
            raise ValueError("TokenWindows: tokens must be a 1-D integer tensor")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"TokenWindows: seq_len must be an integer >= 2 (got {seq_len!r})")
        if tokens.numel() < seq_len:
            raise ValueError(f"TokenWindows: the text has {tokens.numel()} tokens, fewer than one window "
                             f"of seq_len={seq_len}")
        self.tokens = tokens.to(torch.long).contiguous()
        self.seq_len = seq_len
        self.seed = int(seed)
        self.shuffle = shuffle
        self.windows_per_epoch = self.tokens.numel() // seq_len
        self.consumed = 0
        self._epoch_cache: tuple[int, int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.windows_per_epoch

    def _epoch_plan(self, epoch: int) -> tuple[int, torch.Tensor]:
        """(start offset, window order) of one epoch, a pure function of (seed, epoch)."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            slack = self.tokens.numel() - self.windows_per_epoch * self.seq_len
            offset = int(torch.randint(0, slack + 1, (1,), generator=gen)) if self.shuffle else 0
            order = (torch.randperm(self.windows_per_epoch, generator=gen) if self.shuffle
                     else torch.arange(self.windows_per_epoch))
            self._epoch_cache = (epoch, offset, order)
        return self._epoch_cache[1], self._epoch_cache[2]

    def take(self, rows: int) -> torch.Tensor:
        """The next ``rows`` windows as a [rows, seq_len] int64 tensor."""
        check_int(rows, "rows")
        out = torch.empty(rows, self.seq_len, dtype=torch.long)
        for r in range(rows):
            epoch, index = divmod(self.consumed, self.windows_per_epoch)
            offset, order = self._epoch_plan(epoch)
            start = offset + int(order[index]) * self.seq_len
            out[r] = self.tokens[start:start + self.seq_len]
            self.consumed += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "TokenWindows", "consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len,
                "num_tokens": self.tokens.numel(), "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("consumed"), int) or state["consumed"] < 0:
            raise ValueError(f"state: expected a TokenWindows.state_dict() with 'consumed' >= 0, got {state!r}")
        mine = self.state_dict()
        for key in ("seed", "seq_len", "num_tokens", "shuffle"):
            if state.get(key) != mine[key]:
                raise ValueError(f"TokenWindows: the checkpoint's data has {key}={state.get(key)!r}, this "
                                 f"one {mine[key]!r}: resuming would not continue the same stream")
        self.consumed = int(state["consumed"])


class IterableBatches:
    """Adapts any iterable of batches (tensors or dicts) to the source protocol.

    Each item is one global micro-batch. Resuming skips the items already consumed, which is exact
    when the iterable yields the same sequence each time it is created.
    """

    def __init__(self, iterable: Iterable[Any]) -> None:
        if not isinstance(iterable, Iterable):
            raise ValueError(f"iterable: expected an iterable of batches, got {type(iterable).__name__}")
        self.iterable = iterable
        self.consumed = 0
        self._iterator = iter(iterable)

    def take(self, rows: int) -> Any:  # rows is the iterable's business
        try:
            item = next(self._iterator)
        except StopIteration:
            self._iterator = iter(self.iterable)  # a re-iterable (list, Dataset) starts a new epoch
            try:
                item = next(self._iterator)
            except StopIteration:
                raise ValueError(f"train_batches ran out after {self.consumed} batches") from None
        self.consumed += 1
        return item

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "iterable", "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("consumed"), int) or state["consumed"] < 0:
            raise ValueError(f"state: expected an IterableBatches.state_dict() with 'consumed' >= 0, got {state!r}")
        self._iterator = iter(self.iterable)
        self.consumed = 0
        for _ in range(int(state["consumed"])):
            self.take(0)


def as_source(train_batches: Any) -> Any:
    if hasattr(train_batches, "take") and hasattr(train_batches, "state_dict"):
        return train_batches
    if isinstance(train_batches, torch.Tensor):
        raise ValueError("train_batches: wrap a 1-D token tensor in TokenWindows(tokens, seq_len, seed)")
    if isinstance(train_batches, Iterable):
        return IterableBatches(train_batches)
    raise ValueError("train_batches must be a TokenWindows-like source (take/state_dict/load_state_dict) "
                     "or an iterable of batches")


def shard_batch(batch: Any, rank: int, world: int, device: torch.device) -> tuple[dict[str, Any], int]:
    """This rank's slice of a global micro-batch as model kwargs, and the tokens in that slice."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch, "labels": batch}
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise ValueError("a batch must be a [batch, seq] token tensor or a dict with 'input_ids'")
    rows = batch["input_ids"].shape[0]
    if rows % world:
        raise ValueError(f"batch_size: a micro-batch of {rows} rows does not split over {world} ranks")
    lo, hi = rows // world * rank, rows // world * (rank + 1)
    kwargs = {k: (v[lo:hi].to(device, non_blocking=True)
                  if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v)
              for k, v in batch.items()}
    mask = kwargs.get("attention_mask")
    tokens = int(mask.sum()) if isinstance(mask, torch.Tensor) else kwargs["input_ids"].numel()
    return kwargs, tokens

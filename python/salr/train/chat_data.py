"""Instruction / chat data: jsonl in the layouts TRL uses, rendered with the tokenizer's chat template,
trained and evaluated on the completion (assistant) tokens only.

Records are ``{"prompt": str, "completion": str}`` (the prompt becomes the user turn, the completion
the assistant turn) or ``{"messages": [{"role", "content"}, ...]}`` (taken as given; every assistant
turn is a completion). :func:`read_chat_jsonl` validates them, :func:`tokenize_conversation` renders
one with the chat template and marks the completion tokens, and :class:`ChatExamples` is the batch
source beside :class:`salr.train.data.TokenWindows`: each row is one conversation, truncated or
right-padded to the window length, with ``labels`` = -100 everywhere but on completion tokens.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from salr._checks import check_int

IGNORE_INDEX = -100  # the label Hugging Face causal LMs (and F.cross_entropy's default) skip
CHAT_KEYS = ("prompt", "messages")


def is_chat_jsonl(path: str | os.PathLike) -> bool:
    """True for a .jsonl file whose first record is in a chat layout ("prompt" or "messages" key)."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"is_chat_jsonl: path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    return False  # the plain-text reader reports the bad line
                return isinstance(record, dict) and any(k in record for k in CHAT_KEYS)
    return False


def _record_error(path: Path, line_no: int, key: str, problem: str) -> ValueError:
    return ValueError(f"read_chat_jsonl: {path}:{line_no}: key {key!r}: {problem}")


def _conversation(record: Any, path: Path, line_no: int) -> list[dict[str, str]]:
    """The record as a list of {"role", "content"} messages with at least one non-empty assistant turn."""
    if not isinstance(record, dict):
        raise _record_error(path, line_no, "prompt", "the line is not a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise _record_error(path, line_no, "messages", "expected a non-empty list of {role, content}")
        for i, message in enumerate(messages):
            for key in ("role", "content"):
                if not isinstance(message, dict) or not isinstance(message.get(key), str):
                    raise _record_error(path, line_no, f"messages[{i}].{key}", "missing or not a string")
        assistant = [m for m in messages if m["role"] == "assistant"]
        if not assistant:
            raise _record_error(path, line_no, "messages", "no assistant turn (nothing to train on)")
        if any(not m["content"].strip() for m in assistant):
            raise _record_error(path, line_no, "messages", "an assistant turn has empty content")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    for key in ("prompt", "completion"):
        if not isinstance(record.get(key), str):
            raise _record_error(path, line_no, key, "missing or not a string (expected {prompt, completion} "
                                                    "or {messages})")
    if not record["completion"].strip():
        raise _record_error(path, line_no, "completion", "empty completion")
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def read_chat_jsonl(path: str | os.PathLike) -> list[list[dict[str, str]]]:
    """The conversations of a chat jsonl file, in file order; a bad record raises ValueError naming
    the file, the line and the key."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"read_chat_jsonl: path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"read_chat_jsonl: path {str(path)!r} is not a readable file")
    conversations = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"read_chat_jsonl: {path}:{line_no}: not valid JSON ({exc})") from None
            conversations.append(_conversation(record, path, line_no))
    if not conversations:
        raise ValueError(f"read_chat_jsonl: {path} holds no records")
    return conversations


@dataclass
class TokenizedConversation:
    """One rendered conversation: its token ids and which of them are completion (assistant) tokens."""

    ids: torch.Tensor  # [n] int64
    completion: torch.Tensor  # [n] bool

    def __post_init__(self) -> None:
        if not isinstance(self.ids, torch.Tensor) or self.ids.dim() != 1 or self.ids.dtype != torch.long:
            raise ValueError("TokenizedConversation: ids must be a 1-D int64 tensor")
        if (not isinstance(self.completion, torch.Tensor) or self.completion.dtype != torch.bool
                or self.completion.shape != self.ids.shape):
            raise ValueError("TokenizedConversation: completion must be a bool tensor shaped like ids")


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> TokenizedConversation:
    """Renders `messages` with the tokenizer's chat template; the tokens of each assistant turn (what the
    template adds after the generation prompt, end-of-turn marker included) are the completion.

    The template is rendered turn by turn (each assistant turn after the conversation before it with
    the generation prompt), and each new piece is tokenized on its own: the ids are exactly what the
    rendered pieces tokenize to, and the completion mask is exact by construction."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in messages):
        raise ValueError("tokenize_conversation: messages must be a list of {'role': str, 'content': str}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("tokenize_conversation: tokenizer has no chat_template; chat / instruction data needs "
                         "one (an instruct model's tokenizer)")
    pieces: list[tuple[str, bool]] = []
    rendered = ""

    def extend(text: str, completion: bool) -> None:
        nonlocal rendered
        if not text.startswith(rendered):
            raise ValueError("tokenize_conversation: tokenizer's chat template does not render a conversation as "
                             "its earlier turns followed by the new one (the completion tokens cannot be told apart)")
        pieces.append((text[len(rendered):], completion))
        rendered = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            extend(_render(tokenizer, messages[:i], True), False)
            extend(_render(tokenizer, messages[:i + 1], False), True)
    extend(_render(tokenizer, messages, False), False)  # turns after the last assistant one
    ids: list[int] = []
    mask: list[bool] = []
    for text, completion in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        mask += [completion] * len(piece)
    return TokenizedConversation(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool))


def tokenize_conversations(tokenizer: Any, conversations: list[list[dict[str, str]]]) -> list[TokenizedConversation]:
    """:func:`tokenize_conversation` of each conversation."""
    if not isinstance(conversations, list):
        raise ValueError(f"tokenize_conversations: conversations must be a list, got {type(conversations).__name__}")
    return [tokenize_conversation(tokenizer, messages) for messages in conversations]


def conversation_stream(examples: list[TokenizedConversation]) -> torch.Tensor:
    """All conversations' ids end to end (1-D): token windows for calibration."""
    if not isinstance(examples, list) or not examples or not all(isinstance(e, TokenizedConversation)
                                                                 for e in examples):
        raise ValueError("conversation_stream: examples must be a non-empty list of TokenizedConversation")
    return torch.cat([e.ids for e in examples])


class ChatExamples:
    """Deterministic, resumable batches of whole conversations, one per row, for :func:`salr.train.train`.

    ``take(rows)`` returns {"input_ids", "labels", "attention_mask"} of shape [rows, seq_len]: each
    conversation truncated to seq_len (its end cut) or right-padded (pad id, mask 0, label -100), and
    labels = the ids on completion tokens, -100 elsewhere (the model shifts them itself). A
    conversation whose completion starts beyond seq_len has nothing to train on and is dropped with
    a warning. Epochs visit the conversations in a seeded permutation; the state is how many were
    handed out, as in :class:`salr.train.data.TokenWindows`.
    """

    def __init__(self, examples: list[TokenizedConversation], seq_len: int, seed: int = 0, shuffle: bool = True,
                 pad_id: int = 0) -> None:
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"ChatExamples: seq_len must be an integer >= 2 (got {seq_len!r})")
        if not isinstance(examples, list) or not all(isinstance(e, TokenizedConversation) for e in examples):
            raise ValueError("ChatExamples: examples must be a list of TokenizedConversation")
        # Position 0 is never predicted, so a completion token must sit at 1..seq_len-1.
        kept = [e for e in examples if bool(e.completion[1:seq_len].any())]
        if len(kept) < len(examples):
            warnings.warn(f"ChatExamples: {len(examples) - len(kept)} of {len(examples)} conversations have no "
                          f"completion token within seq_len={seq_len}; dropped", stacklevel=2)
        if not kept:
            raise ValueError(f"ChatExamples: no conversation has a completion token within seq_len={seq_len}")
        self.examples = kept
        self.seq_len = seq_len
        self.seed = int(seed)
        self.shuffle = shuffle
        self.pad_id = int(pad_id)
        self.consumed = 0
        self._epoch_cache: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def _order(self, epoch: int) -> torch.Tensor:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.examples), generator=gen) if self.shuffle else torch.arange(len(self))
            self._epoch_cache = (epoch, order)
        return self._epoch_cache[1]

    def take(self, rows: int) -> dict[str, torch.Tensor]:
        """The next ``rows`` conversations as padded [rows, seq_len] input_ids / labels / attention_mask."""
        check_int(rows, "rows")
        input_ids = torch.full((rows, self.seq_len), self.pad_id, dtype=torch.long)
        labels = torch.full((rows, self.seq_len), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros(rows, self.seq_len, dtype=torch.long)
        for r in range(rows):
            epoch, index = divmod(self.consumed, len(self.examples))
            example = self.examples[int(self._order(epoch)[index])]
            n = min(example.ids.numel(), self.seq_len)
            input_ids[r, :n] = example.ids[:n]
            labels[r, :n] = torch.where(example.completion[:n], example.ids[:n], IGNORE_INDEX)
            attention_mask[r, :n] = 1
            self.consumed += 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "ChatExamples", "consumed": self.consumed, "seed": self.seed, "seq_len": self.seq_len,
                "num_examples": len(self.examples), "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("consumed"), int) or state["consumed"] < 0:
            raise ValueError(f"state: expected a ChatExamples.state_dict() with 'consumed' >= 0, got {state!r}")
        mine = self.state_dict()
        for key in ("kind", "seed", "seq_len", "num_examples", "shuffle"):
            if state.get(key) != mine[key]:
                raise ValueError(f"ChatExamples: the checkpoint's data has {key}={state.get(key)!r}, this one "
                                 f"{mine[key]!r}: resuming would not continue the same stream")
        self.consumed = int(state["consumed"])

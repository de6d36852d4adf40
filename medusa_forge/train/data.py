"""Training data: JSONL records -> token examples, a held-out split, and padded batches.

One record per line, one of:
  ``{"text": ...}``                       loss on every token (long texts are cut into windows)
  ``{"prompt": ..., "completion": ...}``  loss on the completion only
  ``{"messages": [{"role", "content"}...]}`` rendered with the tokenizer's chat template; loss on
                                          the last (assistant) message only
An :class:`Example` is token ids plus ``prompt_len``: positions before it are context, not targets,
as FasterDecoding's trainer masks the user turns (``IGNORE_TOKEN_ID``) and trains on the rest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from medusa_forge.errors import ForgeError
from medusa_forge.jsonl import read_jsonl
from medusa_forge.model.tokenizer import Tokenizer

IGNORE_INDEX = -100  # transformers' LabelSmoother.ignore_index, FasterDecoding's IGNORE_TOKEN_ID
MIN_TOKENS = 3  # the first Medusa head needs a token two places ahead


@dataclass(frozen=True)
class Example:
    ids: Tensor  # int32 [T]
    prompt_len: int  # targets are ids[prompt_len:]

    @property
    def num_targets(self) -> int:
        """Targets of the first Medusa head (token t+2 for t >= 0)."""
        return max(0, len(self.ids) - max(2, self.prompt_len))


def make_example(ids: list[int], prompt_len: int) -> Example:
    return Example(torch.tensor(ids, dtype=torch.int32), prompt_len)


def encode_plain(tok: Tokenizer, text: str) -> list[int]:
    """Token ids without BOS (a continuation, or text whose template already carries BOS)."""
    return list(tok.hf(text, add_special_tokens=False).input_ids)


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for n, obj in read_jsonl(path, "data file"):
        if not isinstance(obj, dict):
            raise ForgeError(f"{path}:{n}: expected a JSON object with text, prompt/completion or messages")
        rows.append((n, obj))
    return rows


def _chat_split(tok: Tokenizer, messages: list, where: str) -> tuple[str, str]:
    """(prompt text with the generation prompt, assistant completion text) from a chat."""
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise ForgeError(f"{where}: messages must be a non-empty list of {{role, content}} strings")
    full = tok.apply_chat_template(messages)  # raises when the tokenizer has no chat template
    if messages[-1]["role"] != "assistant":
        return "", full
    prompt = tok.hf.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        return "", full
    return prompt, full[len(prompt) :]


def _windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def record_examples(obj: dict, tok: Tokenizer, max_seq_len: int, where: str) -> list[Example]:
    """The examples of one record (none when it has no usable text)."""
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise ForgeError(f"{where}: field text must be a string")
        return (
            [make_example(w, 0) for w in _windows(tok.encode(obj["text"]), max_seq_len)] if obj["text"].strip() else []
        )
    if "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            raise ForgeError(f"{where}: fields prompt and completion must be strings")
        if not obj["completion"].strip():
            return []
        p, c = tok.encode(obj["prompt"]), encode_plain(tok, obj["completion"])
        return [make_example((p + c)[:max_seq_len], len(p))]
    if "messages" in obj:
        prompt, completion = _chat_split(tok, obj["messages"], where)
        p = encode_plain(tok, prompt) if prompt else []
        return [make_example((p + encode_plain(tok, completion))[:max_seq_len], len(p))]
    raise ForgeError(f"{where}: no usable field; each line needs text, prompt+completion, or messages")


def load_examples(path: str | Path, tok: Tokenizer, max_seq_len: int) -> list[Example]:
    """All examples of a JSONL file; ForgeError when none has a token to learn from."""
    path = Path(path)
    rows = _read_jsonl(path)
    examples = [ex for n, obj in rows for ex in record_examples(obj, tok, max_seq_len, f"{path}:{n}")]
    examples = [ex for ex in examples if ex.num_targets > 0]
    if not examples:
        raise ForgeError(
            f"{path}: no usable text ({len(rows)} records, none with at least {MIN_TOKENS} "
            f"target tokens within --max-seq-len {max_seq_len})"
        )
    return examples


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic held-out split; at least one example on each side when there are two or more."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = (
        0
        if val_fraction <= 0 or len(examples) < 2
        else min(len(examples) - 1, max(1, round(val_fraction * len(examples))))
    )
    val = [examples[i] for i in sorted(order[:n_val])]
    train = [examples[i] for i in sorted(order[n_val:])]
    return train, val


def collate(batch: list[Example], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded tokens [B, T] and labels [B, T] (IGNORE_INDEX on context and padding)."""
    T = max(len(ex.ids) for ex in batch)
    tokens = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    for b, ex in enumerate(batch):
        n = len(ex.ids)
        tokens[b, :n] = ex.ids
        labels[b, ex.prompt_len : n] = ex.ids[ex.prompt_len :]
    return tokens, labels


def examples_to_tensors(examples: list[Example]) -> dict[str, Tensor]:
    """Pack examples into three flat tensors (for the resumable checkpoint)."""
    return {
        "ids": torch.cat([ex.ids for ex in examples]) if examples else torch.zeros(0, dtype=torch.int32),
        "lengths": torch.tensor([len(ex.ids) for ex in examples], dtype=torch.long),
        "prompt_lens": torch.tensor([ex.prompt_len for ex in examples], dtype=torch.long),
    }


def examples_from_tensors(d: dict[str, Tensor]) -> list[Example]:
    chunks = torch.split(d["ids"], d["lengths"].tolist()) if len(d["lengths"]) else []
    return [Example(c.clone(), int(p)) for c, p in zip(chunks, d["prompt_lens"].tolist())]


def count_targets(examples: list[Example]) -> int:
    return sum(ex.num_targets for ex in examples)

"""Logits processing and returned logits for one request in a shared batch.

A request with TensorRT-LLM options (penalties, bias, bad words, min_length) or asking for log
probs / logits gets a :class:`RowLogits`: every row whose token the batcher picks for it (the
prefill's last row, a plain row, every node of its tree) goes through
:func:`~medusa_forge.engine.logits_processing.process` with that row's own history, as the serial
engine's eager loop (``processed_steps``) does, so a greedy request emits the same tokens and log
probs batched or alone. Only these requests' rows are read back and processed; the others keep
the vectorised path.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from medusa_forge.engine.generation import GenerationConfig, GenerationResult
from medusa_forge.engine.logits_processing import (
    process,
    token_log_probs,
)
from medusa_forge.engine.processed_steps import Recorded, resolve_settings


class RowLogits:
    """One request's processing: ``emitted()`` gives the tokens emitted so far (pending root included)."""

    def __init__(self, engine, prompt: list[int], gcfg: GenerationConfig, emitted):
        self.settings = resolve_settings(engine, gcfg)
        self.prompt, self.gcfg, self.emitted = prompt, gcfg, emitted
        self.record = Recorded()
        self.context: list[np.ndarray] = []  # the prompt's logits, chunk by chunk

    def plain(self, raw: Tensor) -> Tensor:
        """Processed row [1, V] of the request's next token."""
        return process(raw, [self.emitted()], self.prompt, self.settings)

    def tree(self, raw: Tensor, node_tokens: list[int], paths: list[list[int]]) -> Tensor:
        """Processed rows [N, V] of a tree: node i follows the emitted tokens and its own path."""
        out = self.emitted()
        return process(raw, [out + [node_tokens[m] for m in path] for path in paths], self.prompt, self.settings)

    def keep(self, raw: Tensor, processed: Tensor, chosen: list[int]) -> None:
        """The rows the emitted tokens ``chosen`` were picked from."""
        if self.gcfg.return_log_probs:
            picks = torch.tensor(chosen, device=processed.device)
            self.record.log_probs.extend(token_log_probs(processed, picks).tolist())
        if self.gcfg.return_generation_logits:
            self.record.generation_logits.append(raw.float().cpu())

    def keep_context(self, raw: Tensor) -> None:
        if self.gcfg.return_context_logits:
            self.context.append(raw.float().cpu().numpy())

    def attach(self, result: GenerationResult) -> None:
        if self.context:
            self.record.context_logits = np.concatenate(self.context)
        self.record.attach(result, self.gcfg)


def node_paths(ancestors: Tensor) -> list[list[int]]:
    """Each tree node's path below the root (ancestors, root left out, itself included)."""
    return [[a for a in row[1:] if a >= 0] for row in ancestors.tolist()]

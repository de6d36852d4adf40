"""The engine's captured work: a prefill graph per power-of-two bucket of prompt lengths, and a
step function per decoding mode (replayed from its CUDA graph when there is one)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

PREFILL_MIN_BUCKET = 16  # prompts are padded to a power of two >= this on CUDA (one graph per bucket)


@dataclass
class PrefillGraph:
    """A captured prefill of ``tokens.shape[1]`` tokens; ``slots`` and ``zero`` are inputs it reads
    too: a graph holds no Python references, so they must live as long as it does (or their memory
    is reused by the next capture while the graph still reads it)."""

    graph: torch.cuda.CUDAGraph
    tokens: Tensor
    length: Tensor
    slots: Tensor
    zero: Tensor


@dataclass
class StepGraph:
    """A step function and, on CUDA, its captured graph."""

    fn: Callable[[], None]
    graph: torch.cuda.CUDAGraph | None = None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


def prefill_bucket(T: int, max_seq_len: int) -> int:
    """The padded prefill length of a T-token prompt: a power of two >= 16, at most the cache."""
    return min(max(PREFILL_MIN_BUCKET, 1 << (T - 1).bit_length()), max_seq_len)

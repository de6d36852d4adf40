"""StepMeta: everything a forward needs to know about where its tokens sit, in one object.

The engine builds one per step shape and hands it down ``Transformer.forward(tokens, meta)`` ->
``Block.forward(x, meta, delta)`` -> ``Attention.forward(x, meta)`` (gpt-fast passes its RoPE table
and mask the same way), instead of threading positions, slots, masks and the tree positionally.

Two layouts of the new tokens:
- one sequence (or a right-padded batch sharing positions): ``positions`` and ``slots`` [T], and
  either ``mask`` [B|1, 1, T, S] or ``prefix_len`` (+ ``tree_mask`` / ``tree_ancestors``);
- packed rows of several sequences (in-flight batching): tokens [1, R]; ``positions``, ``slots``
  and ``batch_index`` [R] per row; ``segments`` say which rows belong to which cache row and what
  they see; ``kv`` is the batch's own cache; ``gemm_rows`` runs every GEMM in row chunks whose
  sizes the library treats alike, so a row's bits do not depend on how many rows share the step
  (see docs/batching.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class RowChunks:
    """GEMMs in chunks of at most ``most`` rows, a short last chunk zero padded to ``least`` rows.

    For a BLAS that gives a row the same bits at every M in [least, most] (checked for the model's
    linears by tests/test_batcher_identity.py), a row's bits then depend on the row alone."""

    most: int
    least: int
    gemm: Callable[[nn.Module, Tensor], Tensor] | None = None  # runs one chunk; None: the module itself


@dataclass(frozen=True)
class Segment:
    """One sequence's consecutive rows [start, stop) in a packed step.

    It writes cache row ``row`` at slots prefix_len..prefix_len+T-1 and sees the slots below
    prefix_len plus the new ones ``tree_mask`` allows (causal when None). ``mask`` [1, 1, G*T,
    prefix_len + T] is that visibility for the reference attention, repeated for the G query heads
    of a KV head (GQA) as ``kernels.masked_attention`` repeats it, built once per step;
    ``prefix`` the same length as a 0-d device tensor for the CUDA kernel."""

    row: int
    start: int
    stop: int
    prefix_len: int
    mask: Tensor | None = None
    prefix: Tensor | None = None
    tree_mask: Tensor | None = None
    tree_ancestors: Tensor | None = None


@dataclass(frozen=True)
class StepMeta:
    """Where one forward's new tokens go and what each of them sees (see the module docstring).

    positions: RoPE positions; slots: cache slots their K/V are written to; mask: bool, True where
    a token may attend; prefix_len: batch-1 callers whose tokens sit at slots prefix_len.. (0-d
    device tensor, or an int outside CUDA graphs) let CUDA run the mask-free cache attention
    kernel; tree_mask [T, T]: which new tokens each new token sees (causal when None);
    tree_ancestors: TreeBuffers.ancestors, sparing the kernel deriving them; rope: the [2, S, D]
    cos/sin tables in the activations' dtype (the model binds its own)."""

    positions: Tensor
    slots: Tensor
    mask: Tensor | None = None
    prefix_len: Tensor | None = None
    tree_mask: Tensor | None = None
    tree_ancestors: Tensor | None = None
    rope: Tensor | None = None
    batch_index: Tensor | None = None
    segments: tuple[Segment, ...] = ()
    kv: Tensor | None = None
    gemm_rows: RowChunks | None = None

    def __post_init__(self):
        if self.prefix_len is not None and not isinstance(self.prefix_len, Tensor):
            object.__setattr__(self, "prefix_len", torch.tensor(self.prefix_len, device=self.positions.device))

    @classmethod
    def causal(cls, length: int, max_seq_len: int, device, start: int = 0, **kw) -> StepMeta:
        """``length`` tokens at positions and slots start.., each seeing everything before it."""
        pos = torch.arange(start, start + length, device=device)
        return cls(pos, pos, causal_mask(start, length, max_seq_len, device), **kw)

    @property
    def packed(self) -> bool:
        return bool(self.segments)

    def bind(self, rope: Tensor) -> StepMeta:
        return self if self.rope is rope else replace(self, rope=rope)


def causal_mask(start: int | Tensor, length: int, max_seq_len: int, device) -> Tensor:
    """Mask for ``length`` new tokens at slots start.. that see everything before them and themselves."""
    rows = torch.arange(length, device=device)[:, None] + start
    cols = torch.arange(max_seq_len, device=device)[None, :]
    return (cols <= rows)[None, None]

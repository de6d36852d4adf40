"""What cache attention is launched with: its tile sizes per model shape, and the ancestor tables that
tell each new row which new rows it may see (a tree's, or plain causal decoding's)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes of :func:`cache_attention`; fixed per process, never chosen from T (invariance).

    split: KV slots per split program (the flash-decoding split, aligned to slot 0); block_m:
    query rows (token x GQA head) per program; block_n: keys per inner step; max_scratch_bytes
    bounds the fp32 partials, so a long prefill runs in token chunks (a row never sees the chunking);
    combine_rows: query rows per program of the combine (a power of two).
    """

    split: int = 128
    block_m: int = 16  # >= the GQA group; a tail program holds one token's group, so small is cheap
    block_n: int = 64
    num_warps: int = 4
    max_scratch_bytes: int = 64 << 20
    combine_rows: int = 1
    early_v: bool = False  # the split kernel's EARLY_V (V loaded beside K; see its docstring)


DEFAULT_ATTENTION = AttentionConfig()


# Tile choices by (GQA group, head_dim): a shape property, so every step of one model uses the same
# (see AttentionConfig). Measured on an H200 (bench/results/2026-12-02-h200-c/): at the Llama-3-8B
# shape a combine program per token (4 rows) took a 64-node tree step's 32 combines from 259 us to
# 110 us (the plain step's from 76 to 88); pycoder-26m's combines were faster one row per program
# (9.4 vs 12.3 us plain). Split and block_m choices were within 5% of these defaults at both shapes
# (``python -m medusa_forge.bench.kernels_check --sweep``).
ATTENTION_BY_SHAPE: dict[tuple[int, int], AttentionConfig] = {(4, 128): AttentionConfig(combine_rows=4)}


def attention_config(group: int, head_dim: int) -> AttentionConfig:
    """The tile sizes cache attention uses for a model whose GQA group and head_dim are these."""
    return ATTENTION_BY_SHAPE.get((group, head_dim), DEFAULT_ATTENTION)


def ancestor_table(tree_mask: Tensor) -> Tensor:
    """[T, T] int32: row i lists node i's ancestors and itself in increasing node (= depth) order,
    then -1. Node indices grow with depth along every path (trees are sorted by path length)."""
    T = tree_mask.shape[0]
    idx = torch.arange(T, device=tree_mask.device, dtype=torch.int32)
    order = torch.where(tree_mask, idx, T).sort(dim=1).values
    return torch.where(order < T, order, -1).to(torch.int32).contiguous()


_CAUSAL_ANCESTORS: dict[tuple[int, str], Tensor] = {}


def causal_ancestors(T: int, device: torch.device) -> Tensor:
    """The ancestor table of T causal tokens (row i: 0..i, then -1), made once per (T, device).

    Plain decoding (T=1) passes this where a tree step passes its tree's table, so both launch the
    same compiled attention kernel. Made on first use, i.e. in a CUDA graph's warm-up, not its capture."""
    key = (T, str(device))
    if key not in _CAUSAL_ANCESTORS:
        idx = torch.arange(T, device=device, dtype=torch.int32)
        _CAUSAL_ANCESTORS[key] = torch.where(idx[None, :] <= idx[:, None], idx[None, :], -1).to(torch.int32)
    return _CAUSAL_ANCESTORS[key]

"""The decoder's full causal forward over whole sequences (training, calibration, tree search).

It runs through the static KV cache, sized here for the batch: a full causal forward over slots
0..T-1 is exactly a cache-free forward, so no second attention path exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from medusa_forge.errors import ForgeError
from medusa_forge.model.llama import Transformer
from medusa_forge.model.step_meta import StepMeta


def ensure_caches(model: Transformer, batch: int, length: int) -> None:
    """Give the model a KV cache of exactly ``batch`` rows and at least ``length`` slots."""
    if length > model.config.max_position_embeddings:
        raise ForgeError(
            f"sequence of {length} tokens exceeds the model's max_position_embeddings "
            f"({model.config.max_position_embeddings})"
        )
    cache = model.layers[0].attn.kv_cache
    if cache is None or cache.k.shape[0] != batch or model.max_seq_len < length:
        model.setup_caches(batch, -(-length // 64) * 64 if length > 64 else length)
        if model.max_seq_len < length:  # rounding hit max_position_embeddings
            model.setup_caches(batch, length)


@torch.no_grad()
def hidden_states(model: Transformer, tokens: Tensor) -> Tensor:
    """Last (final-norm) hidden states [B, T, H] of right-padded ``tokens`` [B, T] (causal, no grad)."""
    B, T = tokens.shape
    ensure_caches(model, B, T)
    return model(tokens, StepMeta.causal(T, model.max_seq_len, tokens.device))


def full_pass(model: Transformer, seq: Sequence[int]) -> Tensor:
    """``hidden_states`` of one sequence of ids: [L, H]."""
    return hidden_states(model, torch.tensor([list(seq)], device=model.lm_head.weight.device))[0]

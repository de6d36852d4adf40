"""The Medusa-1 objective.

Offsets (FasterDecoding/Medusa ``medusa/train/train_legacy.py`` @ e2a5d20, ``CustomizedTrainer``):
the base ``lm_head`` at position t predicts token t+1; Medusa head k (0-based) predicts token
t+2+k, i.e. ``CE(logits_k[:, :-(2+k)], labels[:, 2+k:])``. Here the targets are shifted once
(:func:`shifted_targets`) and only positions with at least one target are run through the heads,
which gives the same per-head means without computing logits for padding and context.

Weighting: head k (0-based) gets ``heads_coefficient * decay_coefficient ** (k + 1)``. That is the
issue's "decay^k" with heads numbered from 1, and axolotl's Medusa loss
(``loss_i * medusa_decay_coefficient**i * medusa_heads_coefficient * scheduler_coefficient`` over
i = 1..K, where i = 0 is the base lm_head, trained only in Medusa-2). FasterDecoding's legacy
trainer sums the head losses unweighted (decay 1, coefficient 1). A constant factor on the whole
loss changes nothing under Adam; the decay sets how much the later, harder heads pull.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medusa_forge.train.data import IGNORE_INDEX


def head_weights(num_heads: int, heads_coefficient: float, decay_coefficient: float) -> list[float]:
    return [heads_coefficient * decay_coefficient ** (k + 1) for k in range(num_heads)]


def shifted_targets(labels: Tensor, num_heads: int) -> Tensor:
    """labels [B, T] -> targets [K, B, T] with targets[k, :, t] = labels[:, t + 2 + k] (IGNORE past the end)."""
    B, T = labels.shape
    out = torch.full((num_heads, B, T), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    for k in range(num_heads):
        s = 2 + k
        if s < T:
            out[k, :, : T - s] = labels[:, s:]
    return out


def medusa_loss(logits: Tensor, targets: Tensor, weights: list[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits [K, M, V], targets [K, M] -> (weighted total, per-head mean CE [K], top-1 hits [K], counts [K]).

    Per-head statistics are detached device tensors, so logging needs no host sync per step.
    A head with no target in the batch contributes zero.
    """
    K, M, V = logits.shape
    ce = F.cross_entropy(
        logits.reshape(K * M, V).float(), targets.reshape(K * M), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(K, M)
    valid = targets != IGNORE_INDEX
    counts = valid.sum(1)
    per_head = ce.sum(1) / counts.clamp(min=1)
    w = torch.tensor(weights, dtype=per_head.dtype, device=per_head.device)
    total = (per_head * w).sum()
    with torch.no_grad():
        hits = ((logits.argmax(-1) == targets) & valid).sum(1)
    return total, per_head.detach(), hits, counts

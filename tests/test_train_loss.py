"""The Medusa-1 objective: offsets and weighting pinned against the reference trainers.

FasterDecoding/Medusa ``medusa/train/train_legacy.py`` @ e2a5d20 (``CustomizedTrainer.compute_loss``):
    medusa_logits = logits[i, :, : -(2 + i)]; medusa_labels = labels[..., 2 + i :]; CE(...)
axolotl's Medusa loss (as used by the Medusa authors' recipes): head i = 1..K weighted by
``medusa_decay_coefficient ** i * medusa_heads_coefficient``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medusa_forge.train.data import IGNORE_INDEX
from medusa_forge.train.loss import head_weights, medusa_loss, shifted_targets


def reference_head_loss(logits: torch.Tensor, labels: torch.Tensor, i: int) -> torch.Tensor:
    """FasterDecoding's formula, verbatim in meaning: logits [K, B, T, V], labels [B, T]."""
    lg = logits[i, :, : -(2 + i)].reshape(-1, logits.shape[-1])
    lb = labels[..., 2 + i :].reshape(-1)
    return F.cross_entropy(lg, lb, ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("K", [1, 3])
def test_per_head_loss_equals_fasterdecoding_offsets(K):
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 12, 17
    logits = torch.randn(K, B, T, V, generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[2, 9:] = IGNORE_INDEX  # padding
    targets = shifted_targets(labels, K)
    sel = (targets != IGNORE_INDEX).any(0)
    _, per_head, _, counts = medusa_loss(logits[:, sel], targets[:, sel], head_weights(K, 0.2, 0.8))
    for i in range(K):
        assert per_head[i].item() == pytest.approx(reference_head_loss(logits, labels, i).item(), rel=1e-5)
        assert counts[i].item() == int((labels[:, 2 + i :] != IGNORE_INDEX).sum())


def test_head_k_target_is_token_two_plus_k_ahead():
    labels = torch.arange(10)[None]
    targets = shifted_targets(labels, 3)
    assert targets[0, 0, :3].tolist() == [2, 3, 4]  # head 1 (k=0) at t predicts t+2
    assert targets[2, 0, :3].tolist() == [4, 5, 6]  # head 3 (k=2) at t predicts t+4
    assert targets[2, 0, -4:].tolist() == [IGNORE_INDEX] * 4


def test_weights_decay_like_axolotl():
    # axolotl: i = 1..K (i = 0 is the base lm_head) -> coefficient * decay ** i
    assert head_weights(3, 0.2, 0.8) == pytest.approx([0.2 * 0.8, 0.2 * 0.8**2, 0.2 * 0.8**3])


def test_total_is_weighted_sum_and_empty_head_adds_nothing():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=g)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[1] = IGNORE_INDEX  # head 2 has no target in this batch
    total, per_head, hits, counts = medusa_loss(logits, targets, [0.5, 0.25])
    assert counts.tolist() == [5, 0]
    assert per_head[1].item() == 0.0 and hits[1].item() == 0
    assert total.item() == pytest.approx(0.5 * F.cross_entropy(logits[0], targets[0]).item(), rel=1e-6)
    assert torch.isfinite(total)

"""Spec for model/gemm_layout.py: how a linear is made row-invariant between the plain step (M=1)
and the tree step (M = tree nodes). The cuBLAS facts themselves are checked on the GPU
(``bench probe``, ``python -m medusa_forge.bench.gemm_check``); here the decision and the padded
linear's arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from medusa_forge.model.gemm_layout import KN, NK, PAD_ROWS, RowPaddedLinear, linear_groups, pick_layout, rows_invariant


@pytest.mark.parametrize(
    "works, want",
    [
        ({(KN, False)}, (KN, False, True)),
        ({(NK, False)}, (NK, False, True)),
        ({(KN, True)}, (KN, True, True)),  # wo on an H200: neither layout, but one padded M
        (set(), (KN, False, False)),
    ],
)
def test_pick_layout_prefers_kn_then_nk_then_row_padding(works, want):
    assert pick_layout(lambda layout, padded: (layout, padded) in works) == want


@pytest.mark.parametrize("rows", [1, 7, PAD_ROWS, PAD_ROWS + 3])
def test_row_padded_linear_computes_the_linear_at_every_row_count(rows):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=False)
    x = torch.randn(1, rows, 24)
    want = F.linear(x, lin.weight)
    lin.__class__ = RowPaddedLinear
    got = lin(x)
    assert got.shape == (1, rows, 40)
    torch.testing.assert_close(got, want)
    assert rows_invariant(lin.weight.detach(), (rows,) if rows > 1 else (2,), KN, padded=True)


def test_padded_linears_stay_in_their_group():
    """An engine built again on the same model (the tree search does) finds its padded linears."""
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].wo = nn.Linear(8, 8, bias=False)
    model.layers[0].wo.__class__ = RowPaddedLinear
    assert list(linear_groups(model)) == ["wo"]

"""oneDNN's packed-weight GEMM for the CPU batcher: cheap at a few rows, and one kernel at every M.

Why: the batcher needs a row's GEMM bits not to depend on the other rows of its step. MKL's sgemm
picks its kernel by M, so the default CPU path runs every GEMM in chunks of 2..8 rows, the range in
which MKL keeps a row's bits (docs/batching.md). At 8 rows that reaches about a third of the
machine's FLOPs, and a 64-token prefill chunk pays eight passes over the weights. oneDNN's inner
product over a weight reordered once (``torch.ops.mkldnn._reorder_linear_weight``, what inductor's
CPU freezing uses) gives a row the same bits at every M from 2 up (M=1 can be a GEMV: padded to 2),
and at 8 rows costs little more than at 2. That is a property of the library and its build, not a
promise, so :func:`packed_rows` checks it for the model's linears at the thread count in use and
answers None where it does not hold; the batcher then keeps MKL's chunks.

The reordered weights are a second copy of the model's linears (the batch-1 path keeps nn.Linear).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medusa_forge.model.step_meta import RowChunks

PACK_HINT_ROWS = 8  # the batch size oneDNN's reorder is told to expect (it picks the weight's blocking)
MOST_ROWS = 128  # a longer step runs in chunks of this many rows
CHECKED_ROWS = (*range(2, 18), 31, 32, 33, 63, 64, 65, 100, 127, MOST_ROWS)
_verdicts: dict[tuple, bool] = {}  # (in, out, dtype, threads) -> rows invariant; one check per process


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinears:
    """The model's nn.Linear layers with oneDNN-reordered weights; call it as ``gemm(linear, x2d)``.
    A module it does not hold (FP8, a head) runs as itself."""

    def __init__(self, linears: list[nn.Linear]):
        self._packed = {
            id(m): (torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), PACK_HINT_ROWS), m.bias) for m in linears
        }

    def __call__(self, mod: nn.Module, x: Tensor) -> Tensor:
        entry = self._packed.get(id(mod))
        if entry is None:
            return mod(x)
        return torch.ops.mkldnn._linear_pointwise(x, entry[0], entry[1], "none", [], "")


def rows_invariant(gemm: PackedLinears, mod: nn.Linear, seed: int = 0) -> bool:
    """Whether ``gemm`` gives each row of ``mod`` the same bits at every checked M, at the start
    and at the end of the input (the verdict is kept per shape, dtype and thread count)."""
    key = (mod.in_features, mod.out_features, mod.weight.dtype, torch.get_num_threads())
    if key not in _verdicts:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(MOST_ROWS, mod.in_features, generator=g).to(mod.weight.dtype)
        full = gemm(mod, x)
        _verdicts[key] = all(
            torch.equal(gemm(mod, x[at : at + m].contiguous()), full[at : at + m])
            for m in CHECKED_ROWS
            for at in {0, MOST_ROWS - m}
        )
    return _verdicts[key]


def packed_rows(model: nn.Module) -> RowChunks | None:
    """Row chunks whose GEMMs run through oneDNN's packed weights, if the model's CPU linears keep a
    row's bits at every M there (layer 0 stands for all layers: they share shapes); else None."""
    if not available() or model.lm_head.weight.device.type != "cpu":
        return None
    layer = model.layers[0]
    probes = [layer.attn.wqkv, layer.attn.wo, layer.ffn.w_gate_up, layer.ffn.w_down, model.lm_head]
    if any(type(m) is not nn.Linear for m in probes):  # FP8 or otherwise special linears
        return None
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    try:
        gemm = PackedLinears(linears)
        if not all(rows_invariant(gemm, m) for m in probes):
            return None
    except RuntimeError:  # a dtype or build oneDNN cannot pack
        return None
    return RowChunks(most=MOST_ROWS, least=2, gemm=gemm)

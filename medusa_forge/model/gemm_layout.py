"""Choose each linear's weight layout so a token's GEMM row is the same in every step shape.

Why: greedy Medusa is exact only if the tree step computes a token's logits bit for bit as the
single-token step would. Our own kernels are row-wise batch invariant (see ``kernels``), but the
GEMMs belong to cuBLAS, whose kernel choice depends on M and on the weight's memory layout: on an
H100 with the Llama-3-8B shape, ``wo`` stored ``[N, K]`` (nn.Linear's layout) gives a different
row at M=1 than at M=64, while stored ``[K, N]`` it does not, and ``wqkv`` is the other way round
(``python -m medusa_forge.bench.gemm_check`` prints the table). The ``[K, N]`` layout is also the
faster one for the big GEMMs there (lm_head 97% of the copy bandwidth vs 92%).

So when an engine is built on CUDA we test, per distinct linear (layer 0 stands for all layers: they
share shapes), both layouts at M=1 against M=rows for every step shape the engine runs, and keep
the ``[K, N]`` layout if its rows agree, else ``[N, K]`` if those do. Where neither does (``wo`` on
an H200 with torch 2.11), the linear becomes a :class:`RowPaddedLinear`: every launch with fewer than
``PAD_ROWS`` rows (a plain step, a tree step, a short prefill) is padded to that many, so all steps
run one kernel at one M, and a row's bits depend only on the row (checked the same way); at the
8B shape an M=65 GEMV-sized GEMM costs what M=1 does. Only if that fails too is ``exact=False``
reported. The result depends only on shapes and the software stack, never on the
tree an engine was given beyond its size, so a base-only engine and a Medusa engine of the same
model choose the same layouts. A ``[K, N]`` weight is held as the transpose of a contiguous
``[K, N]`` tensor: the parameter keeps its ``[N, K]`` shape and every caller keeps ``F.linear``.
CPU engines are left alone (their path is checked token for token against transformers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medusa_forge.tree.choice_tree import MAX_TREE_NODES

KN, NK = "KN", "NK"
ALWAYS_CHECKED_ROWS = 64  # the largest tree: every engine checks it, so all engines of a model agree
PAD_ROWS = MAX_TREE_NODES + 1  # a RowPaddedLinear's launches have at least this many rows (the largest tree step)


def padded_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear run with at least ``PAD_ROWS`` rows (zero rows appended, then dropped)."""
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    if m >= PAD_ROWS:
        return F.linear(x, weight, bias)
    y = F.linear(F.pad(x2, (0, 0, 0, PAD_ROWS - m)), weight, bias)[:m]
    return y.reshape(*x.shape[:-1], y.shape[-1])


class RowPaddedLinear(nn.Linear):
    """nn.Linear through :func:`padded_linear`, for a weight whose cuBLAS rows differ between M=1
    and a tree step's M (see the module docstring).

    A producer that can write its output anywhere (the attention kernel) skips the pad's zero fill
    and copy (two launches per layer): it writes the first rows of :meth:`input_buffer` and calls
    :meth:`forward_buffer`. The rows it leaves unwritten hold whatever the buffer held: a GEMM row
    depends only on its own input row and the kernel, which M alone picks."""

    def forward(self, x: Tensor) -> Tensor:
        return padded_linear(x, self.weight, self.bias)

    def input_buffer(self, rows: int, like: Tensor) -> Tensor | None:
        """An uninitialised [PAD_ROWS, in_features] input whose first ``rows`` rows the caller
        fills; None when ``rows`` needs no padding."""
        return like.new_empty(PAD_ROWS, self.in_features) if rows < PAD_ROWS else None

    def forward_buffer(self, buf: Tensor, rows: int) -> Tensor:
        """The linear of the first ``rows`` rows of an :meth:`input_buffer`, computed at M=PAD_ROWS."""
        return F.linear(buf, self.weight, self.bias)[:rows]


@dataclass
class LayoutChoice:
    layouts: dict[str, str] = field(default_factory=dict)  # linear suffix -> "KN" | "NK"
    invariant: dict[str, bool] = field(default_factory=dict)
    row_padded: list[str] = field(default_factory=list)  # linears made RowPaddedLinear
    rows_checked: tuple[int, ...] = ()

    @property
    def exact(self) -> bool:
        return all(self.invariant.values())

    def to_dict(self) -> dict:
        return {
            "layouts": self.layouts,
            "row_invariant": self.invariant,
            "row_padded": self.row_padded,
            "rows_checked": list(self.rows_checked),
            "exact": self.exact,
        }


def linear_groups(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Plain nn.Linear modules grouped by their name within a layer (``attn.wqkv``, ``lm_head``)."""
    groups: dict[str, list[tuple[nn.Module, str]]] = {}
    for name, mod in model.named_modules():
        if type(mod) in (nn.Linear, RowPaddedLinear):
            parts = name.split(".")
            key = ".".join(parts[2:]) if parts[0] == "layers" else name
            groups.setdefault(key, []).append((mod, name))
    return groups


def _as_layout(w: Tensor, layout: str) -> Tensor:
    return w.t().contiguous().t() if layout == KN else w.contiguous()


def rows_invariant(weight: Tensor, rows: tuple[int, ...], layout: str, seed: int = 0, padded: bool = False) -> bool:
    """True when every checked row of an M=r launch equals the same row launched alone (M=1);
    ``padded``: both launches as a RowPaddedLinear runs them."""
    w = _as_layout(weight, layout)
    linear = (lambda x: padded_linear(x, w)) if padded else (lambda x: F.linear(x, w))
    g = torch.Generator(device=weight.device).manual_seed(seed)
    for r in rows:
        x = torch.randn(r, weight.shape[1], generator=g, device=weight.device, dtype=torch.float32).to(weight.dtype)
        full = linear(x)
        for i in sorted({0, r // 2, r - 1}):
            if not torch.equal(linear(x[i : i + 1])[0], full[i]):
                return False
    return True


def pick_layout(invariant: Callable[[str, bool], bool]) -> tuple[str, bool, bool]:
    """(layout, row padded, exact) from ``invariant(layout, padded)``: [K, N], else [N, K], else
    [K, N] row padded, else [K, N] inexact."""
    for layout in (KN, NK):
        if invariant(layout, False):
            return layout, False, True
    if invariant(KN, True):
        return KN, True, True
    return KN, False, False


@torch.no_grad()
def choose_layouts(model: nn.Module, step_rows: tuple[int, ...]) -> LayoutChoice:
    """Test and apply the layouts (see the module docstring); ``step_rows``: M of each step shape."""
    choice = LayoutChoice()
    device = next(model.parameters()).device
    if device.type != "cuda":
        return choice
    rows = tuple(sorted({r for r in (*step_rows, ALWAYS_CHECKED_ROWS) if r > 1}))
    choice.rows_checked = rows
    tied = getattr(model.config, "tie_word_embeddings", False)
    for key, mods in linear_groups(model).items():
        w0 = mods[0][0].weight
        layout, padded, exact = pick_layout(lambda lay, pad: rows_invariant(w0, rows, lay, padded=pad))
        choice.invariant[key] = exact
        choice.layouts[key] = layout
        if padded:
            choice.row_padded.append(key)
        for mod, name in mods:
            mod.__class__ = RowPaddedLinear if padded else nn.Linear
            if name == "lm_head" and tied and layout == KN and mod.weight is model.embed.weight:
                # The embedding keeps its row-major table; lm_head gets its own [K, N] copy.
                mod.weight = nn.Parameter(_as_layout(mod.weight.detach(), KN), requires_grad=False)
            else:
                mod.weight.data = _as_layout(mod.weight.data, layout)
    return choice

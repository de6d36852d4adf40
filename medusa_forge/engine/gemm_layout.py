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
the ``[K, N]`` layout if its rows agree, else ``[N, K]`` if those do, else ``[K, N]`` with
``exact=False`` reported. The result depends only on shapes and the software stack, never on the
tree an engine was given beyond its size, so a base-only engine and a Medusa engine of the same
model choose the same layouts. A ``[K, N]`` weight is held as the transpose of a contiguous
``[K, N]`` tensor: the parameter keeps its ``[N, K]`` shape and every caller keeps ``F.linear``.
CPU engines are left alone (their path is checked token for token against transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KN, NK = "KN", "NK"
ALWAYS_CHECKED_ROWS = 64  # the largest tree: every engine checks it, so all engines of a model agree


@dataclass
class LayoutChoice:
    layouts: dict[str, str] = field(default_factory=dict)  # linear suffix -> "KN" | "NK"
    invariant: dict[str, bool] = field(default_factory=dict)
    rows_checked: tuple[int, ...] = ()

    @property
    def exact(self) -> bool:
        return all(self.invariant.values())

    def to_dict(self) -> dict:
        return {"layouts": self.layouts, "row_invariant": self.invariant, "rows_checked": list(self.rows_checked),
                "exact": self.exact}


def linear_groups(model: nn.Module) -> dict[str, list[tuple[nn.Module, str]]]:
    """Plain nn.Linear modules grouped by their name within a layer (``attn.wqkv``, ``lm_head``)."""
    groups: dict[str, list[tuple[nn.Module, str]]] = {}
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear:
            parts = name.split(".")
            key = ".".join(parts[2:]) if parts[0] == "layers" else name
            groups.setdefault(key, []).append((mod, name))
    return groups


def _as_layout(w: Tensor, layout: str) -> Tensor:
    return w.t().contiguous().t() if layout == KN else w.contiguous()


def rows_invariant(weight: Tensor, rows: tuple[int, ...], layout: str, seed: int = 0) -> bool:
    """True when every checked row of an M=r launch equals the same row launched alone (M=1)."""
    w = _as_layout(weight, layout)
    g = torch.Generator(device=weight.device).manual_seed(seed)
    for r in rows:
        x = torch.randn(r, weight.shape[1], generator=g, device=weight.device, dtype=torch.float32).to(weight.dtype)
        full = F.linear(x, w)
        for i in sorted({0, r // 2, r - 1}):
            if not torch.equal(F.linear(x[i:i + 1], w)[0], full[i]):
                return False
    return True


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
        layout = next((lay for lay in (KN, NK) if rows_invariant(w0, rows, lay)), None)
        choice.invariant[key] = layout is not None
        layout = layout or KN
        choice.layouts[key] = layout
        for mod, name in mods:
            if name == "lm_head" and tied and layout == KN and mod.weight is model.embed.weight:
                # The embedding keeps its row-major table; lm_head gets its own [K, N] copy.
                mod.weight = nn.Parameter(_as_layout(mod.weight.detach(), KN), requires_grad=False)
            else:
                mod.weight.data = _as_layout(mod.weight.data, layout)
    return choice

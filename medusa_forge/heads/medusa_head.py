"""The Medusa head, defined once for training, conversion and inference.

Head k (0-based) maps the base model's last hidden state at position t to logits for token
t+2+k: ``medusa_num_layers`` residual blocks ``x + SiLU(W x + b)`` followed by a vocab
projection. The projection is per head (Medusa-1 "v1" layout) or the base model's own
``lm_head`` ("version 2" heads, which store none).

All heads are stored stacked (``[K, ...]`` tensors) so inference runs every head in one
batched GEMM per layer instead of K small ones; the per-head FasterDecoding tensors
(``{k}.{j}.linear.weight`` ...) are views of these stacks, see ``heads/checkpoint.py``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class MedusaHeadsConfig:
    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    shared_lm_head: bool = False  # "version 2": no per-head vocab projection
    base_model_name_or_path: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class MedusaHeads(nn.Module):
    def __init__(self, cfg: MedusaHeadsConfig):
        super().__init__()
        K, L, H, V = cfg.num_heads, cfg.num_layers, cfg.hidden_size, cfg.vocab_size
        self.config = cfg
        # nn.Linear convention: weight [out, in]. Zero-initialised so a fresh block is the identity.
        self.res_weight = nn.Parameter(torch.zeros(K, L, H, H))
        self.res_bias = nn.Parameter(torch.zeros(K, L, H))
        self.proj_weight = None if cfg.shared_lm_head else nn.Parameter(torch.zeros(K, V, H))

    @classmethod
    def from_lm_head(cls, cfg: MedusaHeadsConfig, lm_head_weight: Tensor) -> MedusaHeads:
        """Fresh heads as Medusa-1 trains them: ResBlocks at zero, projections copied from lm_head."""
        heads = cls(cfg).to(device=lm_head_weight.device, dtype=lm_head_weight.dtype)
        if heads.proj_weight is not None:
            with torch.no_grad():
                heads.proj_weight.copy_(lm_head_weight.detach()[None].expand_as(heads.proj_weight))
        return heads

    def hidden(self, x: Tensor, num_heads: int | None = None) -> Tensor:
        """x [N, H] -> features [K, N, H] of the first ``num_heads`` heads after the residual blocks."""
        K = self.res_weight.shape[0] if num_heads is None else num_heads
        h = x.unsqueeze(0).expand(K, *x.shape)
        for j in range(self.res_weight.shape[1]):
            w, b = self.res_weight[:K, j], self.res_bias[:K, j, None, :]
            h = h + F.silu(torch.baddbmm(b, h, w.transpose(1, 2)))
        return h

    def forward(self, x: Tensor, lm_head_weight: Tensor | None = None, num_heads: int | None = None) -> Tensor:
        """x [N, H] -> logits [K, N, V]: one batched GEMM per layer for all heads.

        ``num_heads`` limits the work to the first heads, e.g. to a choice tree's depth.
        """
        return self.project(self.hidden(x, num_heads), lm_head_weight)

    def project(self, h: Tensor, lm_head_weight: Tensor | None = None) -> Tensor:
        """Features [K, N, H] of the first K heads -> their logits [K, N, V]."""
        if self.proj_weight is not None:
            return torch.bmm(h, self.proj_weight[: h.shape[0]].transpose(1, 2))
        if lm_head_weight is None:
            raise ValueError("shared-lm_head Medusa heads need the base model's lm_head weight")
        return h @ lm_head_weight.t()

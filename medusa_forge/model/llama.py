"""A compact Llama/Mistral decoder with a static KV cache (after gpt-fast's ``model.py``).

One forward serves prefill, single-token decode and Medusa tree verification: callers pass the
tokens, their RoPE positions, the cache slots their K/V go to, and a boolean attention mask over
the whole cache. Positions and slots differ only in tree verification, where the nodes of the
candidate tree occupy consecutive slots but share positions by depth.

QKV and gate/up projections are fused (one GEMM each) and GQA is computed by folding the query
groups into the row dimension, so K/V are never repeated in memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medusa_forge.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and cast back before the weight, as transformers' LlamaRMSNorm does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies, with Llama-3 / linear scaling when the config asks for it."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def rope_cache(cfg: ModelConfig, max_positions: int) -> Tensor:
    """[max_positions, head_dim] cos and sin, in HF's rotate-half (GPT-NeoX) layout, stacked."""
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, rope_inv_freq(cfg))
    emb = torch.cat([freqs, freqs], dim=-1)
    return torch.stack([emb.cos(), emb.sin()])


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, heads, T, D]; cos/sin: [B or 1, 1, T, D] (already in x's dtype)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache(nn.Module):
    """Pre-allocated keys and values, [batch, kv_heads, max_seq_len, head_dim], written in place."""

    def __init__(self, batch: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v

    def move(self, src_slots: Tensor, dst_slots: Tensor) -> None:
        """Copy entries src -> dst (gather first, so overlapping ranges are safe)."""
        self.k.index_copy_(2, dst_slots, self.k.index_select(2, src_slots))
        self.v.index_copy_(2, dst_slots, self.v.index_select(2, src_slots))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=False)
        self.wo = nn.Linear(q, cfg.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_all, v_all = self.kv_cache.update(slots, k, v)
        # GQA without repeating K/V: the g query heads that share one KV head become g*T rows.
        g = self.n_heads // self.n_kv
        q = q.reshape(B, self.n_kv, g * T, self.head_dim)
        m = mask if g == 1 else mask.repeat(1, 1, g, 1)
        y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=m)
        y = y.view(B, self.n_heads, T, self.head_dim).transpose(1, 2).reshape(B, T, q_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.w_gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_gate_up(x).split(self.intermediate, dim=-1)
        return self.w_down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, slots, mask)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.max_seq_len = 0
        self.register_buffer("rope", torch.empty(0), persistent=False)

    def setup_caches(self, batch: int, max_seq_len: int) -> None:
        """Allocate the static KV cache and the RoPE table; needed before any forward."""
        cfg = self.config
        if max_seq_len > cfg.max_position_embeddings:
            max_seq_len = cfg.max_position_embeddings
        p = self.lm_head.weight
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch, cfg.num_kv_heads, max_seq_len, cfg.head_dim, p.dtype, p.device)
        self.rope = rope_cache(cfg, max_seq_len).to(p.device)
        self.max_seq_len = max_seq_len

    def forward(self, tokens: Tensor, positions: Tensor, slots: Tensor, mask: Tensor) -> Tensor:
        """Return final-norm hidden states [B, T, H].

        tokens [B, T]; positions [T] RoPE positions; slots [T] cache slots to write;
        mask [1, 1, T, max_seq_len] bool, True where a token may attend.
        """
        x = self.embed(tokens)
        cos_sin = self.rope[:, positions].to(x.dtype)
        cos, sin = cos_sin[0][None, None], cos_sin[1][None, None]
        for layer in self.layers:
            x = layer(x, cos, sin, slots, mask)
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()

    def move_kv(self, src_slots: Tensor, dst_slots: Tensor) -> None:
        for layer in self.layers:
            layer.attn.kv_cache.move(src_slots, dst_slots)


def causal_mask(start: int | Tensor, length: int, max_seq_len: int, device) -> Tensor:
    """Mask for ``length`` new tokens at slots start.. that see everything before them and themselves."""
    rows = torch.arange(length, device=device)[:, None] + start
    cols = torch.arange(max_seq_len, device=device)[None, :]
    return (cols <= rows)[None, None]

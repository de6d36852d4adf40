"""A compact Llama/Mistral decoder with a static KV cache (after gpt-fast's ``model.py``).

One forward serves prefill, single-token decode and Medusa tree verification: callers pass the
tokens and a :class:`~medusa_forge.model.step_meta.StepMeta` (their RoPE positions, the cache
slots their K/V go to, and what each token sees). Positions and slots differ only in tree
verification, where the nodes of the candidate tree occupy consecutive slots but share positions
by depth.

QKV and gate/up projections are fused (one GEMM each) and GQA is computed by folding the query
groups into the row dimension, so K/V are never repeated in memory.

Everything between the GEMMs goes through :mod:`medusa_forge.kernels`: on CUDA one
row-wise batch-invariant Triton kernel each (add+RMSNorm, RoPE+cache write, SiLU*mul, and, when
the caller passes ``prefix_len``, a flash-decoding cache attention that needs no mask), elsewhere
the PyTorch reference ops. Each block hands back its residual stream and its MLP output unsummed,
so the add is fused into the next norm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medusa_forge import kernels
from medusa_forge.model.config import ModelConfig
from medusa_forge.model.gemm_layout import RowPaddedLinear
from medusa_forge.model.step_meta import RowChunks, StepMeta, causal_mask  # noqa: F401 - causal_mask re-exported


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and cast back before the weight, as transformers' LlamaRMSNorm does.
        return kernels.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
        """(norm(x + delta), x + delta): the residual add fused into the norm."""
        return kernels.add_rms_norm(x, delta, self.weight, self.eps)


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


class KVCache(nn.Module):
    """Keys and values of one layer, [batch, kv_heads, max_seq_len, head_dim], written in place.

    ``k`` and ``v`` are views into the model-wide cache tensor (see ``Transformer.setup_caches``),
    so moving accepted tree entries is one gather/scatter for all layers at once.
    """

    def __init__(self, k: Tensor, v: Tensor):
        super().__init__()
        self.k, self.v = k, v

    def update(self, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, slots, k)
        self.v.index_copy_(2, slots, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q, cfg.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, meta: StepMeta) -> Tensor:
        """x [B, T, hidden]; ``meta`` says where the tokens go and what they see (with
        ``meta.prefix_len`` a batch-1 CUDA forward runs the cache attention kernel, no mask)."""
        if meta.packed:
            return self._packed(x, meta)
        B, T, _ = x.shape
        cache = self.kv_cache
        rope = meta.rope
        q = kernels.rope_qkv_to_cache(
            self.wqkv(x),
            rope[0],
            rope[1],
            cache.k,
            cache.v,
            meta.slots,
            self.n_heads,
            self.n_kv,
            self.head_dim,
            meta.positions,
        )  # [B, T, H, D]
        if meta.prefix_len is not None and B == 1 and kernels.use_triton(q):
            # A row-padded wo (see gemm_layout) gets the attention output written into its padded input.
            buf = self.wo.input_buffer(T, q) if isinstance(self.wo, RowPaddedLinear) else None
            out = buf[:T].view(T, self.n_heads, self.head_dim) if buf is not None else None
            y = kernels.cache_attention(
                q[0], cache.k[0], cache.v[0], meta.prefix_len, meta.tree_mask, meta.tree_ancestors, out=out
            )
            if buf is not None:
                return self.wo.forward_buffer(buf, T)[None]
            y = y[None]
        else:
            mask = meta.mask
            if mask is None:
                mask = kernels.cache_mask(meta.prefix_len, meta.tree_mask, T, cache.k.shape[2])
            y = kernels.masked_attention(q, cache.k, cache.v, mask)
        return self.wo(y.reshape(B, T, self.n_heads * self.head_dim))

    def _packed(self, x: Tensor, meta: StepMeta) -> Tensor:
        """Packed rows of several sequences [1, R, hidden]: each segment attends over its own
        cache row only, through the same kernel a batch-1 step of its shape runs."""
        R = x.shape[1]
        qkv = linear_rows(self.wqkv, x, meta.gemm_rows)
        k_all, v_all = meta.kv[self.layer_index]
        out = qkv.new_empty(R, self.n_heads, self.head_dim)
        if kernels.use_triton(qkv):
            for seg in meta.segments:
                rows = slice(seg.start, seg.stop)
                q = kernels.rope_qkv_to_cache(
                    qkv[:, rows],
                    meta.rope[0],
                    meta.rope[1],
                    k_all[seg.row : seg.row + 1],
                    v_all[seg.row : seg.row + 1],
                    meta.slots[rows],
                    self.n_heads,
                    self.n_kv,
                    self.head_dim,
                    meta.positions[rows],
                )
                kernels.cache_attention(
                    q[0], k_all[seg.row], v_all[seg.row], seg.prefix, seg.tree_mask, seg.tree_ancestors, out=out[rows]
                )
        else:
            q = self._rope_rows(qkv[0], meta, k_all, v_all)
            g = self.n_heads // self.n_kv
            threads = torch.get_num_threads()
            # A slot's attention is microseconds of work: one thread runs it faster than a team's
            # fork/join per call (milliseconds on a busy machine), and SDPA's bits are the same at
            # any thread count (each thread computes whole rows).
            torch.set_num_threads(1)
            try:
                self._segments_attention(q, meta, k_all, v_all, g, out)
            finally:
                torch.set_num_threads(threads)
        return linear_rows(self.wo, out.view(1, R, -1), meta.gemm_rows)

    def _segments_attention(self, q: Tensor, meta: StepMeta, k_all: Tensor, v_all: Tensor, g: int, out: Tensor):
        """Each packed slot's SDPA over its own cache row, written into ``out`` [R, H, D]."""
        for seg in meta.segments:
            # kernels.masked_attention's SDPA call, its GQA mask repeated once per step, not per layer
            T, seen = seg.stop - seg.start, seg.mask.shape[-1]  # the slot's prefix and new rows
            qh = q[seg.start : seg.stop].transpose(0, 1).reshape(1, self.n_kv, g * T, self.head_dim)
            y = F.scaled_dot_product_attention(
                qh,
                k_all[seg.row : seg.row + 1, :, :seen],
                v_all[seg.row : seg.row + 1, :, :seen],
                attn_mask=seg.mask,
            )
            out[seg.start : seg.stop] = y.reshape(self.n_heads, T, self.head_dim).transpose(0, 1)

    def _rope_rows(self, qkv: Tensor, meta: StepMeta, k_all: Tensor, v_all: Tensor) -> Tensor:
        """The reference RoPE + cache write for all packed rows at once (elementwise, so each
        row's bits are those of its own sequence's batch-1 call): q [R, H, D]."""
        R = qkv.shape[0]
        q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], -1)
        cos, sin = meta.rope[0][meta.positions][:, None], meta.rope[1][meta.positions][:, None]
        q = kernels.apply_rope(q.view(R, self.n_heads, self.head_dim), cos, sin)
        k = kernels.apply_rope(k.view(R, self.n_kv, self.head_dim), cos, sin)
        k_all[meta.batch_index, :, meta.slots] = k
        v_all[meta.batch_index, :, meta.slots] = v.view(R, self.n_kv, self.head_dim)
        return q


def linear_rows(mod: nn.Module, x: Tensor, chunks: RowChunks | None) -> Tensor:
    """``mod(x)``, or with ``chunks`` the GEMM run in row chunks of the sizes it allows (see
    :class:`~medusa_forge.model.step_meta.RowChunks`)."""
    if chunks is None:
        return mod(x)
    flat = x.reshape(-1, x.shape[-1])
    m = flat.shape[0]
    tail = m % chunks.most
    if 0 < tail < chunks.least:
        flat = F.pad(flat, (0, 0, 0, chunks.least - tail))
    run = mod if chunks.gemm is None else lambda c: chunks.gemm(mod, c)
    y = torch.cat([run(c) for c in flat.split(chunks.most)]) if flat.shape[0] > chunks.most else run(flat)
    return y[:m].reshape(*x.shape[:-1], y.shape[-1])


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.w_gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, rows: RowChunks | None = None) -> Tensor:
        """``rows``: GEMMs in row chunks (see :func:`linear_rows`)."""
        gate_up = linear_rows(self.w_gate_up, x, rows)
        if rows is not None:
            return linear_rows(self.w_down, kernels.silu_mul(gate_up), rows)
        # An FP8 w_down may take silu(gate) * up quantized straight from the activation's launch.
        fused = getattr(self.w_down, "activated_input", None)
        act = fused(gate_up) if fused is not None else None
        return self.w_down(act if act is not None else kernels.silu_mul(gate_up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: Tensor, meta: StepMeta, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Input x + delta (the previous block's unsummed output); returns (residual, MLP output)."""
        chunked = meta.gemm_rows is not None  # the GEMMs take plain rows: no fused FP8 input
        h, x = _normed(self.attn_norm, None if chunked else self.attn.wqkv, x, delta)
        h, x = _normed(self.ffn_norm, None if chunked else self.ffn.w_gate_up, x, self.attn(h, meta))
        return x, self.ffn(h, meta.gemm_rows)


def _normed(norm: RMSNorm, consumer: nn.Module | None, x: Tensor, delta: Tensor | None):
    """(norm(x [+ delta]) as ``consumer``'s input, x [+ delta]). A consumer with ``normed_input``
    (an FP8 GEMM) may take it quantized straight from the norm's launch; it returns None where not."""
    fused = getattr(consumer, "normed_input", None)
    if fused is not None:
        out = fused(norm, x, delta)
        if out is not None:
            return out
    return (norm(x), x) if delta is None else norm.add_forward(x, delta)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        for i, layer in enumerate(self.layers):
            layer.attn.layer_index = i  # a packed step reads its own cache, meta.kv[i]
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
        # One tensor [layers, k/v, batch, kv_heads, seq, head_dim]; each layer holds views of it.
        self.kv = torch.zeros(
            cfg.num_layers, 2, batch, cfg.num_kv_heads, max_seq_len, cfg.head_dim, dtype=p.dtype, device=p.device
        )
        for i, layer in enumerate(self.layers):
            layer.attn.kv_cache = KVCache(self.kv[i, 0], self.kv[i, 1])
        # In the compute dtype once, not at every step; the kernels gather its rows by position.
        self.rope = rope_cache(cfg, max_seq_len).to(device=p.device, dtype=self.embed.weight.dtype)
        self.max_seq_len = max_seq_len

    def forward(self, tokens: Tensor, meta: StepMeta) -> Tensor:
        """Final-norm hidden states [B, T, H] of tokens [B, T] placed as ``meta`` says."""
        x = self.embed(tokens)
        meta = meta.bind(self.rope if self.rope.dtype == x.dtype else self.rope.to(x.dtype))
        delta = None
        for layer in self.layers:
            x, delta = layer(x, meta, delta)
        return self.norm(x) if delta is None else self.norm.add_forward(x, delta)[0]

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()

    def move_kv(self, src_slots: Tensor, dst_slots: Tensor) -> None:
        """Copy cache entries src -> dst in every layer (gather first, so overlapping ranges are safe)."""
        if (
            kernels.use_triton(self.kv)
            and self.kv.is_contiguous()
            and self.config.head_dim & (self.config.head_dim - 1) == 0
        ):
            kernels.move_kv_triton(self.kv, src_slots, dst_slots)
        else:
            self.kv.index_copy_(4, dst_slots, self.kv.index_select(4, src_slots))

"""Row-wise batch-invariant Triton kernels for the decoder step, with their exact PyTorch references.

Why: a decode step of a Llama-3-8B-shaped model is one CUDA graph whose GEMMs are near the HBM
floor, while ~1000 tiny elementwise kernels (RMSNorm in fp32 pieces, RoPE's cat/neg/mul/add,
SiLU*mul, residual adds) and a masked SDPA over the whole static cache cost as much again. These
kernels fuse each of those into one launch: add+RMSNorm, RoPE+KV-cache write, SiLU*mul, and a
flash-decoding cache attention (split kernel + combine kernel) that reads the committed length
from a device tensor, so it stays CUDA-graph safe.

Batch invariance is the contract (torch.compile broke it): every kernel computes a token row with
a launch configuration (block sizes, warps, split size, reduction order) that depends only on the
model shape, never on the number of rows T or on what the other rows hold. A row's bits are the
same in a T=1 decode step, inside the T=64 tree-verification step, and in a prefill chunk. In
the attention that means a fixed KV split size (``AttentionConfig``), key blocks aligned to
absolute slot numbers, and a combine that sums the splits in one fixed tile order; a split that is
fully masked for a row contributes exact zeros. It also means one compiled binary: the tree step and
the plain step must not launch different constexpr variants (or differently specialised integer
arguments) of a kernel, because two variants of one source may compile to different instruction
sequences. ``medusa-forge bench probe`` checks the result on a GPU: every committed KV-cache entry of
tree decoding against plain decoding, bit for bit.

Each op dispatches with :func:`use_triton`: Triton for CUDA tensors (no autograd: a tensor that
needs grad takes the reference path), the ``*_ref`` PyTorch implementation otherwise. The
references are exactly the ops the decoder ran before these kernels, so the CPU path (compared
with transformers token for token) is bit-for-bit unchanged. The Triton kernels reproduce the
references' dtype rounding points (x*cos and rot*sin rounded before the add, SiLU rounded before
the multiply, the normalised row rounded before the weight), so they differ from them only by
reduction order. Set ``MEDUSA_FORGE_TRITON=0`` (or use :func:`reference_kernels`) to force the
references on CUDA, e.g. to time the PyTorch path.

The kernels are wrapped with ``triton.jit`` on first launch, not at import, so that
``TRITON_INTERPRET=1`` set after this module was imported (the CPU test suite does this) still
selects Triton's interpreter.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the kernels are optional: every op has its reference
    HAVE_TRITON = False

_enabled = os.environ.get("MEDUSA_FORGE_TRITON", "1") != "0"
LOG2E = 1.4426950408889634


def use_triton(t: Tensor) -> bool:
    """True when ``t``'s op should run as a Triton kernel: CUDA, Triton importable, no autograd."""
    return (_enabled and HAVE_TRITON and t.is_cuda
            and not (t.requires_grad and torch.is_grad_enabled()))


@contextmanager
def reference_kernels() -> Iterator[None]:
    """Run every op on its PyTorch reference inside the block (A/B checks and timings)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


@dataclass(frozen=True)
class AttentionConfig:
    """Tile sizes of :func:`cache_attention`; fixed per process, never chosen from T (invariance).

    split: KV slots per split program (the flash-decoding split, aligned to slot 0); block_m:
    query rows (token x GQA head) per program; block_n: keys per inner step; max_scratch_bytes
    bounds the fp32 partials, so a long prefill runs in token chunks (a row never sees the chunking);
    combine_rows: query rows per program of the combine (a power of two).
    """

    split: int = 128
    block_m: int = 16  # >= the GQA group; a tail program holds one token's group, so small is cheap
    block_n: int = 64
    num_warps: int = 4
    max_scratch_bytes: int = 64 << 20
    combine_rows: int = 1
    early_v: bool = False  # the split kernel's EARLY_V (V loaded beside K; see its docstring)


DEFAULT_ATTENTION = AttentionConfig()
# Tile choices by (GQA group, head_dim): a shape property, so every step of one model uses the same
# (see AttentionConfig). Measured on an H200 (bench/results/2026-12-02-h200-c/): at the Llama-3-8B
# shape a combine program per token (4 rows) took a 64-node tree step's 32 combines from 259 us to
# 110 us (the plain step's from 76 to 88); pycoder-26m's combines were faster one row per program
# (9.4 vs 12.3 us plain). Split and block_m choices were within 5% of these defaults at both shapes
# (``python -m medusa_forge.engine.kernels_check --sweep``).
ATTENTION_BY_SHAPE: dict[tuple[int, int], AttentionConfig] = {(4, 128): AttentionConfig(combine_rows=4)}


def attention_config(group: int, head_dim: int) -> AttentionConfig:
    """The tile sizes cache attention uses for a model whose GQA group and head_dim are these."""
    return ATTENTION_BY_SHAPE.get((group, head_dim), DEFAULT_ATTENTION)


# ================================================================================== references
def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, cast to x's dtype, then multiply by weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    residual = x + delta
    return rms_norm_ref(residual, weight, eps), residual


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF rotate-half RoPE. x: [..., T, D]; cos/sin broadcastable to x (already in x's dtype)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_qkv_to_cache_ref(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                          n_heads: int, n_kv: int, head_dim: int, positions: Tensor | None = None) -> Tensor:
    B, T, _ = qkv.shape
    if positions is not None:  # cos/sin are the whole tables
        cos, sin = cos[positions], sin[positions]
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.view(B, T, n_heads, head_dim).transpose(1, 2)
    k = k.view(B, T, n_kv, head_dim).transpose(1, 2)
    v = v.view(B, T, n_kv, head_dim).transpose(1, 2)
    c, s = cos[None, None], sin[None, None]
    q, k = apply_rope(q, c, s), apply_rope(k, c, s)
    k_cache.index_copy_(2, slots, k)
    v_cache.index_copy_(2, slots, v)
    return q.transpose(1, 2)


def silu_mul_ref(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up


def masked_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor) -> Tensor:
    """SDPA of q [B, T, H, D] over the whole cache [B, KV, S, D] with a boolean mask [B|1, 1, T, S].

    GQA without repeating K/V: the g query heads sharing a KV head become g*T rows. Returns [B, T, H, D].
    """
    B, T, H, D = q.shape
    n_kv = k_cache.shape[1]
    g = H // n_kv
    qh = q.transpose(1, 2).reshape(B, n_kv, g * T, D)
    m = mask if g == 1 else mask.repeat(1, 1, g, 1)
    y = F.scaled_dot_product_attention(qh, k_cache, v_cache, attn_mask=m)
    return y.reshape(B, H, T, D).transpose(1, 2)


def cache_mask(prefix_len: Tensor, tree_mask: Tensor | None, T: int, S: int) -> Tensor:
    """[1, 1, T, S] bool: slots < prefix_len, plus the new slots prefix_len+j that tree_mask[t, j]
    allows (causal among the new tokens when tree_mask is None)."""
    device = prefix_len.device
    if tree_mask is None:
        tree_mask = torch.ones(T, T, dtype=torch.bool, device=device).tril_()
    rel = torch.arange(S, device=device) - prefix_len.reshape(())
    new = tree_mask[:, rel.clamp(0, T - 1)] & ((rel >= 0) & (rel < T))
    return ((rel < 0)[None, :] | new)[None, None]


def cache_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor,
                        tree_mask: Tensor | None = None) -> Tensor:
    mask = cache_mask(prefix_len, tree_mask, q.shape[0], k_cache.shape[1])
    return masked_attention(q[None], k_cache[None], v_cache[None], mask)[0]


# ================================================================================== Triton sources
_SOURCES: dict[str, tuple[object, dict]] = {}
_jitted = False
_interpreted = False  # Triton's CPU interpreter (TRITON_INTERPRET=1) was active when the kernels were jitted


def _source(**jit_kwargs):
    """Register a kernel body; :func:`_kernel` wraps it with ``triton.jit`` on first launch."""
    def register(fn):
        _SOURCES[fn.__name__] = (fn, jit_kwargs)
        return fn
    return register


def _kernel(name: str):
    """The jitted kernel ``name``; the first call jits them all, replacing this module's globals so
    kernels find their jitted helpers by name (the interpreter is picked at that moment)."""
    global _jitted, _interpreted
    if not _jitted:
        for n, (fn, kw) in _SOURCES.items():
            globals()[n] = triton.jit(fn, **kw)
        _interpreted = type(globals()[name]).__name__ == "InterpretedFunction"
        if _interpreted:  # the interpreter reduces with numpy when it recognises these combiners
            globals()["_add"] = getattr(tl.standard, "_sum_combine", globals()["_add"])
            globals()["_max"] = getattr(tl.standard, "_elementwise_max", globals()["_max"])
        _jitted = True
    return globals()[name]


if HAVE_TRITON:
    # Reductions go through tl.reduce with our own combine functions rather than tl.sum / tl.max,
    # and no tl.cdiv / tl.zeros: those library helpers are jitted when triton is imported, which pins them to
    # compiled mode; ours are jitted on first launch, so the interpreter can still be chosen then.
    @_source()
    def _add(a, b):
        return a + b

    @_source()
    def _max(a, b):
        return tl.maximum(a, b)

    @_source()
    def _round(x, DTYPE: tl.constexpr):
        """fp32 -> DTYPE, round to nearest even; bf16 by hand because the interpreter truncates."""
        if DTYPE == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            x = u.to(tl.float32, bitcast=True)
        return x.to(DTYPE)

    @_source()
    def _e4m3(x, scale):
        """clamp(x / scale, +-448) rounded to the nearest e4m3 value (ties to even), as fp32 whose
        cast to e4m3 is exact: IEEE division, then the rounding by hand (the interpreter's own e4m3
        cast is not round-to-nearest-even)."""
        u = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0).to(tl.uint32, bitcast=True)
        sign = u & 0x80000000
        a = u & 0x7FFFFFFF
        normal = (a + 0x7FFFF + ((a >> 20) & 1)) & 0xFFF00000  # keep 3 mantissa bits
        af = a.to(tl.float32, bitcast=True)
        tiny = ((af + 24576.0) - 24576.0).to(tl.uint32, bitcast=True)  # subnormals: steps of 2^-9
        return (tl.where(af < 0.015625, tiny, normal) | sign).to(tl.float32, bitcast=True)

    @_source()
    def _quantize_row(x, Q_ROW, SCALE, SOUT_ROW, cols, ok, DYNAMIC: tl.constexpr):
        """Store x (fp32 values of one activation row, at ``cols``) as e4m3 at Q_ROW, scaled by the
        static SCALE or (DYNAMIC) amax(|x|) * (1/448), which goes to SOUT_ROW."""
        if DYNAMIC:
            scale = tl.maximum(tl.reduce(tl.abs(x), 0, _max) * (1.0 / 448.0), 1e-12)
            tl.store(SOUT_ROW + tl.arange(0, 1), tl.full([1], 0.0, tl.float32) + scale)
        else:
            scale = tl.load(SCALE)
        tl.store(Q_ROW + cols, _e4m3(x, scale).to(Q_ROW.dtype.element_ty), mask=ok)

    @_source()
    def _rms_norm_kernel(X, DELTA, W, OUT, RES, Q, SCALE, SOUT, stride_x, stride_d, stride_o, stride_r, stride_q,
                         N, eps, HAS_DELTA: tl.constexpr, QUANT: tl.constexpr, DYNAMIC: tl.constexpr,
                         BLOCK: tl.constexpr):
        """One row of (add +) RMSNorm. QUANT: the normalised row (rounded to OUT's dtype, as an
        unfused norm stores it) goes out as the next FP8 GEMM's e4m3 input Q instead, scaled by
        the static SCALE or (DYNAMIC) amax(|row|) * (1/448) stored to SOUT: FP8Linear's
        quantization fused into the norm's launch, with the same bits."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_DELTA:
            d = tl.load(DELTA + row * stride_d + cols, mask=ok, other=0.0).to(tl.float32)
            r = _round(x + d, RES.dtype.element_ty)
            tl.store(RES + row * stride_r + cols, r, mask=ok)
            x = r.to(tl.float32)
        rstd = tl.rsqrt(tl.reduce(x * x, 0, _add) / N + eps)
        y = _round(x * rstd, X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        out = _round(y * w, OUT.dtype.element_ty)
        if QUANT:
            _quantize_row(out.to(tl.float32), Q + row * stride_q, SCALE, SOUT + row, cols, ok, DYNAMIC)
        else:
            tl.store(OUT + row * stride_o + cols, out, mask=ok)

    @_source()
    def _rope_qkv_kernel(QKV, COS, SIN, POS, KC, VC, SLOTS, QOUT, T, stride_row, stride_cos, stride_sin,
                         stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                         H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr):
        row = tl.program_id(0)  # b * T + t
        head = tl.program_id(1)  # q heads, then k heads, then v heads (the fused GEMM's order)
        b, t = row // T, row % T
        d = tl.arange(0, D)
        src = QKV + row.to(tl.int64) * stride_row + head * D
        x = tl.load(src + d)
        DT = QKV.dtype.element_ty
        if head < H + KV:
            partner = tl.load(src + (d + D // 2) % D).to(tl.float32)
            rot = tl.where(d < D // 2, -partner, partner)
            pos = tl.load(POS + t)  # the row of the cos/sin tables (their gather fused in here)
            c = tl.load(COS + pos * stride_cos + d).to(tl.float32)
            s = tl.load(SIN + pos * stride_sin + d).to(tl.float32)
            y = _round(_round(x.to(tl.float32) * c, DT).to(tl.float32) + _round(rot * s, DT).to(tl.float32), DT)
            if head < H:
                tl.store(QOUT + row.to(tl.int64) * (H * D) + head * D + d, y)
            else:
                slot = tl.load(SLOTS + t)
                tl.store(KC + b * stride_kb + (head - H) * stride_kh + slot * stride_ks + d, y)
        else:
            slot = tl.load(SLOTS + t)
            tl.store(VC + b * stride_vb + (head - H - KV) * stride_vh + slot * stride_vs + d, x)

    @_source()
    def _silu_mul_kernel(GU, OUT, I, stride_gu, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < I
        tl.store(OUT + row * stride_o + cols, _silu_times(GU + row * stride_gu, cols, ok, I, OUT.dtype.element_ty),
                 mask=ok)

    @_source()
    def _silu_times(GU_ROW, cols, ok, I, DT: tl.constexpr):
        """silu(gate) * up at ``cols`` of one fused [gate | up] row, rounded where torch rounds (SiLU's
        output, then the product)."""
        g = tl.load(GU_ROW + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(GU_ROW + I + cols, mask=ok, other=0.0).to(tl.float32)
        s = _round(g / (1.0 + tl.exp(-g)), DT).to(tl.float32)
        return _round(s * u, DT)

    @_source()
    def _silu_mul_fp8_kernel(GU, ROUND, Q, SCALE, SOUT, I, stride_gu, stride_q, DYNAMIC: tl.constexpr,
                             BLOCK: tl.constexpr):
        """silu(gate) * up written as the down projection's e4m3 input (FP8Linear's quantization fused
        in, same bits): static SCALE, or (DYNAMIC, BLOCK covering the row) amax * (1/448) to SOUT."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < I
        h = _silu_times(GU + row * stride_gu, cols, ok, I, ROUND.dtype.element_ty).to(tl.float32)
        _quantize_row(h, Q + row * stride_q, SCALE, SOUT + row, cols, ok, DYNAMIC)

    @_source(do_not_specialize=["T", "t_begin", "n_rows", "A", "stride_mt", "stride_at"])
    def _attn_split_kernel(Q, KC, VC, PREFIX, MASK, ANC, PO, PM, PL, T, t_begin, n_rows, S, R_pad, A, qk_scale,
                           stride_qt, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs, stride_mt,
                           stride_at, G: tl.constexpr, D: tl.constexpr, NS: tl.constexpr, SPLIT: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
                           MODE: tl.constexpr, DOT_F32: tl.constexpr, EARLY_V: tl.constexpr):
        """One (KV split, row tile) of one KV head (program id 1): online softmax over slots
        [split*SPLIT, ...) below prefix+T, partial (max, sum, unnormalised output) per row to PM/PL/PO.
        Program id 0 is flat: the first NS * tiles programs are (split, row tile) pairs.

        MODE 0 (prefill chunks): every split, row tiles shared by tokens, ``MASK`` (HAS_MASK) or
        causal visibility of the new slots.

        MODE 1 (decode and tree steps) runs two passes in *one launch of one compiled kernel*; the
        program id picks the pass at run time. The main pass: shared row tiles over the splits
        wholly below the prefix (committed keys, the same for every token). The tail pass (the 2*T
        programs after the main ones: split offset, token): one token per program over the splits
        that hold new slots, reading its keys in
        *its own sequence order*: virtual slot prefix+k is the token's depth-k ancestor
        (``ANC[t, k]``, -1 past its depth). So a tree node at depth d reduces exactly the keys, in
        exactly the positions and blocks, that plain decoding reduces for the same token at slot
        prefix+d after its ancestors were committed, whichever pass a split falls to in either
        step. Why one compiled kernel: two constexpr variants of the same source may compile to
        different instruction sequences (FMA contraction, reduction layouts); a single binary
        whose passes differ only in runtime indices cannot. For the same reason nothing a step
        passes may differ in a specialised argument (the ancestor table is always given; its
        stride is not specialised). A split or block a row cannot see adds exact zeros.

        DOT_F32 (interpreter only, which multiplies bf16 bit patterns as integers): feed the dots
        fp32 copies of the operands, the same values since bf16 -> fp32 is exact. EARLY_V issues a
        block's V load beside its K load (both wait on the same slot indices) rather than after
        the softmax: the same values, one memory round trip less per block, more live registers."""
        kvh = tl.program_id(1)
        pid = tl.program_id(0)
        prefix = tl.load(PREFIX).to(tl.int32)
        end = tl.minimum(prefix + T, S)
        tiles = (n_rows + BLOCK_M - 1) // BLOCK_M
        n_main = NS * tiles
        if MODE == 1:
            tail = pid >= n_main
        else:
            tail = pid < 0  # prefill: never a tail pass
        tq = tl.maximum(pid - n_main, 0)  # a tail program's (split offset, token) = divmod(tq, T)
        split = tl.where(tail, prefix // SPLIT + tq // T, pid // tiles)
        lo = split * SPLIT
        if MODE == 1:
            active = tl.where(tail, lo < end, lo + SPLIT <= prefix)
        else:
            active = lo < end
        if active:
            row0 = tl.where(tail, (tq % T) * G, (pid % tiles) * BLOCK_M)
            rows = row0 + tl.arange(0, BLOCK_M)
            row_ok = rows < tl.where(tail, row0 + G, n_rows)
            tok = t_begin + rows // G
            me = t_begin + tq % T  # the tail pass's token
            d = tl.arange(0, D)
            q = tl.load(Q + tok[:, None] * stride_qt + (kvh * G + rows % G)[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None], other=0.0)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.full([BLOCK_M], 0.0, tl.float32)
            acc = tl.full([BLOCK_M, D], 0.0, tl.float32)
            seq_end = end
            if MODE == 1:
                if tail:  # no token's own sequence reaches past prefix + A (the longest path)
                    seq_end = tl.minimum(end, prefix + A)
            # A block past a row's own sequence (all its keys masked) adds exact zeros: the running
            # max stays, so alpha is 1 by construction (the select below), and p = exp2(-inf) = 0;
            # l and acc keep their bits (acc * 1 + 0 . v, v's masked rows loaded as 0). So the tail pass
            # bounds its blocks by the longest path rather than counting this token's ancestors
            # first (a dependent load ahead of every tail program's loop); its second split may run
            # no block at all and store the empty partial, which is what a masked block leaves too.
            hi = tl.minimum(lo + SPLIT, seq_end)
            for start in range(lo, hi, BLOCK_N):
                n = start + tl.arange(0, BLOCK_N)
                n_ok = n < hi
                rel = n - prefix
                if MODE == 1:  # committed keys (rel < 0) are everyone's; new ones through ANC
                    anc = tl.load(ANC + me * stride_at + rel, mask=(rel >= 0) & (rel < A) & n_ok & tail, other=-1)
                    key_vis = ((rel < 0) | (anc >= 0)) & n_ok
                    phys = tl.where(rel < 0, n, prefix + anc)
                else:
                    key_vis = n_ok
                    phys = n
                k = tl.load(KC + kvh * stride_kh + phys[:, None] * stride_ks + d[None, :],
                            mask=key_vis[:, None], other=0.0)
                v_ptrs = VC + kvh * stride_vh + phys[:, None] * stride_vs + d[None, :]
                if EARLY_V:
                    v_early = tl.load(v_ptrs, mask=key_vis[:, None], other=0.0)
                if DOT_F32:
                    s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * qk_scale
                else:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
                if MODE == 1:
                    vis = key_vis[None, :] & row_ok[:, None]
                else:
                    new = (rel >= 0) & n_ok
                    if HAS_MASK:
                        allowed = tl.load(MASK + tok[:, None] * stride_mt + rel[None, :],
                                          mask=row_ok[:, None] & new[None, :], other=0) != 0
                    else:
                        allowed = rel[None, :] <= tok[:, None]
                    vis = (rel < 0)[None, :] | (new[None, :] & allowed)
                s = tl.where(vis, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.reduce(s, 1, _max))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                # exactly 1 where the max stands (a masked block), not whatever exp2(0) gives
                alpha = tl.where(m_new == m_i, 1.0, tl.exp2(m_i - m_use))
                p = tl.exp2(s - m_use[:, None])
                l_i = l_i * alpha + tl.reduce(p, 1, _add)
                if EARLY_V:
                    v = v_early
                else:
                    v = tl.load(v_ptrs, mask=key_vis[:, None], other=0.0)
                p = _round(p, v.dtype)
                if DOT_F32:
                    p, v = p.to(tl.float32), v.to(tl.float32)
                acc = tl.dot(p, v, acc * alpha[:, None], input_precision="ieee")
                m_i = m_new
            base = (kvh * NS + split) * R_pad + rows
            tl.store(PM + base, m_i, mask=row_ok)
            tl.store(PL + base, l_i, mask=row_ok)
            tl.store(PO + base[:, None] * D + d[None, :], acc, mask=row_ok[:, None])

    @_source(do_not_specialize=["T", "t_begin", "n_rows"])
    def _attn_combine_kernel(PO, PM, PL, OUT, PREFIX, T, t_begin, n_rows, S, R_pad, stride_ot, stride_oh,
                             G: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, NS: tl.constexpr,
                             NS_BLOCK: tl.constexpr, SPLIT: tl.constexpr):
        """ROWS query rows of one KV head: merge each row's active splits in one fixed order.

        A [ROWS, splits, D] tile per program: one row per program made a tree step of the
        Llama-3-8B shape 2048 programs of a few hundred flops each (``AttentionConfig.combine_rows``).
        Every row of a tile goes through the same element-wise ops and the same per-row reduction,
        so a row's bits do not depend on which rows share its program, or on T."""
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        kvh = tl.program_id(1)
        prefix = tl.load(PREFIX).to(tl.int32)
        n_active = (tl.minimum(prefix + T, S) + SPLIT - 1) // SPLIT
        sp = tl.arange(0, NS_BLOCK)
        row_ok = r < n_rows
        ok = row_ok[:, None] & (sp[None, :] < n_active)
        base = (kvh * NS + sp[None, :]) * R_pad + r[:, None]
        m = tl.load(PM + base, mask=ok, other=float("-inf"))
        l = tl.load(PL + base, mask=ok, other=0.0)
        m_max = tl.reduce(m, 1, _max)
        w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max)[:, None])
        d = tl.arange(0, D)
        o = tl.load(PO + base[:, :, None] * D + d[None, None, :], mask=ok[:, :, None], other=0.0)
        out = tl.reduce(w[:, :, None] * o, 1, _add) / tl.reduce(w * l, 1, _add)[:, None]
        tok = t_begin + r // G
        tl.store(OUT + (tok * stride_ot + (kvh * G + r % G) * stride_oh)[:, None] + d[None, :],
                 _round(out, OUT.dtype.element_ty), mask=row_ok[:, None])

    @_source()
    def _min(a, b):
        return tl.minimum(a, b)

    @_source(do_not_specialize=["V"])
    def _row_argmax_kernel(X, OUT, V, stride_x, BLOCK: tl.constexpr):
        """argmax of one row (any float dtype, compared in fp32), first index on ties (torch.argmax's rule)."""
        row = tl.program_id(0)
        best_v = tl.full([1], float("-inf"), tl.float32)
        best_i = tl.full([1], 0, tl.int64)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(X + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m = tl.reduce(x, 0, _max)
            i = tl.reduce(tl.where(x == m, cols, V), 0, _min).to(tl.int64)
            take = m > best_v  # strict: an equal value in a later block never wins
            best_i = tl.where(take, i, best_i)
            best_v = tl.where(take, m, best_v)
        tl.store(OUT + row + tl.arange(0, 1), best_i)

    @_source(do_not_specialize=["V"])
    def _topk_partial_kernel(X, VAL, IDX, V, stride_x, K: tl.constexpr, KB: tl.constexpr, BLOCK: tl.constexpr):
        """Top-K of one BLOCK-wide chunk of a row (program ids: row, chunk), largest first, lowest
        index first among equals: K rounds of max + first-index + knock-out, all in registers."""
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        cols = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + row * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        out = (row * tl.num_programs(1) + chunk) * KB
        for k in range(K):
            m = tl.reduce(x, 0, _max)
            i = tl.reduce(tl.where(x == m, cols, 2147483647), 0, _min)
            tl.store(VAL + out + k + tl.arange(0, 1), tl.full([1], 0.0, tl.float32) + m)
            tl.store(IDX + out + k + tl.arange(0, 1), tl.full([1], 0, tl.int32) + i)
            x = tl.where(cols == i, float("-inf"), x)

    @_source(do_not_specialize=["C"])
    def _topk_merge_kernel(VAL, IDX, OUT, C, K: tl.constexpr, KB: tl.constexpr, CB: tl.constexpr):
        """Merge one row's C chunk results (C*KB candidates) into its top-K indices (int64)."""
        row = tl.program_id(0)
        j = tl.arange(0, CB)
        ok = ((j % KB) < K) & (j < C * KB)
        v = tl.load(VAL + row * C * KB + j, mask=ok, other=float("-inf"))
        idx = tl.load(IDX + row * C * KB + j, mask=ok, other=2147483647)
        for k in range(K):
            m = tl.reduce(v, 0, _max)
            i = tl.reduce(tl.where(v == m, idx, 2147483647), 0, _min)
            tl.store(OUT + row * K + k + tl.arange(0, 1), tl.full([1], 0, tl.int64) + i)
            v = tl.where(idx == i, float("-inf"), v)

    @_source(do_not_specialize=["H"])
    def _heads_resblock_kernel(X, ROW, W, B, OUT, H, stride_xk, stride_xr, stride_wk, stride_wn, stride_bk,
                               stride_ok, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One (head, output block) of a Medusa residual block at one position, out = x + SiLU(W x + b),
        x = row ROW[0] of X (stride_xk 0: all heads read the base's hidden state). The gather of the
        row, the GEMV, the bias, SiLU and the residual in one launch, rounded where torch rounds."""
        head = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < H
        x_row = X + head * stride_xk + tl.load(ROW) * stride_xr
        acc = tl.full([BLOCK_N], 0.0, tl.float32)
        for k0 in range(0, H, BLOCK_K):
            c = k0 + tl.arange(0, BLOCK_K)
            c_ok = c < H
            x = tl.load(x_row + c, mask=c_ok, other=0.0).to(tl.float32)
            w = tl.load(W + head * stride_wk + n[:, None] * stride_wn + c[None, :],
                        mask=n_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.reduce(w * x[None, :], 1, _add)
        DT = OUT.dtype.element_ty
        y = _round(acc + tl.load(B + head * stride_bk + n, mask=n_ok, other=0.0).to(tl.float32), DT).to(tl.float32)
        act = _round(y / (1.0 + tl.exp(-y)), DT).to(tl.float32)
        res = tl.load(x_row + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(OUT + head * stride_ok + n, _round(res + act, DT), mask=n_ok)

    @_source(do_not_specialize=["N"])
    def _quantize_fp8_kernel(X, SCALE, Q, SOUT, N, stride_x, stride_q, DYNAMIC: tl.constexpr, BLOCK: tl.constexpr):
        """One row of FP8Linear's activation quantization, clamp(x / s, +-448) -> e4m3 with s the
        static input scale or (DYNAMIC) amax(|x|) * (1 / 448) per row: one launch instead of four, and
        the same bits as the PyTorch ops (an IEEE division by the scale, max is order free, round to nearest even
        done by hand in fp32 so the final cast is exact; the interpreter's own e4m3 cast is not)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        _quantize_row(x, Q + row * stride_q, SCALE, SOUT + row, cols, ok, DYNAMIC)

    @_source(do_not_specialize=["W"])
    def _move_kv_kernel(KV, SRC, DST, W, stride_row, stride_s, WB: tl.constexpr, D: tl.constexpr):
        """Cache entries SRC[j] -> DST[j] of one (layer, k/v, batch, KV head) row of the cache: all
        W entries are read before any is written (a path's later source slot may be an earlier
        destination), so the barrier between the loads and the stores is what makes it a move."""
        r = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, WB)
        ok = j < W
        src = tl.load(SRC + j, mask=ok, other=0)
        dst = tl.load(DST + j, mask=ok, other=0)
        d = tl.arange(0, D)
        base = KV + r * stride_row
        x = tl.load(base + src[:, None] * stride_s + d[None, :], mask=ok[:, None], other=0.0)
        tl.debug_barrier()
        tl.store(base + dst[:, None] * stride_s + d[None, :], x, mask=ok[:, None])

    @_source(do_not_specialize=["N"])
    def _tree_inputs_kernel(ROOT, TOPK, TIDX, DEPTH, CUR, TOKENS, POSITIONS, SLOTS, N, NB: tl.constexpr):
        """The tree step's inputs in one launch: node tokens cat([root, topk.flatten()])[tree_indices],
        RoPE positions cur + depth and cache slots cur + node."""
        n = tl.arange(0, NB)
        ok = n < N
        t = tl.load(TIDX + n, mask=ok, other=0)
        tok = tl.where(t == 0, tl.load(ROOT + n * 0, mask=ok, other=0), tl.load(TOPK + t - 1, mask=ok & (t > 0), other=0))
        cur = tl.load(CUR + n * 0, mask=ok, other=0)
        tl.store(TOKENS + n, tok, mask=ok)
        tl.store(POSITIONS + n, cur + tl.load(DEPTH + n, mask=ok, other=0), mask=ok)
        tl.store(SLOTS + n, cur + n, mask=ok)

    @_source()
    def _plain_commit_kernel(PRED, ROOT, STEP_OUT, CUR):
        """A plain greedy step's bookkeeping in one launch: root = the argmax, step_out = [1, root],
        committed length + 1."""
        i = tl.arange(0, 1)
        tok = tl.load(PRED + i)
        tl.store(ROOT + i, tok)
        tl.store(STEP_OUT + i, tl.full([1], 1, tl.int64))
        tl.store(STEP_OUT + 1 + i, tok)
        tl.store(CUR + i, tl.load(CUR + i) + 1)

    @_source(do_not_specialize=["P", "W"])
    def _greedy_commit_kernel(PRED, TOK, RET, VALID, CUR, STEP_OUT, ROOT, LAST, SRC, DST, P, W, stride_r,
                              PB: tl.constexpr, WB: tl.constexpr):
        """One program: greedy acceptance over the tree's paths and the step's bookkeeping.

        The same results as ``acceptance.greedy_accept`` + ``acceptance.commit_path`` (the CPU
        path and the reference): a draft is accepted iff it equals the argmax at its parent, the
        longest run wins, first path on ties."""
        p = tl.arange(0, PB)[:, None]
        w = tl.arange(0, WB)[None, :]
        ok = (p < P) & (w < W)
        ret = tl.load(RET + p * stride_r + w, mask=ok, other=0)
        valid = tl.load(VALID + p * stride_r + w, mask=ok, other=0) != 0
        tok = tl.load(TOK + ret, mask=ok, other=-1)
        prev = tl.load(RET + p * stride_r + w - 1, mask=ok & (w >= 1), other=0)
        pred_prev = tl.load(PRED + prev, mask=ok & (w >= 1), other=-2)
        miss = (w >= 1) & (w < W) & ~((tok == pred_prev) & valid)
        accepted = tl.reduce(tl.where(miss, w, W), 1, _min) - 1  # [PB]: leading matches of each path
        pp = tl.arange(0, PB)
        accepted = tl.where(pp < P, accepted, -1)
        a = tl.reduce(accepted, 0, _max)
        best = tl.reduce(tl.where(accepted == a, pp, PB), 0, _min)
        j = tl.arange(0, WB)
        j_ok = j < W
        nodes = tl.load(RET + best * stride_r + j, mask=j_ok, other=0)
        last = tl.reduce(tl.where(j == a, nodes, 0), 0, _add)
        root = tl.load(PRED + last)  # the base's greedy token after the last accepted node
        nxt = tl.load(RET + best * stride_r + j + 1, mask=j + 1 < W, other=0)
        drafts = tl.load(TOK + nxt, mask=j + 1 < W, other=0)
        new = tl.where((j == a) | (j + 1 >= W), root, drafts)
        cur = tl.load(CUR)
        tl.store(STEP_OUT, (a + 1).to(tl.int64))
        tl.store(STEP_OUT + 1 + j, new.to(tl.int64), mask=j_ok)
        tl.store(SRC + j, (cur + nodes).to(tl.int64), mask=j_ok)
        tl.store(DST + j, (cur + j).to(tl.int64), mask=j_ok)
        tl.store(ROOT, root.to(tl.int64))
        tl.store(LAST, last.to(tl.int64))
        tl.store(CUR, (cur + a + 1).to(tl.int64))


# ================================================================================== Triton launchers
def _rows(x: Tensor) -> Tensor:
    """x as [rows, last] with a unit last stride (a view when possible)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(-1, x.shape[-1])


def _norm_warps(block: int) -> int:
    return 4 if block <= 2048 else 8


def _fp8_outputs(M: int, N: int, input_scale: Tensor | None, device) -> tuple[Tensor, Tensor]:
    """(e4m3 rows [M, N], scale) buffers of a launch that quantizes activations: the static 0-d
    ``input_scale`` itself, or per-row dynamic scales [M, 1] that the launch writes."""
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn, device=device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=device) if input_scale is None else input_scale
    return q, scale


def _quant_warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def _rms_norm_launch(x: Tensor, weight: Tensor, eps: float, delta: Tensor | None, fp8: bool,
                     input_scale: Tensor | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The one launcher of ``_rms_norm_kernel``: (normalised rows [M, N], or their e4m3 bytes when
    ``fp8``; the fp8 scale or None; the residual x + delta or None)."""
    x2 = _rows(x)
    M, N = x2.shape
    res_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
    out = torch.empty(1 if fp8 else M, N, dtype=torch.promote_types(res_dtype, weight.dtype), device=x.device)
    q, scale = _fp8_outputs(M, N, input_scale, x.device) if fp8 else (out, out)
    src, d2, res = x2, x2, x2
    if delta is not None:
        d2 = _rows(delta)
        res = torch.empty(x2.shape, dtype=res_dtype, device=x.device)
        # The normalised row is rounded to the residual's dtype (X's element type in the kernel).
        src = x2 if x2.dtype == res_dtype else x2.to(res_dtype)
    block = triton.next_power_of_2(N)
    _kernel("_rms_norm_kernel")[(M,)](
        src, d2, weight, out, res, q, scale, scale, src.stride(0), d2.stride(0), 0 if fp8 else out.stride(0),
        res.stride(0), q.stride(0) if fp8 else 0, N, eps, HAS_DELTA=delta is not None, QUANT=fp8,
        DYNAMIC=fp8 and input_scale is None, BLOCK=block, num_warps=_norm_warps(block))
    shape = (*x.shape[:-1], N)
    return (q if fp8 else out.view(shape)), (scale if fp8 else None), (None if delta is None else res.view(shape))


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _rms_norm_launch(x, weight, eps, None, fp8=False)[0]


def add_rms_norm_triton(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    out, _, res = _rms_norm_launch(x, weight, eps, delta, fp8=False)
    return out, res


def rms_norm_fp8_triton(x: Tensor, weight: Tensor, eps: float, input_scale: Tensor | None,
                        delta: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """(e4m3 q [M, N], scale, residual x + delta or None): rms_norm(x [+ delta]) quantized as
    ``quantize_fp8_triton`` would quantize it (static ``input_scale``, or per-row dynamic scales
    [M, 1] when None), in one launch: the norm's output never reaches memory in bf16 (the kernel
    reads only the dtype of its 1-row ``out``, the rounding the unfused norm would store)."""
    return _rms_norm_launch(x, weight, eps, delta, fp8=True, input_scale=input_scale)


def rope_qkv_to_cache_triton(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                             n_heads: int, n_kv: int, head_dim: int, positions: Tensor | None = None) -> Tensor:
    B, T, W = qkv.shape
    assert W == (n_heads + 2 * n_kv) * head_dim, "qkv is not the fused [q | k | v] projection"
    if positions is None:  # cos/sin are already per token
        positions = torch.arange(T, device=qkv.device)
    qkv = qkv if qkv.is_contiguous() else qkv.contiguous()
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = torch.empty(B, T, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _kernel("_rope_qkv_kernel")[(B * T, n_heads + 2 * n_kv)](
        qkv, cos, sin, positions, k_cache, v_cache, slots, q, T, qkv.stride(1), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        H=n_heads, KV=n_kv, D=head_dim, num_warps=1 if head_dim <= 64 else 2)
    return q


def silu_mul_triton(gate_up: Tensor) -> Tensor:
    g2 = _rows(gate_up)
    inter = g2.shape[1] // 2
    out = torch.empty(g2.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    _kernel("_silu_mul_kernel")[(g2.shape[0], triton.cdiv(inter, block))](
        g2, out, inter, g2.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out.view(*gate_up.shape[:-1], inter)


def silu_mul_fp8_triton(gate_up: Tensor, input_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """(e4m3 q [M, I], scale) of silu_mul(gate_up) as ``quantize_fp8_triton`` would quantize it, in
    one launch (per-row dynamic scales need the whole row in one program; a static scale does not)."""
    g2 = _rows(gate_up)
    M, inter = g2.shape[0], g2.shape[1] // 2
    q, scale = _fp8_outputs(M, inter, input_scale, gate_up.device)
    dynamic = input_scale is None
    block = triton.next_power_of_2(inter) if dynamic else min(1024, triton.next_power_of_2(inter))
    rounding = torch.empty(1, dtype=gate_up.dtype, device=gate_up.device)  # silu_mul's output dtype
    _kernel("_silu_mul_fp8_kernel")[(M, triton.cdiv(inter, block))](
        g2, rounding, q, scale, scale, inter, g2.stride(0), q.stride(0), DYNAMIC=dynamic, BLOCK=block,
        num_warps=_quant_warps(block))
    return q, scale


def ancestor_table(tree_mask: Tensor) -> Tensor:
    """[T, T] int32: row i lists node i's ancestors and itself in increasing node (= depth) order,
    then -1. Node indices grow with depth along every path (trees are sorted by path length)."""
    T = tree_mask.shape[0]
    idx = torch.arange(T, device=tree_mask.device, dtype=torch.int32)
    order = torch.where(tree_mask, idx, T).sort(dim=1).values
    return torch.where(order < T, order, -1).to(torch.int32).contiguous()


_CAUSAL_ANCESTORS: dict[tuple[int, str], Tensor] = {}


def causal_ancestors(T: int, device: torch.device) -> Tensor:
    """The ancestor table of T causal tokens (row i: 0..i, then -1), made once per (T, device).

    Plain decoding (T=1) passes this where a tree step passes its tree's table, so both launch the
    same compiled attention kernel. Made on first use, i.e. in a CUDA graph's warm-up, not its capture."""
    key = (T, str(device))
    if key not in _CAUSAL_ANCESTORS:
        idx = torch.arange(T, device=device, dtype=torch.int32)
        _CAUSAL_ANCESTORS[key] = torch.where(idx[None, :] <= idx[:, None], idx[None, :], -1).to(torch.int32)
    return _CAUSAL_ANCESTORS[key]


def cache_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor,
                           tree_mask: Tensor | None = None, config: AttentionConfig | None = None,
                           tree_ancestors: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """Decode and tree steps (T <= split) run the split kernel's MODE 1 (both passes), so every row
    equals plain sequential decoding bit for bit; longer prefills run MODE 0 in token chunks."""
    T, H, D = q.shape
    n_kv, S, _ = k_cache.shape
    G = H // n_kv
    config = config or attention_config(G, D)
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if tree_mask is not None:
        assert tree_mask.shape == (T, T), f"tree_mask must be [{T}, {T}], got {tuple(tree_mask.shape)}"
        if tree_ancestors is None:
            tree_ancestors = ancestor_table(tree_mask)
        tree_mask = tree_mask.contiguous().view(torch.uint8)
    ns = triton.cdiv(S, config.split)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(-1) == 1, "out must be [T, H, D] with unit stride in D"
    chunk = max(1, min(T, config.max_scratch_bytes // (n_kv * ns * G * D * 4)))
    sequential = T <= config.split and chunk >= T and G <= config.block_m
    if sequential:  # decode/tree steps: always an ancestor table (causal when no tree), never the mask
        anc = tree_ancestors if tree_ancestors is not None else causal_ancestors(T, q.device)
        mask = prefix_len
    else:
        mask = tree_mask if tree_mask is not None else prefix_len
        anc = prefix_len
    split_kernel = _kernel("_attn_split_kernel")
    ns_block = triton.next_power_of_2(ns)
    combine_warps = min(16, max(4, config.combine_rows * ns_block * D // 2048))  # ~64 fp32 partials a thread
    for t0 in range(0, T, chunk):
        n_rows = min(chunk, T - t0) * G
        tiles = triton.cdiv(n_rows, config.block_m)
        r_pad = tiles * config.block_m
        po = torch.empty(n_kv, ns, r_pad, D, dtype=torch.float32, device=q.device)
        pm = torch.empty(n_kv, ns, r_pad, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        args = (q, k_cache, v_cache, prefix_len, mask, anc, po, pm, pl, T, t0, n_rows, S, r_pad,
                anc.shape[-1] if sequential else 0)
        strides = (LOG2E / math.sqrt(D), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
                   v_cache.stride(0), v_cache.stride(1), mask.stride(0) if mask.dim() == 2 else 0,
                   anc.stride(0) if sequential else 0)
        meta = dict(G=G, D=D, NS=ns, SPLIT=config.split, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                    HAS_MASK=tree_mask is not None and not sequential,
                    DOT_F32=_interpreted and q.dtype != torch.float32, EARLY_V=config.early_v,
                    num_warps=config.num_warps)
        if sequential:  # one launch: the splits below the prefix shared by all tokens + each token's own tail
            split_kernel[(ns * tiles + 2 * T, n_kv)](*args, *strides, MODE=1, **meta)
        else:
            split_kernel[(ns * tiles, n_kv)](*args, *strides, MODE=0, **meta)
        _kernel("_attn_combine_kernel")[(triton.cdiv(n_rows, config.combine_rows), n_kv)](
            po, pm, pl, out, prefix_len, T, t0, n_rows, S, r_pad, out.stride(0), out.stride(1),
            G=G, ROWS=config.combine_rows, D=D, NS=ns, NS_BLOCK=ns_block, SPLIT=config.split,
            num_warps=combine_warps)
    return out


ROW_CHUNK = 4096  # vocab entries one program of the argmax / top-k kernels reduces in registers
TOPK_MIN_CHUNK = 1024


def row_argmax_triton(x: Tensor) -> Tensor:
    """torch.argmax(x, -1) of a [R, V] matrix with unit column stride (fp32 or bf16 logits: no
    fp32 copy needed), one program per row."""
    R, V = x.shape
    if V > 2 * ROW_CHUNK:  # a long row (Llama-3's 128k vocab): chunks in parallel, then merge (top-1)
        return topk_indices_triton(x, 1)[:, 0]
    out = torch.empty(R, dtype=torch.long, device=x.device)
    _kernel("_row_argmax_kernel")[(R,)](x, out, V, x.stride(0), BLOCK=min(ROW_CHUNK, triton.next_power_of_2(V)),
                                        num_warps=8)
    return out


def topk_indices_triton(x: Tensor, k: int, out: Tensor | None = None) -> Tensor:
    """torch.topk(x, k).indices of [R, V] rows in two launches (chunk top-k, then merge); ties go
    to the lower index. torch.topk's sort-based kernels cost ~30 us for 5 x 8192 on an H100.
    ``out`` (contiguous int64 [R, k]) receives the indices in place, saving a copy launch."""
    R, V = x.shape
    # >= 32 chunks or 1024-wide ones: K rounds over a chunk are serial, so narrow chunks in
    # parallel beat wide ones (5 x 8192 logits: 8 chunks per row)
    block = min(ROW_CHUNK, triton.next_power_of_2(V), max(TOPK_MIN_CHUNK, triton.next_power_of_2(triton.cdiv(V, 32))))
    chunks = triton.cdiv(V, block)
    kb = triton.next_power_of_2(k)
    val = torch.empty(R, chunks, kb, dtype=torch.float32, device=x.device)
    idx = torch.empty(R, chunks, kb, dtype=torch.int32, device=x.device)
    if out is None:
        out = torch.empty(R, k, dtype=torch.long, device=x.device)
    assert out.shape == (R, k) and out.dtype == torch.long and out.is_contiguous()
    _kernel("_topk_partial_kernel")[(R, chunks)](x, val, idx, V, x.stride(0), K=k, KB=kb, BLOCK=block,
                                                  num_warps=8 if block >= ROW_CHUNK else 4)
    _kernel("_topk_merge_kernel")[(R,)](val, idx, out, chunks, K=k, KB=kb,
                                         CB=triton.next_power_of_2(chunks * kb), num_warps=4)
    return out


def topk_indices(x: Tensor, k: int, out: Tensor | None = None) -> Tensor:
    """Indices of the k largest entries of each row of x [R, V], largest first (into ``out`` if given)."""
    if use_triton(x) and x.stride(-1) == 1:
        return topk_indices_triton(x, k, out)
    idx = torch.topk(x, k, dim=-1).indices
    return idx if out is None else out.copy_(idx)


def heads_resblocks_triton(x: Tensor, row: Tensor, res_weight: Tensor, res_bias: Tensor) -> Tensor:
    """Features [K, H] of K Medusa heads at row ``row`` (1-element int64 device tensor) of x [N, H]:
    one launch per residual layer (res_weight [K, L, H, H], res_bias [K, L, H]) instead of a
    gather, a baddbmm, SiLU and an add."""
    K, L, H, _ = res_weight.shape
    assert x.stride(-1) == 1 and res_weight.stride(-1) == 1 and res_bias.stride(-1) == 1
    block_n, block_k = 16, min(256, triton.next_power_of_2(H))
    h, stride_xk, stride_xr = x, 0, x.stride(0)
    for j in range(L):
        out = torch.empty(K, H, dtype=x.dtype, device=x.device)
        w, b = res_weight[:, j], res_bias[:, j]
        _kernel("_heads_resblock_kernel")[(K, triton.cdiv(H, block_n))](
            h, row, w, b, out, H, stride_xk, stride_xr, w.stride(0), w.stride(1), b.stride(0), out.stride(0),
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
        h, stride_xk, stride_xr = out, out.stride(0), 0
    return h


def quantize_fp8_triton(x: Tensor, input_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """(e4m3 x, scale) of x [M, K] for ``torch._scaled_mm``: the static 0-d ``input_scale``, or
    per-row dynamic scales [M, 1] when it is None. Bit-equal to FP8Linear's PyTorch ops."""
    M, N = x.shape
    q, scale = _fp8_outputs(M, N, input_scale, x.device)
    block = triton.next_power_of_2(N)
    _kernel("_quantize_fp8_kernel")[(M,)](x, scale, q, scale, N, x.stride(0), q.stride(0),
                                          DYNAMIC=input_scale is None, BLOCK=block, num_warps=_quant_warps(block))
    return q, scale


def move_kv_triton(kv: Tensor, src: Tensor, dst: Tensor) -> None:
    """kv [..., S, D] (contiguous; the model-wide cache): entries src -> dst in every leading row,
    one launch instead of torch's index_select + index_copy_."""
    S, D = kv.shape[-2:]
    rows = kv.numel() // (S * D)
    W = src.shape[0]
    _kernel("_move_kv_kernel")[(rows,)](kv, src, dst, W, S * D, D, WB=triton.next_power_of_2(W), D=D,
                                        num_warps=1 if W * D <= 1024 else 4)


def tree_inputs_triton(root: Tensor, head_topk: Tensor, tree_indices: Tensor, depth: Tensor,
                       cur_len: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    n = tree_indices.shape[0]
    tokens, positions, slots = (torch.empty(n, dtype=torch.long, device=root.device) for _ in range(3))
    _kernel("_tree_inputs_kernel")[(1,)](root, head_topk.contiguous(), tree_indices, depth, cur_len, tokens,
                                         positions, slots, n, NB=triton.next_power_of_2(n), num_warps=1)
    return tokens, positions, slots


def tree_inputs(root: Tensor, head_topk: Tensor, tree_indices: Tensor, depth: Tensor, cur_len: Tensor,
                node_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, positions, slots) of a tree step's nodes: cat([root, topk.flatten()])[tree_indices],
    cur_len + depth, cur_len + node: one kernel on CUDA instead of four."""
    if use_triton(head_topk):
        return tree_inputs_triton(root, head_topk, tree_indices, depth, cur_len)
    return torch.cat([root, head_topk.flatten()])[tree_indices], cur_len + depth, cur_len + node_ids


def greedy_commit_triton(logits: Tensor, tree_tokens: Tensor, path_nodes: Tensor, path_valid: Tensor,
                         cur_len: Tensor, step_out: Tensor, root: Tensor, last: Tensor, src: Tensor,
                         dst: Tensor) -> None:
    """``acceptance.greedy_accept`` + ``acceptance.commit_path`` in two launches instead of ~25."""
    pred = row_argmax_triton(logits)
    P, W = path_nodes.shape
    _kernel("_greedy_commit_kernel")[(1,)](
        pred, tree_tokens, path_nodes, path_valid.view(torch.uint8), cur_len, step_out, root, last, src, dst,
        P, W, path_nodes.stride(0), PB=triton.next_power_of_2(P), WB=triton.next_power_of_2(W), num_warps=4)


def plain_commit(pred: Tensor, root: Tensor, step_out: Tensor, cur_len: Tensor) -> None:
    """After a plain step: root = pred (the argmax [1]), step_out[:2] = [1, root], cur_len += 1."""
    if use_triton(pred):
        _kernel("_plain_commit_kernel")[(1,)](pred, root, step_out, cur_len, num_warps=1)
        return
    root.copy_(pred)
    cur_len.add_(1)
    step_out[0].fill_(1)
    step_out[1:2].copy_(root)


# ================================================================================== public ops
def row_argmax(x: Tensor) -> Tensor:
    """argmax over the last dim of logits [R, V], first index on ties, in the logits' own dtype."""
    return row_argmax_triton(x) if use_triton(x) and x.stride(-1) == 1 else x.argmax(-1)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm_triton(x, weight, eps) if use_triton(x) else rms_norm_ref(x, weight, eps)


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + delta), x + delta): the residual add fused into the next norm."""
    if use_triton(x) and not delta.requires_grad:
        return add_rms_norm_triton(x, delta, weight, eps)
    return add_rms_norm_ref(x, delta, weight, eps)


def rope_qkv_to_cache(qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
                      n_heads: int, n_kv: int, head_dim: int, positions: Tensor | None = None) -> Tensor:
    """Split the fused QKV projection [B, T, (H+2KV)*D], rotate q and k (cos/sin in qkv's dtype:
    [T, D], or whole [S, D] tables read at ``positions`` [T]), write k and v to the caches
    [B, KV, S, D] at ``slots`` [T]; return rotated q [B, T, H, D]."""
    if use_triton(qkv) and head_dim & (head_dim - 1) == 0:
        return rope_qkv_to_cache_triton(qkv, cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim, positions)
    return rope_qkv_to_cache_ref(qkv, cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim, positions)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up, gate being the first half of the last dim."""
    return silu_mul_triton(gate_up) if use_triton(gate_up) else silu_mul_ref(gate_up)


def cache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor,
                    tree_mask: Tensor | None = None, tree_ancestors: Tensor | None = None,
                    out: Tensor | None = None) -> Tensor:
    """Attention of T new tokens q [T, H, D] over one sequence's cache [KV, S, D].

    Token t sees every slot < prefix_len (a 0-d/1-element device tensor, read inside the kernel)
    and the new slots prefix_len+j allowed by ``tree_mask[t, j]`` ([T, T] bool; causal when None).
    The new tokens' K/V must already sit at slots prefix_len..prefix_len+T-1. Returns [T, H, D].
    ``tree_ancestors`` (:func:`ancestor_table` of the mask, precomputed once per tree) saves the
    Triton path from deriving it at every call. ``out`` ([T, H, D], unit stride in D) receives the
    result when given (e.g. the first rows of a padded GEMM input).
    """
    if use_triton(q) and q.shape[-1] & (q.shape[-1] - 1) == 0:
        return cache_attention_triton(q, k_cache, v_cache, prefix_len, tree_mask, tree_ancestors=tree_ancestors,
                                      out=out)
    y = cache_attention_ref(q, k_cache, v_cache, prefix_len, tree_mask)
    return y if out is None else out.copy_(y)

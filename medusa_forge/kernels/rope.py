"""Rotary embedding of the fused QKV projection and the KV-cache write, in one launch."""

from __future__ import annotations

import torch
from torch import Tensor

from medusa_forge.kernels._triton import HAVE_TRITON, _kernel, _source, use_triton

if HAVE_TRITON:
    import triton.language as tl

    from medusa_forge.kernels._triton import _round


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF rotate-half RoPE. x: [..., T, D]; cos/sin broadcastable to x (already in x's dtype)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rope_qkv_to_cache_ref(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    positions: Tensor | None = None,
) -> Tensor:
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


if HAVE_TRITON:

    @_source()
    def _rope_qkv_kernel(
        QKV,
        COS,
        SIN,
        POS,
        KC,
        VC,
        SLOTS,
        QOUT,
        T,
        stride_row,
        stride_cos,
        stride_sin,
        stride_kb,
        stride_kh,
        stride_ks,
        stride_vb,
        stride_vh,
        stride_vs,
        H: tl.constexpr,
        KV: tl.constexpr,
        D: tl.constexpr,
    ):
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


def rope_qkv_to_cache_triton(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    positions: Tensor | None = None,
) -> Tensor:
    B, T, W = qkv.shape
    assert W == (n_heads + 2 * n_kv) * head_dim, "qkv is not the fused [q | k | v] projection"
    if positions is None:  # cos/sin are already per token
        positions = torch.arange(T, device=qkv.device)
    qkv = qkv if qkv.is_contiguous() else qkv.contiguous()
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = torch.empty(B, T, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _kernel("_rope_qkv_kernel")[(B * T, n_heads + 2 * n_kv)](
        qkv,
        cos,
        sin,
        positions,
        k_cache,
        v_cache,
        slots,
        q,
        T,
        qkv.stride(1),
        cos.stride(0),
        sin.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        H=n_heads,
        KV=n_kv,
        D=head_dim,
        num_warps=1 if head_dim <= 64 else 2,
    )
    return q


def rope_qkv_to_cache(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    slots: Tensor,
    n_heads: int,
    n_kv: int,
    head_dim: int,
    positions: Tensor | None = None,
) -> Tensor:
    """Split the fused QKV projection [B, T, (H+2KV)*D], rotate q and k (cos/sin in qkv's dtype:
    [T, D], or whole [S, D] tables read at ``positions`` [T]), write k and v to the caches
    [B, KV, S, D] at ``slots`` [T]; return rotated q [B, T, H, D]."""
    if use_triton(qkv) and head_dim & (head_dim - 1) == 0:
        return rope_qkv_to_cache_triton(qkv, cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim, positions)
    return rope_qkv_to_cache_ref(qkv, cos, sin, k_cache, v_cache, slots, n_heads, n_kv, head_dim, positions)

"""Attention of new tokens over the KV cache: masked SDPA reference, tile config, flash-decoding kernels.

A split kernel (online softmax per KV split, one compiled binary for decode, tree and prefill
steps) and a combine kernel that sums the splits in one fixed order; see ``_attn_split_kernel``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from medusa_forge.kernels import _triton
from medusa_forge.kernels._triton import HAVE_TRITON, _kernel, _source, use_triton
from medusa_forge.kernels.attention_config import (  # noqa: F401 - re-exported with the kernels
    ATTENTION_BY_SHAPE,
    DEFAULT_ATTENTION,
    AttentionConfig,
    ancestor_table,
    attention_config,
    causal_ancestors,
)

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from medusa_forge.kernels._triton import _add, _max, _round


LOG2E = 1.4426950408889634


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


def cache_attention_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_len: Tensor, tree_mask: Tensor | None = None
) -> Tensor:
    mask = cache_mask(prefix_len, tree_mask, q.shape[0], k_cache.shape[1])
    return masked_attention(q[None], k_cache[None], v_cache[None], mask)[0]


if HAVE_TRITON:

    @_source(do_not_specialize=["T", "t_begin", "n_rows", "A", "stride_mt", "stride_at"])
    def _attn_split_kernel(
        Q,
        KC,
        VC,
        PREFIX,
        MASK,
        ANC,
        PO,
        PM,
        PL,
        T,
        t_begin,
        n_rows,
        S,
        R_pad,
        A,
        qk_scale,
        stride_qt,
        stride_qh,
        stride_kh,
        stride_ks,
        stride_vh,
        stride_vs,
        stride_mt,
        stride_at,
        G: tl.constexpr,
        D: tl.constexpr,
        NS: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HAS_MASK: tl.constexpr,
        MODE: tl.constexpr,
        DOT_F32: tl.constexpr,
        EARLY_V: tl.constexpr,
    ):
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
            q = tl.load(
                Q + tok[:, None] * stride_qt + (kvh * G + rows % G)[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None],
                other=0.0,
            )
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.full([BLOCK_M], 0.0, tl.float32)
            acc = tl.full([BLOCK_M, D], 0.0, tl.float32)
            seq_end = end
            if MODE == 1:  # noqa: SIM102 - MODE is a constexpr, tail a runtime value: Triton keeps them apart
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
                k = tl.load(
                    KC + kvh * stride_kh + phys[:, None] * stride_ks + d[None, :], mask=key_vis[:, None], other=0.0
                )
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
                        allowed = (
                            tl.load(
                                MASK + tok[:, None] * stride_mt + rel[None, :],
                                mask=row_ok[:, None] & new[None, :],
                                other=0,
                            )
                            != 0
                        )
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
    def _attn_combine_kernel(
        PO,
        PM,
        PL,
        OUT,
        PREFIX,
        T,
        t_begin,
        n_rows,
        S,
        R_pad,
        stride_ot,
        stride_oh,
        G: tl.constexpr,
        ROWS: tl.constexpr,
        D: tl.constexpr,
        NS: tl.constexpr,
        NS_BLOCK: tl.constexpr,
        SPLIT: tl.constexpr,
    ):
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
        tl.store(
            OUT + (tok * stride_ot + (kvh * G + r % G) * stride_oh)[:, None] + d[None, :],
            _round(out, OUT.dtype.element_ty),
            mask=row_ok[:, None],
        )


def cache_attention_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    prefix_len: Tensor,
    tree_mask: Tensor | None = None,
    config: AttentionConfig | None = None,
    tree_ancestors: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
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
        args = (
            q,
            k_cache,
            v_cache,
            prefix_len,
            mask,
            anc,
            po,
            pm,
            pl,
            T,
            t0,
            n_rows,
            S,
            r_pad,
            anc.shape[-1] if sequential else 0,
        )
        strides = (
            LOG2E / math.sqrt(D),
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            v_cache.stride(0),
            v_cache.stride(1),
            mask.stride(0) if mask.dim() == 2 else 0,
            anc.stride(0) if sequential else 0,
        )
        meta = {
            "G": G,
            "D": D,
            "NS": ns,
            "SPLIT": config.split,
            "BLOCK_M": config.block_m,
            "BLOCK_N": config.block_n,
            "HAS_MASK": tree_mask is not None and not sequential,
            "DOT_F32": _triton._interpreted and q.dtype != torch.float32,
            "EARLY_V": config.early_v,
            "num_warps": config.num_warps,
        }
        if sequential:  # one launch: the splits below the prefix shared by all tokens + each token's own tail
            split_kernel[(ns * tiles + 2 * T, n_kv)](*args, *strides, MODE=1, **meta)
        else:
            split_kernel[(ns * tiles, n_kv)](*args, *strides, MODE=0, **meta)
        _kernel("_attn_combine_kernel")[(triton.cdiv(n_rows, config.combine_rows), n_kv)](
            po,
            pm,
            pl,
            out,
            prefix_len,
            T,
            t0,
            n_rows,
            S,
            r_pad,
            out.stride(0),
            out.stride(1),
            G=G,
            ROWS=config.combine_rows,
            D=D,
            NS=ns,
            NS_BLOCK=ns_block,
            SPLIT=config.split,
            num_warps=combine_warps,
        )
    return out


def cache_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    prefix_len: Tensor,
    tree_mask: Tensor | None = None,
    tree_ancestors: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Attention of T new tokens q [T, H, D] over one sequence's cache [KV, S, D].

    Token t sees every slot < prefix_len (a 0-d/1-element device tensor, read inside the kernel)
    and the new slots prefix_len+j allowed by ``tree_mask[t, j]`` ([T, T] bool; causal when None).
    The new tokens' K/V must already sit at slots prefix_len..prefix_len+T-1. Returns [T, H, D].
    ``tree_ancestors`` (:func:`ancestor_table` of the mask, precomputed once per tree) saves the
    Triton path from deriving it at every call. ``out`` ([T, H, D], unit stride in D) receives the
    result when given (e.g. the first rows of a padded GEMM input).
    """
    if use_triton(q) and q.shape[-1] & (q.shape[-1] - 1) == 0:
        return cache_attention_triton(
            q, k_cache, v_cache, prefix_len, tree_mask, tree_ancestors=tree_ancestors, out=out
        )
    y = cache_attention_ref(q, k_cache, v_cache, prefix_len, tree_mask)
    return y if out is None else out.copy_(y)

"""The Medusa step's bookkeeping on the device: argmax / top-k of logits, the heads' residual blocks,
the tree step's inputs, greedy acceptance + commit, and the accepted path's KV-cache move.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medusa_forge.kernels._triton import HAVE_TRITON, _kernel, _source, use_triton

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from medusa_forge.kernels._triton import _add, _max, _round

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
    def _heads_resblock_kernel(
        X,
        ROW,
        W,
        B,
        OUT,
        H,
        stride_xk,
        stride_xr,
        stride_wk,
        stride_wn,
        stride_bk,
        stride_ok,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
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
            w = tl.load(
                W + head * stride_wk + n[:, None] * stride_wn + c[None, :],
                mask=n_ok[:, None] & c_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.reduce(w * x[None, :], 1, _add)
        DT = OUT.dtype.element_ty
        y = _round(acc + tl.load(B + head * stride_bk + n, mask=n_ok, other=0.0).to(tl.float32), DT).to(tl.float32)
        act = _round(y / (1.0 + tl.exp(-y)), DT).to(tl.float32)
        res = tl.load(x_row + n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(OUT + head * stride_ok + n, _round(res + act, DT), mask=n_ok)

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
        tok = tl.where(
            t == 0, tl.load(ROOT + n * 0, mask=ok, other=0), tl.load(TOPK + t - 1, mask=ok & (t > 0), other=0)
        )
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
    def _greedy_commit_kernel(
        PRED, TOK, RET, VALID, CUR, STEP_OUT, ROOT, LAST, SRC, DST, P, W, stride_r, PB: tl.constexpr, WB: tl.constexpr
    ):
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


ROW_CHUNK = 4096  # vocab entries one program of the argmax / top-k kernels reduces in registers


TOPK_MIN_CHUNK = 1024


def row_argmax_triton(x: Tensor) -> Tensor:
    """torch.argmax(x, -1) of a [R, V] matrix with unit column stride (fp32 or bf16 logits: no
    fp32 copy needed), one program per row."""
    R, V = x.shape
    if V > 2 * ROW_CHUNK:  # a long row (Llama-3's 128k vocab): chunks in parallel, then merge (top-1)
        return topk_indices_triton(x, 1)[:, 0]
    out = torch.empty(R, dtype=torch.long, device=x.device)
    _kernel("_row_argmax_kernel")[(R,)](
        x, out, V, x.stride(0), BLOCK=min(ROW_CHUNK, triton.next_power_of_2(V)), num_warps=8
    )
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
    _kernel("_topk_partial_kernel")[(R, chunks)](
        x, val, idx, V, x.stride(0), K=k, KB=kb, BLOCK=block, num_warps=8 if block >= ROW_CHUNK else 4
    )
    _kernel("_topk_merge_kernel")[(R,)](
        val, idx, out, chunks, K=k, KB=kb, CB=triton.next_power_of_2(chunks * kb), num_warps=4
    )
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
            h,
            row,
            w,
            b,
            out,
            H,
            stride_xk,
            stride_xr,
            w.stride(0),
            w.stride(1),
            b.stride(0),
            out.stride(0),
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            num_warps=4,
        )
        h, stride_xk, stride_xr = out, out.stride(0), 0
    return h


def move_kv_triton(kv: Tensor, src: Tensor, dst: Tensor) -> None:
    """kv [..., S, D] (contiguous; the model-wide cache): entries src -> dst in every leading row,
    one launch instead of torch's index_select + index_copy_."""
    S, D = kv.shape[-2:]
    rows = kv.numel() // (S * D)
    W = src.shape[0]
    _kernel("_move_kv_kernel")[(rows,)](
        kv, src, dst, W, S * D, D, WB=triton.next_power_of_2(W), D=D, num_warps=1 if W * D <= 1024 else 4
    )


def tree_inputs_triton(
    root: Tensor, head_topk: Tensor, tree_indices: Tensor, depth: Tensor, cur_len: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    n = tree_indices.shape[0]
    tokens, positions, slots = (torch.empty(n, dtype=torch.long, device=root.device) for _ in range(3))
    _kernel("_tree_inputs_kernel")[(1,)](
        root,
        head_topk.contiguous(),
        tree_indices,
        depth,
        cur_len,
        tokens,
        positions,
        slots,
        n,
        NB=triton.next_power_of_2(n),
        num_warps=1,
    )
    return tokens, positions, slots


def tree_inputs(
    root: Tensor, head_topk: Tensor, tree_indices: Tensor, depth: Tensor, cur_len: Tensor, node_ids: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, positions, slots) of a tree step's nodes: cat([root, topk.flatten()])[tree_indices],
    cur_len + depth, cur_len + node: one kernel on CUDA instead of four."""
    if use_triton(head_topk):
        return tree_inputs_triton(root, head_topk, tree_indices, depth, cur_len)
    return torch.cat([root, head_topk.flatten()])[tree_indices], cur_len + depth, cur_len + node_ids


def greedy_commit_triton(
    logits: Tensor,
    tree_tokens: Tensor,
    path_nodes: Tensor,
    path_valid: Tensor,
    cur_len: Tensor,
    step_out: Tensor,
    root: Tensor,
    last: Tensor,
    src: Tensor,
    dst: Tensor,
) -> None:
    """``acceptance.greedy_accept`` + ``acceptance.commit_path`` in two launches instead of ~25."""
    pred = row_argmax_triton(logits)
    P, W = path_nodes.shape
    _kernel("_greedy_commit_kernel")[(1,)](
        pred,
        tree_tokens,
        path_nodes,
        path_valid.view(torch.uint8),
        cur_len,
        step_out,
        root,
        last,
        src,
        dst,
        P,
        W,
        path_nodes.stride(0),
        PB=triton.next_power_of_2(P),
        WB=triton.next_power_of_2(W),
        num_warps=4,
    )


def plain_commit(pred: Tensor, root: Tensor, step_out: Tensor, cur_len: Tensor) -> None:
    """After a plain step: root = pred (the argmax [1]), step_out[:2] = [1, root], cur_len += 1."""
    if use_triton(pred):
        _kernel("_plain_commit_kernel")[(1,)](pred, root, step_out, cur_len, num_warps=1)
        return
    root.copy_(pred)
    cur_len.add_(1)
    step_out[0].fill_(1)
    step_out[1:2].copy_(root)


def row_argmax(x: Tensor) -> Tensor:
    """argmax over the last dim of logits [R, V], first index on ties, in the logits' own dtype."""
    return row_argmax_triton(x) if use_triton(x) and x.stride(-1) == 1 else x.argmax(-1)

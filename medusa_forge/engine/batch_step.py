"""One in-flight batching step: every active slot's rows in ONE packed forward.

A :class:`BatchSlots` holds B request slots of one engine: a KV cache row each (static slots:
``[layers, 2, B, kv_heads, max_seq_len, head_dim]``, the model's own layout with a batch of B),
each slot's committed length, pending root token and heads' top-k. A step takes a :class:`Work`
(which slots verify the step's tree, which decode one token, which prefill one chunk), packs
their rows into one sequence of R rows (tree slots first, then plain, then prefill chunks), runs
the decoder once with a packed :class:`StepMeta`, and returns each slot's new tokens.

What a row computes does not depend on its neighbours: every GEMM runs in row chunks whose sizes
the library treats alike (``gemm_rows``, a RowChunks), attention runs per slot over that slot's
own cache, and the remaining ops are row-wise. The per-slot bookkeeping after the forward (greedy acceptance, commit, the K/V moves,
the heads' top-k) is vectorised over slots; only sampled rows and typical acceptance loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from medusa_forge import kernels
from medusa_forge.engine.acceptance import sample_token, typical_accept
from medusa_forge.engine.batch_logits import RowLogits, node_paths
from medusa_forge.model.llama import linear_rows
from medusa_forge.model.packed_gemm import packed_rows
from medusa_forge.model.step_meta import RowChunks, Segment, StepMeta
from medusa_forge.tree.choice_tree import TOPK, TreeBuffers

# MKL (fp32): a row's bits are the same at every M from 2 to 15 (M=1 is a GEMV, M >= 16 other
# kernels), and 8-row GEMMs cost what 2 rows do on pycoder-26m at 2 threads (tested per linear).
CPU_GEMM_ROWS = RowChunks(most=8, least=2)
# CUDA: the M the engine's GEMM-layout check always compares against M=1 (gemm_layout), every chunk.
CUDA_GEMM_ROWS = RowChunks(most=64, least=64)


@dataclass
class Sampling:
    """How one slot picks tokens: greedy (temperature 0), sampled plain decoding (a per-request
    generator), or Medusa typical acceptance (drafts accepted by the posterior, roots greedy)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    medusa: bool = False
    threshold: float = 0.09
    alpha: float = 0.3
    logits: RowLogits | None = None  # processing / returned logits (eager rows), None for most requests

    @property
    def samples(self) -> bool:
        """Plain sampled decoding: a slot's roots are drawn, not argmaxed."""
        return self.temperature > 0 and not self.medusa


@dataclass
class Work:
    """What one step asks of the slots (slot indices; a slot appears in one list at most)."""

    tree_slots: list[int] = field(default_factory=list)
    plain_slots: list[int] = field(default_factory=list)
    prefill: list[tuple[int, list[int], bool]] = field(default_factory=list)  # (slot, chunk ids, last chunk)
    tree: TreeBuffers | None = None
    heads: set[int] = field(default_factory=set)  # slots whose heads' top-k is refreshed by this step
    heads_depth: int = 0  # the first heads refreshed (0: all): a small tree needs only its depth's drafts

    @property
    def rows(self) -> int:
        n = self.tree.tree_indices.shape[0] if self.tree is not None else 0
        return n * len(self.tree_slots) + len(self.plain_slots) + sum(len(c) for _, c, _ in self.prefill)


@dataclass
class Outcome:
    """One slot's share of a step: its new tokens and, for a tree step, the last accepted node."""

    tokens: list[int]
    last_node: int = 0
    tree_step: bool = False


class BatchSlots:
    """B slots' caches and decoding state on the engine's device (see the module docstring)."""

    def __init__(self, engine, max_batch_size: int, gemm_rows: RowChunks | None = None):
        model, cfg = engine.model, engine.cfg
        self.engine, self.model, self.heads = engine, model, engine.heads
        self.device = engine.device
        self.B, self.S = max_batch_size, engine.max_seq_len
        p = model.lm_head.weight
        self.kv = torch.zeros(
            cfg.num_layers, 2, self.B, cfg.num_kv_heads, self.S, cfg.head_dim, dtype=p.dtype, device=self.device
        )
        self.lengths = np.zeros(self.B, dtype=np.int64)  # tokens committed to each slot's cache
        self.root = torch.zeros(self.B, dtype=torch.long, device=self.device)  # each slot's pending token
        self.depth = engine.num_draft_heads
        self.head_topk = torch.zeros(self.B, max(self.depth, 1), TOPK, dtype=torch.long, device=self.device)
        cuda = self.device.type == "cuda"
        self.gemm_rows = gemm_rows or (CUDA_GEMM_ROWS if cuda else packed_rows(model) or CPU_GEMM_ROWS)
        # What docs/batching.md guarantees: bitwise rows on CUDA, fp32 on CPU. A CPU bf16 batch
        # differs from batch-1 in rounding that flips tokens (seen: 30 of 349 soak answers).
        self.batch_invariant = cuda or p.dtype == torch.float32
        self.sampling: list[Sampling] = [Sampling() for _ in range(self.B)]
        self.gqa_group = cfg.num_heads // cfg.num_kv_heads  # query heads per KV head: the mask's repeat

    def reset(self, slot: int, sampling: Sampling) -> None:
        """A new request takes ``slot``: its old cache entries lie past length 0 and are never read."""
        self.lengths[slot] = 0
        self.sampling[slot] = sampling

    @torch.inference_mode()
    def probe(self, rows: int, slots: int, prefix: int = 64) -> None:
        """A packed forward and lm_head over ``rows`` rows spread over ``slots`` slots, each past a
        ``prefix``-token cache: what the cost model times (a tree step's rows cost the same)."""
        per = [rows // slots + (1 if i < rows % slots else 0) for i in range(slots)]
        saved = self.lengths.copy()
        self.lengths[:slots] = max(0, min(prefix, self.S - max(per) - 1))
        try:
            tokens, positions, cache_slots, bidx, segments = self._pack(
                Work(prefill=[(i, [0] * per[i], False) for i in range(slots)])
            )
            meta = StepMeta(
                positions, cache_slots, batch_index=bidx, segments=tuple(segments), kv=self.kv, gemm_rows=self.gemm_rows
            )
            linear_rows(self.model.lm_head, self.model(tokens[None], meta)[0], self.gemm_rows)
            self.engine._sync()  # a CUDA step is timed when it has run, not when it was queued
        finally:
            self.lengths[:] = saved

    @torch.inference_mode()
    def probe_heads(self, slots: int) -> None:
        """Every head's top-k over ``slots`` rows: what a tree step of the full depth adds for its next drafts."""
        hidden = torch.zeros(slots, self.model.config.hidden_size, dtype=self.kv.dtype, device=self.device)
        self._refresh_heads(hidden, {s: s for s in range(slots)})
        self.engine._sync()

    # ------------------------------------------------------------------ the step
    @torch.inference_mode()
    def step(self, work: Work) -> dict[int, Outcome]:
        tokens, positions, slots, bidx, segments = self._pack(work)
        meta = StepMeta(
            positions, slots, batch_index=bidx, segments=tuple(segments), kv=self.kv, gemm_rows=self.gemm_rows
        )
        hidden = self.model(tokens[None], meta)[0]
        n = work.tree.tree_indices.shape[0] if work.tree is not None else 0
        nt, npl = n * len(work.tree_slots), len(work.plain_slots)
        ends = np.cumsum([len(c) for _, c, _ in work.prefill], dtype=np.int64) + nt + npl - 1
        last_rows = [int(e) for e, (_, _, last) in zip(ends, work.prefill) if last]
        rows = torch.cat(
            [torch.arange(nt + npl, device=self.device), torch.tensor(last_rows, dtype=torch.long, device=self.device)]
        )
        logits = linear_rows(self.model.lm_head, hidden.index_select(0, rows), self.gemm_rows)
        out: dict[int, Outcome] = {}
        heads_rows: dict[int, int] = {}
        if nt:
            self._tree_commit(
                work, tree_tokens=tokens[:nt].view(-1, n), logits=logits[:nt], out=out, heads_rows=heads_rows
            )
        plain = list(work.plain_slots) + [s for s, _, last in work.prefill if last]
        if plain:
            self._plain_commit(plain, logits[nt:], out, work.prefill)
            heads_rows.update({s: nt + i for i, s in enumerate(work.plain_slots)})
            heads_rows.update({s: r for s, r in zip((s for s, _, last in work.prefill if last), last_rows)})
        start = nt + npl
        for s, chunk, last in work.prefill:
            if self.sampling[s].logits is not None:  # the prompt's logits, when the request asks for them
                self.sampling[s].logits.keep_context(
                    linear_rows(self.model.lm_head, hidden[start : start + len(chunk)], self.gemm_rows)
                )
            start += len(chunk)
            self.lengths[s] += len(chunk)
        self._refresh_heads(hidden, {s: r for s, r in heads_rows.items() if s in work.heads}, work.heads_depth)
        return out

    def _pack(self, work: Work) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Segment]]:
        """Packed tokens, positions, cache slots and cache rows [R], and one Segment per slot."""
        dev, parts, segments, start = self.device, [], [], 0
        if work.tree_slots:
            tb = work.tree
            ts = torch.tensor(work.tree_slots, dtype=torch.long, device=dev)
            lens = torch.from_numpy(self.lengths[work.tree_slots]).to(dev)
            cand = torch.cat([self.root[ts, None], self.head_topk[ts].flatten(1)], 1)
            n = tb.tree_indices.shape[0]
            parts.append(
                (
                    cand[:, tb.tree_indices].flatten(),
                    (lens[:, None] + tb.positions).flatten(),
                    (lens[:, None] + torch.arange(n, device=dev)).flatten(),
                    ts.repeat_interleave(n),
                )
            )
            for s in work.tree_slots:
                segments.append(self._segment(s, start, n, tb.attn_mask, tb.ancestors))
                start += n
        if work.plain_slots:
            ps = torch.tensor(work.plain_slots, dtype=torch.long, device=dev)
            lens = torch.from_numpy(self.lengths[work.plain_slots]).to(dev)
            parts.append((self.root[ps], lens, lens, ps))
            for s in work.plain_slots:
                segments.append(self._segment(s, start, 1))
                start += 1
        for s, chunk, _ in work.prefill:
            pos = torch.arange(int(self.lengths[s]), int(self.lengths[s]) + len(chunk), device=dev)
            parts.append(
                (
                    torch.tensor(chunk, dtype=torch.long, device=dev),
                    pos,
                    pos,
                    torch.full((len(chunk),), s, dtype=torch.long, device=dev),
                )
            )
            segments.append(self._segment(s, start, len(chunk)))
            start += len(chunk)
        tokens, positions, slots, bidx = (torch.cat(x) for x in zip(*parts))
        return tokens, positions, slots, bidx, segments

    def _segment(
        self, s: int, start: int, T: int, tree_mask: Tensor | None = None, ancestors: Tensor | None = None
    ) -> Segment:
        """Slot s's T new rows: its prefix and the new rows the tree (or causality) allows."""
        L = int(self.lengths[s])
        if self.device.type == "cuda":  # the cache attention kernel reads the prefix on the device
            return Segment(
                s,
                start,
                start + T,
                L,
                prefix=torch.tensor(L, device=self.device),
                tree_mask=tree_mask,
                tree_ancestors=ancestors,
            )
        new = tree_mask if tree_mask is not None else torch.ones(T, T, dtype=torch.bool).tril_()
        mask = torch.cat([torch.ones(T, L, dtype=torch.bool), new], 1)[None, None]
        return Segment(s, start, start + T, L, mask=mask.repeat(1, 1, self.gqa_group, 1))

    def _tree_commit(self, work: Work, tree_tokens: Tensor, logits: Tensor, out: dict, heads_rows: dict) -> None:
        """Acceptance for every tree slot at once (typical acceptance per slot), commit, move K/V."""
        tb = work.tree
        Bt, n = tree_tokens.shape
        logits = logits.float().view(Bt, n, -1)
        raw = self._process_trees(work, tree_tokens, logits)
        pred = kernels.row_argmax(logits.view(Bt * n, -1)).view(Bt, n)
        ret, valid = tb.retrieve_indices, tb.retrieve_valid
        path_tokens = tree_tokens[:, ret]  # [Bt, P, W]
        match = (path_tokens[:, :, 1:] == pred[:, ret[:, :-1]]) & valid[None, :, 1:]
        accepted = match.long().cumprod(2).sum(2)  # [Bt, P]
        best = accepted.argmax(1)  # the first longest path, as greedy_accept picks it
        for i, s in enumerate(work.tree_slots):
            smp = self.sampling[s]
            if smp.temperature > 0:
                b, a = typical_accept(logits[i], path_tokens[i], ret, valid, smp.temperature, smp.threshold, smp.alpha)
                best[i], accepted[i, best[i]] = b[0], a[0]
        ar = torch.arange(Bt, device=self.device)
        acc = accepted[ar, best]
        nodes = ret[best]  # [Bt, W]
        last = nodes[ar, acc]
        new_root = pred[ar, last]
        ts = torch.tensor(work.tree_slots, dtype=torch.long, device=self.device)
        self.root[ts] = new_root
        lens = torch.from_numpy(self.lengths[work.tree_slots]).to(self.device)
        W = nodes.shape[1]
        rows = ts.repeat_interleave(W)
        src = (lens[:, None] + nodes).flatten()
        dst = (lens[:, None] + torch.arange(W, device=self.device)).flatten()
        self.kv[:, :, rows, :, dst] = self.kv[:, :, rows, :, src]  # gathered first: overlaps are safe
        drafts = tree_tokens.gather(1, nodes)[:, 1:].tolist()
        acc_l, last_l, root_l = acc.tolist(), last.tolist(), new_root.tolist()
        for i, s in enumerate(work.tree_slots):
            a = acc_l[i]
            out[s] = Outcome(drafts[i][:a] + [root_l[i]], last_l[i], True)
            if i in raw:  # the rows each new token was chosen at: the path's nodes
                chosen = nodes[i, : a + 1]
                self.sampling[s].logits.keep(raw[i][chosen], logits[i][chosen], out[s].tokens)
            self.lengths[s] += a + 1
            heads_rows[s] = i * n + last_l[i]

    def _process_trees(self, work: Work, tree_tokens: Tensor, logits: Tensor) -> dict[int, Tensor]:
        """Tree slots with logits processing: their rows replaced by processed ones (in place);
        returns their raw rows by position in the step."""
        raw, paths = {}, None
        for i, s in enumerate(work.tree_slots):
            hook = self.sampling[s].logits
            if hook is not None:
                paths = paths or node_paths(work.tree.ancestors)
                raw[i] = logits[i].clone()
                logits[i] = hook.tree(raw[i], tree_tokens[i].tolist(), paths)
        return raw

    def _plain_commit(self, slots: list[int], logits: Tensor, out: dict, prefill) -> None:
        """One token per slot (plain rows, then prefills' last rows): argmax, or drawn for sampled slots."""
        picked = kernels.row_argmax(logits)
        for i, s in enumerate(slots):
            smp = self.sampling[s]
            row = logits[i : i + 1].float()
            if smp.logits is not None:
                row = smp.logits.plain(row)
                picked[i] = row.argmax(-1)[0]
            if smp.samples:
                picked[i] = sample_token(row, smp.temperature, smp.top_k, smp.top_p, smp.generator)[0]
            if smp.logits is not None:
                smp.logits.keep(logits[i : i + 1], row, [int(picked[i])])
        idx = torch.tensor(slots, dtype=torch.long, device=self.device)
        self.root[idx] = picked
        plain = len(slots) - sum(1 for _, _, last in prefill if last)
        for i, (s, tok) in enumerate(zip(slots, picked.tolist())):
            out[s] = Outcome([tok])
            if i < plain:
                self.lengths[s] += 1

    def _refresh_heads(self, hidden: Tensor, rows: dict[int, int], depth: int = 0) -> None:
        """The first ``depth`` heads' top-k (0: every head) at each listed slot's last committed row
        (its next tree's drafts; deeper entries keep older drafts, which a tree of that depth never reads)."""
        if not rows or self.heads is None:
            return
        depth = depth or self.depth
        slots = list(rows)
        idx = torch.tensor([rows[s] for s in slots], dtype=torch.long, device=self.device)
        h = self.heads.hidden(hidden.index_select(0, idx), num_heads=depth)
        if self.heads.proj_weight is None:  # shared lm_head: the model's own GEMM path, packed weights included
            logits = linear_rows(self.model.lm_head, h, self.gemm_rows)
        else:
            logits = self.heads.project(h)
        K, N, V = logits.shape
        top = kernels.topk_indices(logits.reshape(K * N, V), TOPK).view(K, N, TOPK).transpose(0, 1)
        self.head_topk[torch.tensor(slots, dtype=torch.long, device=self.device), :K] = top

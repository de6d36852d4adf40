"""The eager decoding loop of a request whose logits the host must see: processed or returned.

A request with TensorRT-LLM options (penalties, embedding bias, bad words, min_length) or asking for
log probs / logits runs here instead of the captured steps: every step reads its logits back, runs
:func:`~medusa_forge.engine.logits_processing.process` on them and picks from the result. With
Medusa, every tree node's verification row is processed given that node's own path, then the same
greedy (or typical) acceptance runs on the processed rows, so a greedy Medusa request emits what
plain greedy decoding emits under the same settings, and the log probs of its tokens are those of
the rows plain decoding would have chosen them from.

The loop drives the engine's own state tensors (KV cache, committed length, root, heads' top-k) the
same way the captured steps do, so the engine serves the next request either way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from medusa_forge import kernels
from medusa_forge.engine.acceptance import (
    commit_path,
    greedy_accept,
    sample_token,
    typical_accept,
)
from medusa_forge.engine.generation import GenerationConfig, GenerationResult
from medusa_forge.engine.logits_processing import (
    LogitsSettings,
    process,
    token_log_probs,
)
from medusa_forge.model.step_meta import StepMeta, causal_mask


@dataclass
class Recorded:
    """What a request asked to see, one entry per emitted token (trimmed to the output at the end)."""

    log_probs: list[float] = field(default_factory=list)
    generation_logits: list[Tensor] = field(default_factory=list)  # raw rows [k, V] per step
    context_logits: np.ndarray | None = None

    def attach(self, result: GenerationResult, gcfg: GenerationConfig) -> None:
        n = len(result.tokens)
        if gcfg.return_log_probs:
            result.log_probs = self.log_probs[:n]
        if gcfg.return_context_logits:
            result.context_logits = self.context_logits
        if gcfg.return_generation_logits:
            rows = torch.cat(self.generation_logits)[:n] if self.generation_logits else torch.zeros(0, 0)
            result.generation_logits = rows.float().cpu().numpy()


def resolve_settings(engine, gcfg: GenerationConfig) -> LogitsSettings | None:
    """The request's settings, with min_length holding back the engine's end ids when none are given."""
    s = gcfg.logits_settings
    if s is not None and s.min_length > 0 and not s.end_ids and not gcfg.ignore_eos:
        ends = gcfg.eos_token_ids if gcfg.eos_token_ids is not None else engine.cfg.eos_token_ids
        s = dataclasses.replace(s, end_ids=tuple(ends or ()))
    return s


class _Loop:
    def __init__(self, engine, prompt_ids: list[int], gcfg: GenerationConfig, record: Recorded):
        self.e, self.prompt, self.gcfg, self.record = engine, prompt_ids, gcfg, record
        self.settings = resolve_settings(engine, gcfg)
        self.out: list[int] = []  # every token emitted so far (the pending root included)
        self.generator = None
        if gcfg.temperature > 0 and not gcfg.use_medusa:
            self.generator = torch.Generator(device=engine.device)
            self.generator.manual_seed(gcfg.seed if gcfg.seed is not None else int(time.time_ns() % 2**31))
        if gcfg.use_medusa:
            # Each node's path below the root: its ancestors, the root left out, itself included.
            self.paths = [[a for a in row[1:] if a >= 0] for row in engine.buffers.ancestors.tolist()]

    def _keep(self, raw: Tensor, processed: Tensor, chosen: list[int]) -> None:
        if self.gcfg.return_log_probs:
            picks = torch.tensor(chosen, device=processed.device)
            self.record.log_probs.extend(token_log_probs(processed, picks).tolist())
        if self.gcfg.return_generation_logits:
            self.record.generation_logits.append(raw.float().cpu())

    def _pick(self, raw: Tensor) -> int:
        """The token of one plain row [1, V] (greedy or sampled, from the processed logits)."""
        processed = process(raw, [self.out], self.prompt, self.settings)
        if self.generator is not None:
            token = int(
                sample_token(processed, self.gcfg.temperature, self.gcfg.top_k, self.gcfg.top_p, self.generator)[0]
            )
        else:
            token = int(processed.argmax(-1)[0])
        self._keep(raw, processed, [token])
        self.out.append(token)
        return token

    def prefill(self) -> list[int]:
        e, n = self.e, len(self.prompt)
        tokens = torch.tensor([self.prompt], dtype=torch.long, device=e.device)
        slots = torch.arange(n, device=e.device)
        hidden = e.model(tokens, StepMeta(slots, slots, causal_mask(0, n, e.max_seq_len, e.device), prefix_len=0))[0]
        if self.gcfg.return_context_logits:
            self.record.context_logits = e.model.logits(hidden).cpu().numpy()
        token = self._pick(e.model.lm_head(hidden[-1:]).float())
        e.cur_len.fill_(n)
        e.root.fill_(token)
        if e.tree is not None and self.gcfg.use_medusa:
            e._heads_topk(hidden[-1:], e.row0, out=e.head_topk)
        return [token]

    def plain_step(self) -> list[int]:
        e = self.e
        hidden = e.model(e.root.view(1, 1), e._base_meta)[0]
        token = self._pick(e.model.lm_head(hidden).float())
        e.cur_len.add_(1)
        e.root.fill_(token)
        return [token]

    def tree_step(self) -> list[int]:
        e, b, g = self.e, self.e.buffers, self.gcfg
        tree_tokens, positions, slots = kernels.tree_inputs(
            e.root, e.head_topk, b.tree_indices, b.positions, e.cur_len, e.node_ids
        )
        meta = StepMeta(positions, slots, prefix_len=e.cur_len, tree_mask=b.attn_mask, tree_ancestors=b.ancestors)
        hidden = e.model(tree_tokens[None], meta)[0]
        raw = e.model.lm_head(hidden).float()
        node_tokens = tree_tokens.tolist()
        histories = [self.out + [node_tokens[m] for m in path] for path in self.paths]
        processed = process(raw, histories, self.prompt, self.settings)
        candidates = tree_tokens[b.retrieve_indices]
        if g.temperature == 0:
            best, accepted = greedy_accept(processed, candidates, b.retrieve_indices, b.retrieve_valid)
        else:
            best, accepted = typical_accept(
                processed,
                candidates,
                b.retrieve_indices,
                b.retrieve_valid,
                g.temperature,
                g.posterior_threshold,
                g.posterior_alpha,
            )
        commit_path(
            processed,
            tree_tokens,
            b.retrieve_indices,
            best,
            accepted,
            e.cur_len,
            e.step_out,
            e.root,
            e.last,
            e.kv_src,
            e.kv_dst,
        )
        e.model.move_kv(e.kv_src, e.kv_dst)
        e._heads_topk(hidden, e.last, out=e.head_topk)
        out = e.step_out.tolist()
        new = out[1 : 1 + out[0]]
        rows = b.retrieve_indices[best[0], : len(new)]  # the nodes each new token was chosen at
        self._keep(raw.index_select(0, rows), processed.index_select(0, rows), new)
        self.out.extend(new)
        return new


def iter_processed_steps(
    engine, prompt_ids: list[int], gcfg: GenerationConfig, record: Recorded
) -> Iterator[list[int]]:
    """Like ``MedusaEngine.iter_steps`` (the prefill's token first, then each step's tokens), eagerly,
    through the request's logits processing; ``record`` collects what the request asked to see."""
    engine.check_request(prompt_ids, gcfg)
    loop = _Loop(engine, prompt_ids, gcfg, record)
    step = loop.tree_step if gcfg.use_medusa else loop.plain_step
    with torch.inference_mode():
        new = loop.prefill()
    produced = len(new)
    yield new
    while produced < gcfg.max_new_tokens:
        with torch.inference_mode():
            new = step()
        produced += len(new)
        yield new

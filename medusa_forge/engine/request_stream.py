"""The host side of one request in a shared batch: its tokens, stop conditions and result.

The same rules as ``MedusaEngine.generate_ids`` (cut at max_new_tokens, EOS kept, stop strings
cut before the string), applied to whatever a step hands the request, so a batched request
reports what the serial engine would: the tokens, text, finish reason and tokens per step.
"""

from __future__ import annotations

import time

import torch

from medusa_forge.engine.batch_logits import RowLogits
from medusa_forge.engine.batch_step import Sampling
from medusa_forge.engine.generation import GenerationResult
from medusa_forge.engine.logits_processing import stop_cut
from medusa_forge.engine.tickets import Ticket


class RequestStream:
    def __init__(self, ticket: Ticket, engine, order: int):
        self.ticket = ticket
        gcfg = ticket.gcfg
        self.gcfg = gcfg
        self.engine = engine
        self.eos = set(
            ()
            if gcfg.ignore_eos
            else (gcfg.eos_token_ids if gcfg.eos_token_ids is not None else engine.cfg.eos_token_ids)
        )
        self.prompt = ticket.prompt_ids
        self.prefilled = 0  # prompt tokens already in the slot's cache
        self.tokens: list[int] = []
        self.accepted: list[int] = []
        self.drafts: list[int] = []  # draft tokens each step verified: its tree's size less the root
        self.reason = "length"
        self.order = order  # admission order: prefills run first come, first served
        # Timed from submission, as a client sees it (a queued request waits for a slot).
        self.started = time.perf_counter() - (time.monotonic() - ticket.submitted)
        self.ttft: float | None = None
        self.fresh_depth = 0  # the first heads whose top-k reflects the slot's last committed token
        self.logits = RowLogits(engine, self.prompt, gcfg, lambda: self.tokens) if gcfg.needs_logits else None

    @property
    def medusa(self) -> bool:
        return self.gcfg.use_medusa and self.engine.tree is not None

    @property
    def prefilling(self) -> bool:
        return self.prefilled < len(self.prompt)

    def sampling(self, device) -> Sampling:
        g = self.gcfg
        generator = None
        if g.temperature > 0 and not g.use_medusa:
            generator = torch.Generator(device=device)
            generator.manual_seed(g.seed if g.seed is not None else int(time.time_ns() % 2**31))
        return Sampling(
            g.temperature,
            g.top_k,
            g.top_p,
            generator,
            g.use_medusa,
            g.posterior_threshold,
            g.posterior_alpha,
            self.logits,
        )

    def take(self, new: list[int], drafts: int = 0) -> bool:
        """Add one step's tokens (the first call is the prefill's token) and the number of draft
        tokens it verified; stream them; True when done."""
        g = self.gcfg
        if self.ttft is None:
            self.ttft = time.perf_counter() - self.started
        else:
            self.accepted.append(len(new))
            self.drafts.append(drafts)
        new = new[: g.max_new_tokens - len(self.tokens)]
        hit = next((j for j, t in enumerate(new) if t in self.eos), None)
        if hit is not None:
            new, self.reason = new[: hit + 1], "eos"
        self.tokens.extend(new)
        cut = stop_cut(self.prompt, self.tokens, len(new), g.stop_words)
        if cut is not None:
            new, self.reason = new[: len(new) - (len(self.tokens) - cut)], "stop"
            del self.tokens[cut:]
        if g.stop_strings:
            cut = self.engine._stop_cut(self.tokens, g.stop_strings)
            if cut is not None:
                new = new[: max(0, len(new) - (len(self.tokens) - cut))]
                self.tokens, self.reason = self.tokens[:cut], "stop"
        if self.ticket.on_tokens is not None and new:
            self.ticket.on_tokens(new)
        return self.reason != "length" or len(self.tokens) >= g.max_new_tokens

    def result(self) -> GenerationResult:
        total = time.perf_counter() - self.started
        tok = self.engine.tokenizer
        text = tok.decode(self.tokens) if tok is not None else ""
        if self.reason == "stop":
            text = min((text.split(s)[0] for s in self.gcfg.stop_strings if s in text), key=len, default=text)
        result = GenerationResult(
            len(self.prompt),
            self.tokens,
            text,
            len(self.accepted),
            self.accepted,
            self.reason,
            self.ttft or 0.0,
            total,
            drafts_per_step=self.drafts,
        )
        if self.logits is not None:
            self.logits.attach(result)
        return result

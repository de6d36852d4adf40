"""MedusaEngine: prefill, plain decode and Medusa tree decode over one static KV cache.

All decoding state lives in device tensors (committed length, pending root token, the heads'
top-k), and each step is a fixed-shape function of that state with no host synchronisation
inside. On CUDA each step is captured once as a CUDA graph and replayed; the host reads back one
small tensor per step (the new tokens) to stream them and test the stop conditions.

One Medusa step (FasterDecoding's algorithm, batch 1):
  1. candidates = cat([root, topk(head_0), ..., topk(head_{D-1})])[tree_indices]  -> N tree tokens
  2. one forward over the N tokens at slots cur_len.. with the tree attention mask
  3. accept the longest path whose drafts match the verify logits (greedy or typical)
  4. move the accepted nodes' K/V to consecutive slots, commit root + accepted drafts
  5. the verify logits / hidden state of the last accepted node give the next root and the
     heads' next top-k (no extra forward).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from medusa_forge import kernels
from medusa_forge.engine.acceptance import commit_path, greedy_accept, sample_token, typical_accept
from medusa_forge.engine.cuda_graphs import capture
from medusa_forge.engine.generation import GenerationConfig, GenerationResult
from medusa_forge.engine.logits_processing import stop_cut
from medusa_forge.engine.processed_steps import Recorded, iter_processed_steps
from medusa_forge.engine.request_limits import check_request
from medusa_forge.engine.step_graphs import PREFILL_MIN_BUCKET, PrefillGraph, StepGraph, prefill_bucket
from medusa_forge.errors import ForgeError
from medusa_forge.heads.medusa_head import MedusaHeads
from medusa_forge.model.gemm_layout import choose_layouts
from medusa_forge.model.llama import Transformer
from medusa_forge.model.step_meta import StepMeta, causal_mask
from medusa_forge.tree.choice_tree import TOPK, ChoiceTree, tree_buffers


class MedusaEngine:
    def __init__(
        self,
        model: Transformer,
        heads: MedusaHeads | None = None,
        tree: ChoiceTree | None = None,
        tokenizer=None,
        max_seq_len: int = 2048,
        cuda_graphs: bool | None = None,
        compile: bool = False,
    ):
        self.model = model
        self.heads = heads
        self.tokenizer = tokenizer
        self.cfg = model.config
        self.device = model.lm_head.weight.device
        if heads is not None:
            hc = heads.config
            if hc.hidden_size != self.cfg.hidden_size or hc.vocab_size != self.cfg.vocab_size:
                raise ForgeError(
                    f"Medusa heads (hidden {hc.hidden_size}, vocab {hc.vocab_size}) do not match the "
                    f"base model (hidden {self.cfg.hidden_size}, vocab {self.cfg.vocab_size})"
                )
            tree = tree or ChoiceTree.parse("mc_sim_7b_63")
            tree.check_heads(hc.num_heads)
        if tokenizer is not None:
            tokenizer.check_fits(self.cfg.vocab_size)
        self.tree = tree if heads is not None else None
        model.setup_caches(1, max_seq_len)
        self.max_seq_len = model.max_seq_len
        # Exactness on CUDA: weight layouts whose GEMM rows agree between M=1 and the tree step's M.
        self.gemm_layouts = choose_layouts(model, (1, self.tree.num_nodes) if self.tree is not None else (1,))
        self._init_state()
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.run_ahead = self.device.type == "cuda"  # queue the next step before reading one back (iter_steps)
        self.compile = compile
        self._steps: dict[str, StepGraph] = {}
        self._prefill_graphs: dict[int, PrefillGraph] = {}  # by bucket
        self._ids_host: Tensor | None = None  # pinned staging of a prompt's ids (CUDA graphs)
        self._ids_copied: torch.cuda.Event | None = None

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        dev = self.device
        long = dict(dtype=torch.long, device=dev)
        self.cur_len = torch.zeros((), **long)  # tokens committed to the KV cache
        self.root = torch.zeros(1, **long)  # the pending next token (greedy choice of the base model)
        self.last_logits = torch.zeros(1, self.cfg.vocab_size, dtype=torch.float32, device=dev)
        pos = self.cur_len.view(1)  # a view: the plain step's metadata is built once and follows cur_len
        self._base_meta = StepMeta(pos, pos, prefix_len=self.cur_len)
        if self.tree is not None:
            self.buffers = tree_buffers(self.tree, device=dev)
            n, d = self.tree.num_nodes, self.tree.depth
            self.node_ids = torch.arange(n, **long)
            self.head_topk = torch.zeros(d, TOPK, **long)
            self.last = torch.zeros(1, **long)  # the last accepted node of the step
            self.row0 = torch.zeros(1, **long)  # the prefill's heads read row 0 of its [1, H] hidden state
            self.kv_src = torch.zeros(d + 1, **long)  # cache slots moved into place after a step
            self.kv_dst = torch.zeros(d + 1, **long)
            self.step_out = torch.zeros(d + 2, **long)  # [count, tokens...]
        else:
            self.step_out = torch.zeros(2, **long)

    @property
    def num_draft_heads(self) -> int:
        return self.tree.depth if self.tree is not None else 0

    def _heads_topk(self, hidden: Tensor, row: Tensor, out: Tensor | None = None) -> Tensor:
        """Top-k tokens of the first ``depth`` heads at row ``row`` (1-element device tensor) of
        hidden [N, H] -> [D, TOPK], written into ``out`` (e.g. ``head_topk``) without a copy launch.

        On CUDA the row's gather and each residual block are one fused launch (instead of a gather,
        a baddbmm, SiLU and an add), then one GEMM for all heads' projections and the two top-k
        launches. The heads only propose drafts, so the fused block's rounding differing from the
        PyTorch ops' cannot change what the engine outputs, only (within an ulp) what it proposes."""
        heads, depth = self.heads, self.num_draft_heads
        if kernels.use_triton(hidden):
            features = kernels.heads_resblocks_triton(hidden, row, heads.res_weight[:depth], heads.res_bias[:depth])
            logits = heads.project(features[:, None], self.model.lm_head.weight)[:, 0]
        else:
            logits = heads(hidden.index_select(0, row), self.model.lm_head.weight, num_heads=depth)[:, 0]
        return kernels.topk_indices(logits, TOPK, out=out)

    # ------------------------------------------------------------------ steps (device-only)
    @torch.inference_mode()
    def _prefill(self, ids: list[int]) -> None:
        """Run the prompt through the model: cache filled, root = its greedy next token, heads' top-k.

        With CUDA graphs the prompt is padded to a power-of-two bucket (min 16) and the bucket's
        captured graph replays: an eager prefill is ~70 kernel launches from Python (~7 ms for a
        26M model), a replay a fraction of a millisecond. Padding tokens sit after the prompt, so
        causal attention keeps them out of every real token's view; their cache slots lie past the
        committed length and are overwritten before any step reads them.
        """
        T = len(ids)
        if self.cuda_graphs:
            pre = self._prefill_graph(self._prefill_bucket(T))
            if self._ids_host is None:  # pinned: the copy below is a DMA, not a staged pageable copy
                self._ids_host = torch.empty(self.max_seq_len, dtype=torch.long, pin_memory=True)
                self._ids_copied = torch.cuda.Event()
            self._ids_copied.synchronize()  # the previous prompt's copy has read the buffer (done by now)
            self._ids_host.numpy()[:T] = ids
            pre.tokens[0, :T].copy_(self._ids_host[:T], non_blocking=True)
            self._ids_copied.record()
            pre.length.fill_(T)
            pre.graph.replay()
            return
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        slots = torch.arange(T, device=self.device)
        meta = StepMeta(slots, slots, causal_mask(0, T, self.max_seq_len, self.device), prefix_len=0)
        hidden = self.model(tokens, meta)[0, -1:]
        self._finish_prefill(hidden, torch.tensor(T, device=self.device))

    def _finish_prefill(self, hidden: Tensor, length: Tensor) -> None:
        """From the last prompt token's hidden state [1, H]: root, last_logits, cur_len, heads' top-k."""
        logits = self.model.lm_head(hidden)
        self.last_logits.copy_(logits)
        self.root.copy_(kernels.row_argmax(logits))
        self.cur_len.copy_(length)
        if self.tree is not None:
            self._heads_topk(hidden, self.row0, out=self.head_topk)

    def _prefill_bucket(self, T: int) -> int:
        return prefill_bucket(T, self.max_seq_len)

    def _prefill_graph(self, bucket: int) -> PrefillGraph:
        """The captured prefill of ``bucket`` tokens (made on first use)."""
        if bucket in self._prefill_graphs:
            return self._prefill_graphs[bucket]
        dev = self.device
        tokens = torch.zeros(1, bucket, dtype=torch.long, device=dev)
        length = torch.ones((), dtype=torch.long, device=dev)
        slots = torch.arange(bucket, device=dev)
        zero = torch.zeros((), dtype=torch.long, device=dev)
        meta = StepMeta(slots, slots, prefix_len=zero)

        def fn() -> None:
            hidden = self.model(tokens, meta)[0]
            self._finish_prefill(hidden.index_select(0, (length - 1).view(1)), length)

        self._prefill_graphs[bucket] = PrefillGraph(capture(torch.inference_mode()(fn)), tokens, length, slots, zero)
        return self._prefill_graphs[bucket]

    def warmup(self, max_prompt_tokens: int | None = None) -> None:
        """Capture every graph a request of up to ``max_prompt_tokens`` tokens (default: the longest
        prompt the cache admits) can need: the prefill buckets and the greedy steps, so that no
        request pays for a capture. (Warming only to 512 tokens cost the first 520-token prompt of
        an H200 eval a 39 ms first token: the 1024 bucket's capture.)"""
        if not self.cuda_graphs:
            return
        top = self._prefill_bucket(max_prompt_tokens if max_prompt_tokens is not None else self.max_seq_len)
        bucket = PREFILL_MIN_BUCKET
        while bucket < top:
            self._prefill_graph(bucket)
            bucket *= 2
        self._prefill_graph(top)
        for kind in ("base", "greedy") if self.tree is not None else ("base",):
            self._step(kind, GenerationConfig())

    def _base_step(self, keep_logits: bool = False) -> None:
        """One plain decoding step; ``keep_logits`` (sampled decoding, which draws from them) also
        stores the logits in last_logits, which greedy decoding never reads."""
        hidden = self.model(self.root.view(1, 1), self._base_meta)[0]
        logits = self.model.lm_head(hidden)
        if keep_logits:
            self.last_logits.copy_(logits)
        # The same argmax (kernel, dtype, tie rule) as the tree step's commit reads.
        kernels.plain_commit(kernels.row_argmax(logits), self.root, self.step_out, self.cur_len)

    def _tree_step(self, accept: Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]) -> None:
        b = self.buffers
        tree_tokens, positions, slots = kernels.tree_inputs(
            self.root, self.head_topk, b.tree_indices, b.positions, self.cur_len, self.node_ids
        )
        # The CUDA attention kernel reads prefix_len + the tree (no mask); the reference path builds
        # its mask from them, once per layer.
        meta = StepMeta(positions, slots, prefix_len=self.cur_len, tree_mask=b.attn_mask, tree_ancestors=b.ancestors)
        hidden = self.model(tree_tokens[None], meta)[0]
        state = (self.cur_len, self.step_out, self.root, self.last, self.kv_src, self.kv_dst)
        if accept is greedy_accept and kernels.use_triton(hidden):
            # argmax straight from the bf16 logits, as the base step takes it
            kernels.greedy_commit_triton(
                self.model.lm_head(hidden), tree_tokens, b.retrieve_indices, b.retrieve_valid, *state
            )
        else:
            logits = self.model.logits(hidden)
            best, accepted = accept(logits, tree_tokens[b.retrieve_indices], b.retrieve_indices, b.retrieve_valid)
            commit_path(logits, tree_tokens, b.retrieve_indices, best, accepted, *state)
        self.model.move_kv(self.kv_src, self.kv_dst)
        # last_logits is not refreshed here: only plain sampled decoding reads it, and every
        # generation starts with a prefill that sets it.
        self._heads_topk(hidden, self.last, out=self.head_topk)

    def _step(self, kind: str, gcfg: GenerationConfig) -> StepGraph:
        """The step function for one decoding mode, captured as a CUDA graph on first use."""
        key = (
            kind
            if kind != "typical"
            else f"typical:{gcfg.temperature}:{gcfg.posterior_threshold}:{gcfg.posterior_alpha}"
        )
        if key in self._steps:
            return self._steps[key]
        if kind == "base":
            fn = self._base_step
        elif kind == "sample":
            fn = lambda: self._base_step(keep_logits=True)  # noqa: E731
        elif kind == "greedy":
            fn = lambda: self._tree_step(greedy_accept)  # noqa: E731 - fused into two kernels on CUDA
        else:
            t, thr, alpha = gcfg.temperature, gcfg.posterior_threshold, gcfg.posterior_alpha
            fn = lambda: self._tree_step(lambda *a: typical_accept(*a, t, thr, alpha))  # noqa: E731
        if self.compile:
            fn = torch.compile(fn, fullgraph=True, dynamic=False)
        step = StepGraph(torch.inference_mode()(fn))
        if self.cuda_graphs:
            step.graph = self._capture(step.fn)
        self._steps[key] = step
        return step

    def _capture(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, then record ``fn``; the state it scribbles is reset by prefill."""
        self.cur_len.zero_()
        return capture(fn)

    # ------------------------------------------------------------------ host loop
    def check_request(self, prompt_ids: list[int], gcfg: GenerationConfig) -> None:
        check_request(prompt_ids, gcfg, self.max_seq_len, self.tree, self.tokenizer is not None)

    def iter_steps(self, prompt_ids: list[int], gcfg: GenerationConfig) -> Iterator[list[int]]:
        """Yield the new tokens of every step (the first yield is the prefill's token).

        With ``run_ahead`` (the default on CUDA) the loop runs one step ahead: step k+1 is queued
        before step k's tokens are read back, so the host's bookkeeping overlaps the GPU's work.
        It does so only while step k cannot reach max_new_tokens (it yields at most ``depth + 1``
        tokens): a step queued past the end would still cost its full GPU time, which the request
        (or the next one, on the same stream) waits for; the last step or two run without overlap
        instead. The caller decides when to stop; a step queued past an EOS or stop string only
        writes cache slots beyond the committed length.
        """
        self.check_request(prompt_ids, gcfg)
        sampling = gcfg.temperature > 0 and not gcfg.use_medusa
        if not gcfg.use_medusa:
            kind = "sample" if sampling else "base"
        else:
            kind = "greedy" if gcfg.temperature == 0 else "typical"
        step = self._step(kind, gcfg)
        generator = None
        if sampling:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(gcfg.seed if gcfg.seed is not None else int(time.time_ns() % 2**31))

        def launch(buf: Tensor) -> torch.cuda.Event | None:
            step()
            if sampling:
                self.root.copy_(sample_token(self.last_logits, gcfg.temperature, gcfg.top_k, gcfg.top_p, generator))
                self.step_out[1:2].copy_(self.root)
            buf.copy_(self.step_out, non_blocking=True)
            if self.device.type != "cuda":
                return None
            event = torch.cuda.Event()
            event.record()
            return event

        pinned = self.device.type == "cuda"
        bufs = [torch.empty_like(self.step_out, device="cpu", pin_memory=pinned) for _ in range(2)]
        first = torch.empty(1, dtype=torch.long, pin_memory=pinned)
        self._prefill(prompt_ids)
        if sampling:
            self.root.copy_(sample_token(self.last_logits, gcfg.temperature, gcfg.top_k, gcfg.top_p, generator))
        first.copy_(self.root, non_blocking=True)
        first_ready = torch.cuda.Event() if pinned else None
        if first_ready is not None:
            first_ready.record()
        # Run ahead, the first step goes in behind the prefill before its token is read back (the
        # copy above is ordered before the step overwrites root): the GPU does not idle while the
        # host hands out the first token.
        pending = (bufs[0], launch(bufs[0])) if self.run_ahead and gcfg.max_new_tokens > 1 else None
        if first_ready is not None:
            first_ready.synchronize()
        yield [int(first[0])]
        produced = 1
        most = self.num_draft_heads + 1 if gcfg.use_medusa else 1  # tokens one step can yield
        if pending is None:
            pending = (bufs[0], launch(bufs[0]))
        k = 0
        while produced < gcfg.max_new_tokens:
            k += 1
            ahead = None
            if self.run_ahead and produced + most < gcfg.max_new_tokens:
                ahead = (bufs[k % 2], launch(bufs[k % 2]))
            buf, event = pending
            if event is not None:
                event.synchronize()
            out = buf.tolist()
            new = out[1 : 1 + out[0]]
            produced += len(new)
            yield new
            pending = ahead if ahead is not None else (bufs[k % 2], launch(bufs[k % 2]))

    def generate_ids(
        self, prompt_ids: list[int], gcfg: GenerationConfig, on_tokens: Callable[[list[int]], None] | None = None
    ) -> GenerationResult:
        """Decode until EOS, a stop string or max_new_tokens; ``on_tokens`` streams token chunks."""
        eos = set(
            ()
            if gcfg.ignore_eos
            else (gcfg.eos_token_ids if gcfg.eos_token_ids is not None else self.cfg.eos_token_ids)
        )
        tokens: list[int] = []
        accepted: list[int] = []
        reason, ttft = "length", 0.0
        # Logits to process or to return: the eager loop that reads every step's logits.
        record = Recorded() if gcfg.needs_logits else None
        steps = (
            iter_processed_steps(self, prompt_ids, gcfg, record)
            if record is not None
            else self.iter_steps(prompt_ids, gcfg)
        )
        self._sync()
        t0 = time.perf_counter()
        for i, new in enumerate(steps):
            if i == 0:
                ttft = time.perf_counter() - t0
            else:
                accepted.append(len(new))
            new = new[: gcfg.max_new_tokens - len(tokens)]
            hit = next((j for j, t in enumerate(new) if t in eos), None)
            if hit is not None:
                new, reason = new[: hit + 1], "eos"
            tokens.extend(new)
            cut = stop_cut(prompt_ids, tokens, len(new), gcfg.stop_words)
            if cut is not None:
                new, reason = new[: len(new) - (len(tokens) - cut)], "stop"
                del tokens[cut:]
            if gcfg.stop_strings:
                cut = self._stop_cut(tokens, gcfg.stop_strings)
                if cut is not None:
                    new = new[: max(0, len(new) - (len(tokens) - cut))]
                    tokens, reason = tokens[:cut], "stop"
            if on_tokens is not None and new:
                on_tokens(new)
            if reason != "length" or len(tokens) >= gcfg.max_new_tokens:
                break
        self._sync()
        total = time.perf_counter() - t0
        text = self.tokenizer.decode(tokens) if self.tokenizer is not None else ""
        if reason == "stop":
            text = min((text.split(s)[0] for s in gcfg.stop_strings if s in text), key=len, default=text)
        drafts = self.tree.num_nodes - 1 if gcfg.use_medusa and self.tree is not None else 0  # every step alike
        result = GenerationResult(
            len(prompt_ids),
            tokens,
            text,
            len(accepted),
            accepted,
            reason,
            ttft,
            total,
            drafts_per_step=[drafts] * len(accepted),
        )
        if record is not None:
            record.attach(result, gcfg)
        return result

    def generate(
        self, prompt: str, gcfg: GenerationConfig | None = None, on_tokens: Callable[[list[int]], None] | None = None
    ) -> GenerationResult:
        if self.tokenizer is None:
            raise ForgeError("this engine has no tokenizer; call generate_ids with token ids")
        if not prompt:
            raise ForgeError("empty prompt: give at least one token of input")
        return self.generate_ids(self.tokenizer.encode(prompt), gcfg or GenerationConfig(), on_tokens)

    def _stop_cut(self, tokens: list[int], stops: tuple[str, ...]) -> int | None:
        """Shortest token prefix whose text contains a stop string, or None."""
        if not any(s in self.tokenizer.decode(tokens) for s in stops):
            return None
        for n in range(1, len(tokens) + 1):
            if any(s in self.tokenizer.decode(tokens[:n]) for s in stops):
                return n
        return len(tokens)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

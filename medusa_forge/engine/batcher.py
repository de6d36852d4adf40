"""In-flight batching: many requests share every decoding step of one engine.

:class:`InflightBatcher` implements the :class:`~medusa_forge.engine.tickets.Scheduler` protocol
with its own loop thread. Requests wait in a queue (at most ``max_queue``; 0 = unbounded) until
one of ``max_batch_size`` slots is free, then join the running batch between two steps and leave
it as soon as they finish, fail, are cancelled or time out. Each step is ONE packed forward over
every active slot (:mod:`~medusa_forge.engine.batch_step`): a Medusa request contributes the
step's tree (or one token), a plain request one token, and the arriving requests at most
``prefill_chunk`` prompt tokens between them (first come, first served), so arrivals never stall
the running requests for longer than one chunk. The step's tree follows the load
(:mod:`~medusa_forge.engine.speculation`).

Every request keeps its own settings in the shared batch: temperature, top-k/top-p and a seeded
generator of its own, typical acceptance, EOS, stop strings and max tokens. A request's greedy
output equals its batch-1 output (``MedusaEngine.generate_ids``); docs/batching.md says why and
how far that holds. The batcher owns its own KV cache, so the engine's batch-1 path keeps working.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable

from medusa_forge.engine.batch_step import BatchSlots, Work
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.request_stream import RequestStream
from medusa_forge.engine.speculation import CostModel, Ladder, Policy, parse_speculation
from medusa_forge.engine.tickets import RequestCancelled, Ticket, check_room
from medusa_forge.errors import ForgeError
from medusa_forge.model.step_meta import RowChunks

PREFILL_CHUNK = 64  # prompt tokens an arriving request adds to one step
MAX_PROBE_ROWS = 512  # the cost model is measured up to this many rows, extrapolated beyond


class InflightBatcher:
    def __init__(
        self,
        engine,
        max_batch_size: int,
        max_queue: int = 0,
        speculation: str = "auto",
        prefill_chunk: int = PREFILL_CHUNK,
        gemm_rows: RowChunks | None = None,
        cost: CostModel | None = None,
    ):
        if max_batch_size < 1:
            raise ForgeError(f"max batch size must be >= 1, got {max_batch_size}")
        if max_queue < 0:
            raise ForgeError(f"max queue must be >= 0 (0: unbounded), got {max_queue}")
        mode, _ = parse_speculation(speculation)
        self.engine = engine
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.slots = BatchSlots(engine, max_batch_size, gemm_rows)
        self.policy: Policy | None = None
        if engine.tree is not None:
            ladder = Ladder.of(engine.tree, engine.device)
            if mode == "auto" and cost is None:
                cost = self.measure(ladder.sizes[-1] + 1)
            self.policy = Policy(speculation, ladder, cost)
        self.speculation = speculation
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._streams: list[RequestStream | None] = [None] * max_batch_size
        self._admitted = 0
        self._closed = False
        self.steps = 0
        self._size = self.policy.ladder.sizes[-1] if self.policy is not None else 0  # the last step's tree
        self._predicted: float | None = None  # the cost model's time for the step being run
        self.tree_sizes: Counter[int] = Counter()  # steps by the tree size the policy chose (0: plain)
        self._thread = threading.Thread(target=self._loop, name="inflight-batcher", daemon=True)
        self._thread.start()

    def measure(self, tree_rows: int) -> CostModel:
        """The step-time cost model of this device, from packed steps of the batcher's own slots."""
        rows = min(MAX_PROBE_ROWS, self.max_batch_size * tree_rows)
        return CostModel.measure(
            self.slots.probe, rows, self.max_batch_size, device=str(self.engine.device), heads=self.slots.probe_heads
        )

    def describe(self) -> dict:
        """What this batcher runs, for the served model's metadata or a bench record."""
        out = {
            "max_batch_size": self.max_batch_size,
            "max_queue": self.max_queue,
            "device": str(self.engine.device),
            "kv_cache": "static slots",
            "prefill_chunk": self.prefill_chunk,
            "gemm_rows": [self.slots.gemm_rows.least, self.slots.gemm_rows.most],
            "gemm": "oneDNN packed weights" if self.slots.gemm_rows.gemm is not None else "the device's BLAS",
            "batch_invariant": self.slots.batch_invariant,
            "speculation": self.speculation,
        }
        if self.policy is not None:
            out.update(self.policy.to_dict())
            out["steps_by_tree_size"] = dict(sorted(self.tree_sizes.items()))
        return out

    # ------------------------------------------------------------------ Scheduler
    def submit(
        self,
        prompt_ids: list[int],
        gcfg: GenerationConfig,
        on_tokens: Callable[[list[int]], None] | None = None,
        timeout_s: float | None = None,
    ) -> Ticket:
        self.engine.check_request(prompt_ids, gcfg)
        ticket = Ticket(list(prompt_ids), gcfg, on_tokens, timeout_s)
        with self._cond:
            if self._closed:
                raise ForgeError("the batcher is closed; no new requests")
            check_room(len(self._waiting), self.max_queue, self.max_batch_size)
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._streams)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._waiting and not self.active:
                    self._cond.wait()
                if self._closed:
                    break
                self._admit()
            self._check_running()
            work = self._plan()
            if work is None:
                continue
            t0 = time.perf_counter()
            try:
                outcome = self.slots.step(work)
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the loop
                for s in {*work.tree_slots, *work.plain_slots, *(s for s, _, _ in work.prefill)}:
                    self._end(s, error=e)
                continue
            if self._predicted is not None:  # the policy learns what its choice really cost
                self.policy.observe(work.tree is not None, self._predicted, time.perf_counter() - t0)
            self.steps += 1
            self._deliver(work, outcome)
        self._shutdown()

    def _admit(self) -> None:
        """Queued tickets (caller holds the lock): drop the cancelled and timed out, seat the rest."""
        for t in list(self._waiting):
            try:
                t.check(0)
            except BaseException as e:  # noqa: BLE001 - RequestCancelled or RequestTimedOut
                self._waiting.remove(t)
                t.fail(e)
        for s in range(self.max_batch_size):
            if not self._waiting:
                break
            if self._streams[s] is None:
                t = self._waiting.popleft()
                st = RequestStream(t, self.engine, self._admitted)
                self._admitted += 1
                self.slots.reset(s, st.sampling(self.engine.device))
                self._streams[s] = st

    def _check_running(self) -> None:
        for s, st in enumerate(self._streams):
            if st is not None:
                try:
                    st.ticket.check(len(st.tokens))
                except BaseException as e:  # noqa: BLE001
                    self._end(s, error=e)

    def _plan(self) -> Work | None:
        """This step's work: every decoding slot and one prefill chunk; the tree from the policy."""
        streams = self._streams
        live = [s for s, st in enumerate(streams) if st is not None]
        if not live:
            return None
        work = Work()
        budget = self.prefill_chunk  # prompt tokens this step takes, first come first served
        for s in sorted((s for s in live if streams[s].prefilling), key=lambda s: streams[s].order):
            if budget == 0:
                break
            st = streams[s]
            chunk = st.prompt[st.prefilled : st.prefilled + budget]
            budget -= len(chunk)
            last = st.prefilled + len(chunk) == len(st.prompt)
            work.prefill.append((s, chunk, last))
            if last and st.medusa and self._size:  # drafts now only while trees run; else refreshed later
                work.heads.add(s)
        decoding = [s for s in live if not streams[s].prefilling]
        medusa = [s for s in decoding if streams[s].medusa]
        work.plain_slots = [s for s in decoding if not streams[s].medusa]
        size, self._predicted = 0, None
        ladder = self.policy.ladder if self.policy is not None else None
        if medusa and self.policy is not None:
            other = len(work.plain_slots) + sum(len(c) for _, c, _ in work.prefill)
            size = self.policy.choose(len(medusa), other, len(work.plain_slots) + len(work.prefill))
            clean = max(1, ladder.depth(size))  # the drafts the prediction assumes, fresh
            if self.policy.cost is not None and all(streams[s].fresh_depth >= clean for s in medusa):
                self._predicted = self.policy.predict(
                    size, len(medusa), other, len(work.plain_slots) + len(work.prefill)
                )
        if size:
            need = ladder.depth(size)
            work.tree = ladder.buffers[size]
            work.tree_slots = [s for s in medusa if streams[s].fresh_depth >= need]
            stale = [s for s in medusa if streams[s].fresh_depth < need]  # one plain step refreshes their drafts
            work.plain_slots += stale
            work.heads.update(medusa)
        else:
            work.plain_slots += medusa
        if work.heads:  # drafts as deep as the tree they are for (the last one's while this step is plain)
            work.heads_depth = ladder.depth(size or self._size)
        if medusa:  # the policy's last choice, kept while no request speculates
            self._size = size
            self.tree_sizes[size] += 1
        return work

    def _deliver(self, work: Work, outcome: dict) -> None:
        streams = self._streams
        for s, chunk, _ in work.prefill:
            streams[s].prefilled += len(chunk)
        for s in (*work.tree_slots, *work.plain_slots, *(s for s, _, last in work.prefill if last)):
            # the heads whose drafts reflect its last token (the others are a step old or older)
            streams[s].fresh_depth = (work.heads_depth or self.slots.depth) if s in work.heads else 0
        for s, oc in outcome.items():
            st = streams[s]
            if oc.tree_step:
                self.policy.acceptance.record(self._size, self.policy.ladder.path_ranks[self._size][oc.last_node])
            try:
                done = st.take(oc.tokens, work.tree.tree_indices.shape[0] - 1 if oc.tree_step else 0)
            except Exception as e:  # noqa: BLE001 - the caller's on_tokens failed: that request only
                self._end(s, error=e)
                continue
            if done:
                self._end(s)

    def _end(self, s: int, error: BaseException | None = None) -> None:
        st = self._streams[s]
        self._streams[s] = None
        if error is not None:
            st.ticket.fail(error)
        else:
            st.ticket.finish(st.result())

    def _shutdown(self) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for t in waiting:
            t.fail(RequestCancelled())
        for s, st in enumerate(self._streams):
            if st is not None:
                self._end(s, error=RequestCancelled())

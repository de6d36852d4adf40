"""One request at a time: the :class:`~medusa_forge.engine.tickets.Scheduler` that runs each ticket alone.

This is the engine's original serving mode (one sequence, one KV cache) behind the ticket API, and
the baseline every batching comparison is made against. A loop thread takes tickets in the order
they were submitted and decodes each with :meth:`MedusaEngine.generate_ids`; between steps it
streams the new tokens and calls :meth:`Ticket.check`, so a cancelled or timed-out request leaves
the engine within one step and the next ticket starts.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.tickets import RequestCancelled, Ticket, check_room
from medusa_forge.errors import ForgeError


class SerialScheduler:
    """Decode the submitted tickets one after another on ``engine`` (a MedusaEngine)."""

    max_batch_size = 1

    def __init__(self, engine, max_queue: int = 0):
        self.engine = engine
        self.max_queue = max_queue  # tickets waiting behind the running one; 0 = unbounded
        self._queue: deque[Ticket] = deque()
        self._running: Ticket | None = None
        self._closed = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="serial-scheduler", daemon=True)
        self._thread.start()

    def describe(self) -> dict:
        """What this loop runs: one request at a time, each with the engine's whole tree (or none)."""
        return {"max_batch_size": 1, "max_queue": self.max_queue, "speculation": "serial"}

    def submit(
        self,
        prompt_ids: list[int],
        gcfg: GenerationConfig,
        on_tokens: Callable[[list[int]], None] | None = None,
        timeout_s: float | None = None,
    ) -> Ticket:
        self.engine.check_request(prompt_ids, gcfg)  # a bad request fails here, not in the loop
        ticket = Ticket(list(prompt_ids), gcfg, on_tokens, timeout_s)
        with self._wake:
            if self._closed:
                raise ForgeError("the scheduler is closed; the model is unloading")
            check_room(len(self._queue), self.max_queue, 1)
            self._queue.append(ticket)
            self._wake.notify()
        return ticket

    def close(self) -> None:
        with self._wake:
            self._closed = True
            waiting, self._queue = list(self._queue), deque()
            if self._running is not None:
                self._running.cancel()  # it fails with RequestCancelled at its next step
            self._wake.notify()
        for ticket in waiting:
            ticket.fail(RequestCancelled())
        self._thread.join(timeout=60)

    def _next(self) -> Ticket | None:
        with self._wake:
            while not self._queue and not self._closed:
                self._wake.wait()
            self._running = self._queue.popleft() if self._queue else None
            return self._running

    def _loop(self) -> None:
        while (ticket := self._next()) is not None:
            self._run(ticket)
            with self._wake:
                self._running = None

    def _run(self, ticket: Ticket) -> None:
        produced = 0

        def step(new: list[int]) -> None:
            nonlocal produced
            produced += len(new)
            if ticket.on_tokens is not None:
                ticket.on_tokens(new)
            ticket.check(produced)

        try:
            ticket.check(0)  # cancelled or expired while it waited: no prefill for nobody
            result = self.engine.generate_ids(ticket.prompt_ids, ticket.gcfg, on_tokens=step)
        except Exception as e:  # noqa: BLE001 - the ticket's own outcome; the loop goes on
            ticket.fail(e)
        else:
            ticket.finish(result)

"""How a caller hands one request to a decoding loop and gets its result: a :class:`Ticket`.

The serial mode (one request at a time) and in-flight batching (many requests share each step)
take requests the same way, so the Triton model, the benchmarks and the tests do not care which
runs behind them: ``submit`` returns a ticket at once; the loop streams the request's new tokens
through ``on_tokens`` (called from the loop's thread) and ends the ticket with a result or an error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from medusa_forge.engine.generation import GenerationConfig, GenerationResult
from medusa_forge.errors import ForgeError


class RequestCancelled(Exception):
    """The caller went away (or cancelled): the loop stopped generating for it."""


class RequestTimedOut(ForgeError):
    """The request ran past its time limit."""


class QueueFull(ForgeError):
    """Every slot is busy and the wait queue is at its bound: the caller should retry later
    (Triton's UNAVAILABLE, not a bad request)."""


def check_room(waiting: int, max_queue: int, slots: int) -> None:
    """Refuse a request when ``max_queue`` (0: unbounded) requests already wait for one of ``slots``."""
    if max_queue and waiting >= max_queue:
        raise QueueFull(
            f"request queue is full ({max_queue} waiting for a slot of {slots}); retry later or raise --max-queue"
        )


class Ticket:
    """One submitted request: its inputs, a cancel switch, and its outcome once the loop ends it."""

    def __init__(
        self,
        prompt_ids: list[int],
        gcfg: GenerationConfig,
        on_tokens: Callable[[list[int]], None] | None = None,
        timeout_s: float | None = None,
    ):
        self.prompt_ids = prompt_ids
        self.gcfg = gcfg
        self.on_tokens = on_tokens
        self.timeout_s = timeout_s
        self.submitted = time.monotonic()
        self.deadline = self.submitted + timeout_s if timeout_s is not None else None
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None

    # ---------------------------------------------------------------- caller side
    def cancel(self) -> None:
        """Ask the loop to drop this request at its next step boundary."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the outcome: the result, or the request's own error raised here."""
        if not self._done.wait(timeout):
            raise TimeoutError("request still running")
        if self._error is not None:
            raise self._error
        return self._result

    # ---------------------------------------------------------------- loop side
    def check(self, produced: int) -> None:
        """Between steps: raise when the request was cancelled or is past its deadline."""
        if self.cancelled:
            raise RequestCancelled()
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise RequestTimedOut(
                f"request exceeded the model's timeout of {self.timeout_s:g} s after {produced} "
                "tokens; ask for fewer max_tokens or raise --request-timeout"
            )

    def finish(self, result: GenerationResult) -> None:
        self._result = result
        self._done.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()


class Scheduler(Protocol):
    """A decoding loop that takes tickets: the serial loop or the in-flight batcher."""

    max_batch_size: int

    def submit(
        self,
        prompt_ids: list[int],
        gcfg: GenerationConfig,
        on_tokens: Callable[[list[int]], None] | None = None,
        timeout_s: float | None = None,
    ) -> Ticket:
        """Queue a request (raises ForgeError for a bad one or a full queue) and return its ticket."""

    def close(self) -> None:
        """Fail every queued and running ticket with RequestCancelled and stop the loop's thread."""

    def describe(self) -> dict:
        """What this loop runs (slots, queue bound, speculation policy and its cost model), for logs."""

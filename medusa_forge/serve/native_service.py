"""What the native Triton model does, without Triton: one engine, one scheduler, contract-shaped replies.

Concurrency. Each model instance (its own Python stub process inside tritonserver) owns one engine
and one :class:`~medusa_forge.engine.tickets.Scheduler` driving it from a loop thread: the
:class:`~medusa_forge.engine.serial.SerialScheduler` (one request at a time) when the model's
``max_batch_size`` is 1, else the in-flight batcher (requests join and leave the running batch
between steps). :meth:`NativeService.submit` hands a request over and returns at once, so the
Triton model's ``execute`` never blocks while others decode; requests beyond the running batch
wait in the scheduler's queue, bounded by ``max_queue`` (a full queue is an error naming the bound).
More engines come from ``instance_group { count: N }`` (``triton-repo --instances N``).

Limits per request. A request fails with an error once ``request_timeout_s`` have passed since it
was submitted (waiting included), checked between steps, and as soon as its caller reports it
cancelled: one watcher thread asks every live request's ``cancelled()`` (an IPC round trip in
Triton) every ``CANCEL_POLL_S`` or so, and cancels its tickets, so a client that goes away frees
its slot within a step or two, queued or running.

The same class is the in-process baseline of the load test, so "gRPC overhead" compares like with like.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import numpy as np

from medusa_forge.engine.fresh_thread import in_fresh_thread
from medusa_forge.engine.tickets import RequestCancelled, RequestTimedOut, Scheduler, Ticket
from medusa_forge.errors import ForgeError
from medusa_forge.serve.contracts import served_contract
from medusa_forge.serve.replies import Reply
from medusa_forge.serve.request import RowRequest
from medusa_forge.serve.text_stream import TextDeltas

__all__ = [
    "NativeModelSettings",
    "NativeService",
    "Pending",
    "Reply",
    "RequestCancelled",
    "RequestTimedOut",
    "make_scheduler",
]

CANCEL_POLL_S = 0.02  # asking Triton "cancelled?" is an IPC round trip (~30 us): not more often than this


def _true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass
class NativeModelSettings:
    """The ``parameters`` of a native model's config.pbtxt (all strings there; "" = unset)."""

    engine_dir: str  # native engine dir (`build native`) or HF model dir
    medusa_dir: str = ""  # heads for a HF model dir
    medusa_choices: str = ""  # tree spec for a HF model dir (an engine dir carries its own)
    device: str = ""  # "" = cuda when available, else cpu
    dtype: str = ""  # "" = the engine's, else bf16 on CUDA / fp32 on CPU
    max_seq_len: str = ""
    use_medusa: str = "true"  # "false": serve plain decoding from the same weights (heads not loaded)
    torch_threads: str = ""  # intra-op threads per instance on CPU ("" = torch's default)
    compile: str = "false"  # torch.compile the decoding steps (CUDA) before graph capture
    warmup_tokens: str = "2"  # tokens generated at load time (fails loading early; 0 = skip)
    request_timeout_s: str = "600"  # time limit of one request, from its arrival (queueing included)
    max_batch_size: str = "1"  # requests decoded together: 1 = one at a time (serial), N = in-flight batching
    max_queue: str = "0"  # requests that may wait beyond the running batch (0 = unbounded)
    speculation: str = "auto"  # the batcher's tree policy under load (auto | a tree | off above N slots)
    contract: str = "ensemble"  # or "tensorrt_llm": token ids in and out (serve/contracts.py)

    def to_parameters(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> NativeModelSettings:
        known = {f.name for f in fields(cls)}
        if not params.get("engine_dir"):
            raise ForgeError(
                "model config has no 'engine_dir' parameter; regenerate it with `medusa-forge triton-repo`"
            )
        return cls(**{k: v for k, v in params.items() if k in known})

    @property
    def wants_medusa(self) -> bool:
        return _true(self.use_medusa)

    @property
    def timeout_s(self) -> float:
        try:
            value = float(self.request_timeout_s)
        except ValueError:
            raise ForgeError(f"parameter request_timeout_s={self.request_timeout_s!r} is not a number") from None
        if value <= 0:
            raise ForgeError(f"parameter request_timeout_s must be > 0, got {value:g}")
        return value

    @property
    def batch_size(self) -> int:
        return _count(self.max_batch_size or "1", "max_batch_size", least=1)

    @property
    def queue_bound(self) -> int:
        return _count(self.max_queue or "0", "max_queue", least=0)


def _count(value: str, name: str, least: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ForgeError(f"parameter {name}={value!r} is not an integer") from None
    if number < least:
        raise ForgeError(f"parameter {name} must be >= {least}, got {number}")
    return number


def make_scheduler(engine, max_batch_size: int, max_queue: int = 0, speculation: str = "auto") -> Scheduler:
    """The serial loop for a batch of 1, else the in-flight batcher over ``max_batch_size`` slots."""
    from medusa_forge.engine.serial import SerialScheduler

    if max_batch_size == 1:
        return SerialScheduler(engine, max_queue)
    try:
        from medusa_forge.engine.batcher import InflightBatcher
    except ModuleNotFoundError as e:
        if e.name != "medusa_forge.engine.batcher":
            raise
        raise ForgeError(
            f"max_batch_size {max_batch_size} needs the in-flight batcher (medusa_forge/engine/"
            "batcher.py), which this install lacks; serve with --max-batch-size 1"
        ) from None
    return InflightBatcher(engine, max_batch_size, max_queue, speculation)


def scheduler_warnings(scheduler: dict) -> list[str]:
    """What a served model logs about its scheduler (``Scheduler.describe()``) at load."""
    warnings = []
    if not scheduler.get("batch_invariant", True):
        warnings.append(
            "medusa-forge: a CPU engine in a dtype other than float32 is not batch invariant: batched "
            "answers can differ from one-at-a-time ones; build it with --dtype float32 (docs/batching.md)"
        )
    if scheduler.get("max_batch_size", 1) > 1 and str(scheduler.get("device", "")).startswith("cuda"):
        # measured on an H100: an eager batched step cost 5.5 ms for 1-64 rows, a graph-replayed
        # serial token 0.2 ms (bench/results/2026-12-05-h100-serve)
        warnings.append(
            "medusa-forge: on CUDA the in-flight batcher's step runs eagerly (no CUDA graph); for a small "
            "model the one-at-a-time engine, which replays one, served more tokens/s at every load "
            "measured: compare with `medusa-forge bench serve` and consider --max-batch-size 1 "
            "(docs/batching.md)"
        )
    return warnings


class _CancelWatch:
    """One thread that asks each live request's ``cancelled()`` and cancels its tickets when it says so."""

    def __init__(self):
        self._live: dict[int, tuple[list[Ticket], Callable[[], bool]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cancel-watch", daemon=True)
        self._thread.start()

    def add(self, tickets: list[Ticket], cancelled: Callable[[], bool]) -> None:
        with self._lock:
            self._live[id(tickets)] = (tickets, cancelled)

    def remove(self, tickets: list[Ticket]) -> None:
        with self._lock:
            self._live.pop(id(tickets), None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        # Polls run under the lock: once remove() returns, the request's cancelled() is never called
        # again (Triton frees a response sender after its final response; asking it then crashes).
        pause = CANCEL_POLL_S
        while not self._stop.wait(pause):
            with self._lock:
                for tickets, cancelled in self._live.values():
                    try:
                        gone = cancelled()
                    except Exception:  # noqa: BLE001 - a sender that cannot answer has nobody behind it
                        gone = True
                    if gone:
                        for ticket in tickets:
                            ticket.cancel()
                # ~1 ms of polls per pass at most: with many live requests each is asked less often
                pause = max(CANCEL_POLL_S, 0.001 * len(self._live))


class _Outbox:
    """One thread that sends streamed responses in order, so a scheduler's step only queues them: the
    text delta of a growing sequence and the IPC send cost the decoding loop nothing."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="stream-outbox", daemon=True)
        self._thread.start()

    def put(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def call(self, job: Callable[[], None]) -> None:
        """Run ``job`` after everything queued before it, and wait for it; its error is raised here."""
        done, error = threading.Event(), []

        def run() -> None:
            try:
                job()
            except Exception as e:  # noqa: BLE001 - handed to the caller
                error.append(e)
            finally:
                done.set()

        self._jobs.put(run)
        done.wait()
        if error:
            raise error[0]

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()  # every job catches its own errors


class Pending:
    """The rows of one request, submitted: :meth:`wait` gives their replies or raises the first error."""

    def __init__(self, service: NativeService, tickets: list[Ticket]):
        self.service = service
        self.tickets = tickets
        self.send_final: Callable[[Reply], None] | None = None  # streaming: the closing response
        self.outbox: _Outbox | None = None  # streaming: where its responses queue, in order

    def cancel(self) -> None:
        for ticket in self.tickets:
            ticket.cancel()

    def respond(self, send: Callable[[], None]) -> None:
        """Send a response after every chunk streamed before it (at once for a request that does not stream)."""
        if self.outbox is None:
            send()
        else:
            self.outbox.call(send)

    def wait(self) -> list[Reply]:
        try:
            results = [ticket.result() for ticket in self.tickets]
        except BaseException:
            self.cancel()  # one row failed: the request fails whole, its other rows stop too
            raise
        finally:
            self.service.watch.remove(self.tickets)
        replies = [self.service.reply(result) for result in results]
        if self.send_final is not None:
            self.respond(lambda: self.send_final(replies[0]))
        return replies


class NativeService:
    def __init__(self, settings: NativeModelSettings, device_id: int | None = None):
        import torch

        if settings.torch_threads:
            torch.set_num_threads(int(settings.torch_threads))
        device = settings.device or None
        if device == "cuda" and device_id is not None:
            device = f"cuda:{device_id}"
        self.settings = settings
        self.timeout_s = settings.timeout_s
        batch, queue = settings.batch_size, settings.queue_bound  # bad values fail before the engine loads
        self.use_medusa = settings.wants_medusa
        # Loaded, warmed up and probed off this thread: the scheduler's loop keeps the only OpenMP team.
        self.engine, self.scheduler = in_fresh_thread(lambda: self._start(settings, device, batch, queue))
        self.watch = _CancelWatch()
        self.outbox = _Outbox()

    def _start(self, settings: NativeModelSettings, device: str | None, batch: int, queue: int):
        from medusa_forge.build.open import open_engine

        engine = open_engine(
            settings.engine_dir,
            settings.medusa_dir or None,
            settings.medusa_choices or None,
            device=device,
            dtype=settings.dtype or None,
            max_seq_len=int(settings.max_seq_len) if settings.max_seq_len else None,
            compile=_true(settings.compile),
            with_heads=settings.wants_medusa,
        )
        if settings.wants_medusa and engine.tree is None:
            raise ForgeError(f"{settings.engine_dir} has no Medusa heads; serve it with `triton-repo --no-medusa`")
        if int(settings.warmup_tokens or 0) > 0:
            from medusa_forge.engine.generation import GenerationConfig

            engine.generate(
                "def",
                GenerationConfig(
                    max_new_tokens=int(settings.warmup_tokens), use_medusa=self.use_medusa, ignore_eos=True
                ),
            )
        return engine, make_scheduler(engine, batch, queue, settings.speculation or "auto")

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    def reply(self, result) -> Reply:
        return Reply.from_result(result)

    def submit(
        self,
        rows: list[RowRequest],
        on_tokens: Callable[[list[int]], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Pending:
        """Hand the rows of one request to the scheduler and return at once.

        Raises ForgeError for a bad row or a full queue (no row of the request is left running) and
        :class:`RequestCancelled` for a caller already gone (nothing is submitted).
        """
        if cancelled is not None and cancelled():
            raise RequestCancelled()
        tickets: list[Ticket] = []
        try:
            for row in rows:
                ids = list(row.prompt_ids) if row.prompt_ids is not None else self.engine.tokenizer.encode(row.prompt)
                tickets.append(self.scheduler.submit(ids, row.gcfg, on_tokens, self.timeout_s))
        except BaseException:
            for ticket in tickets:
                ticket.cancel()
            raise
        if cancelled is not None:
            self.watch.add(tickets, cancelled)
        return Pending(self, tickets)

    def submit_streaming(
        self,
        row: RowRequest,
        send: Callable[[dict[str, np.ndarray], bool], None],
        cancelled: Callable[[], bool] | None = None,
    ) -> Pending:
        """Stream one row: ``send(tensors, final)`` per decoding step with the settled text delta and the
        step's token ids (from the outbox thread, in order); :meth:`Pending.wait` sends the final
        response with the remaining text and the statistics. A chunk that cannot be sent (the client
        is gone) cancels the request."""
        deltas = TextDeltas(self.engine.tokenizer.decode, row.gcfg.stop_strings)
        tensors = served_contract(self.settings.contract).reply
        broken: list[Exception] = []

        def chunk(new: list[int]) -> None:
            if broken:
                return
            try:
                send(tensors(None, deltas.push(new), new, False, row.gcfg), False)
            except Exception as e:  # noqa: BLE001 - nobody to stream to: stop decoding for it
                broken.append(e)
                pending.cancel()

        def final(reply: Reply) -> None:
            if broken:
                raise broken[0]
            send(tensors(reply, deltas.finish(reply.text), [], True), True)

        pending = self.submit([row], lambda new: self.outbox.put(lambda ids=list(new): chunk(ids)), cancelled)
        pending.outbox, pending.send_final = self.outbox, final
        return pending

    def run(
        self,
        row: RowRequest,
        on_tokens: Callable[[list[int]], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Reply:
        """Generate for one row and wait: the in-process form of :meth:`submit`."""
        return self.submit([row], on_tokens, cancelled).wait()[0]

    def run_streaming(
        self,
        row: RowRequest,
        send: Callable[[dict[str, np.ndarray], bool], None],
        cancelled: Callable[[], bool] | None = None,
    ) -> Reply:
        return self.submit_streaming(row, send, cancelled).wait()[0]

    def close(self) -> None:
        """Fail what is queued or running (RequestCancelled) and stop the threads."""
        self.scheduler.close()
        self.watch.close()
        self.outbox.close()

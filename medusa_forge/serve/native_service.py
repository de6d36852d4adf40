"""What the native Triton model does, without Triton: one engine, one lock, contract-shaped replies.

Concurrency. The engine decodes one sequence at a time (one static KV cache), so :meth:`run` holds
a lock for the whole generation. Inside tritonserver each model instance is its own Python stub
process with its own :class:`NativeService`, and Triton calls ``execute`` of one instance for one
batch at a time, so concurrent requests queue in Triton's scheduler (bounded by the queue timeout
of the model config) and are served in order; the lock keeps that true for any caller sharing a
service across threads (in-process benchmarks, the load test's baseline). More throughput comes from
``instance_group { count: N }`` (``triton-repo --instances N``): N processes, N engines.

Limits per request. A generation stops with an error after ``request_timeout_s`` of execution, and
as soon as the caller reports it cancelled (``cancelled()`` is polled between decoding steps, at
most every ``CANCEL_POLL_S``), so a client that goes away frees the instance within a step.

The same class is the in-process baseline of the load test, so "gRPC overhead" compares like with like.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, fields
from typing import Callable

import numpy as np

from medusa_forge.errors import ForgeError
from medusa_forge.serve.replies import Reply, reply_tensors
from medusa_forge.serve.request import RowRequest
from medusa_forge.serve.text_stream import TextDeltas

CANCEL_POLL_S = 0.02  # asking Triton "cancelled?" is an IPC round trip: not more often than this


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
    request_timeout_s: str = "600"  # execution time limit of one request

    def to_parameters(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "NativeModelSettings":
        known = {f.name for f in fields(cls)}
        if not params.get("engine_dir"):
            raise ForgeError("model config has no 'engine_dir' parameter; regenerate it with `medusa-forge triton-repo`")
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


class RequestCancelled(Exception):
    """The caller went away (or cancelled): stop generating."""


class RequestTimedOut(ForgeError):
    """The request ran past the model's ``request_timeout_s``."""


class _Watch:
    """Between decoding steps: raise when the request is cancelled or past its deadline."""

    def __init__(self, timeout_s: float, cancelled: Callable[[], bool] | None):
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.cancelled = cancelled
        self.next_poll = 0.0

    def check(self, produced: int) -> None:
        now = time.monotonic()
        if self.cancelled is not None and now >= self.next_poll:
            self.next_poll = now + CANCEL_POLL_S
            if self.cancelled():
                raise RequestCancelled()
        if now > self.deadline:
            raise RequestTimedOut(f"request exceeded the model's timeout of {self.timeout_s:g} s after {produced} "
                                  "tokens; ask for fewer max_tokens or raise --request-timeout")


class NativeService:
    def __init__(self, settings: NativeModelSettings, device_id: int | None = None):
        import torch

        from medusa_forge.build.open import open_engine

        if settings.torch_threads:
            torch.set_num_threads(int(settings.torch_threads))
        device = settings.device or None
        if device == "cuda" and device_id is not None:
            device = f"cuda:{device_id}"
        self.settings = settings
        self.timeout_s = settings.timeout_s
        self.engine = open_engine(settings.engine_dir, settings.medusa_dir or None, settings.medusa_choices or None,
                                  device=device, dtype=settings.dtype or None,
                                  max_seq_len=int(settings.max_seq_len) if settings.max_seq_len else None,
                                  compile=_true(settings.compile), with_heads=settings.wants_medusa)
        if settings.wants_medusa and self.engine.tree is None:
            raise ForgeError(f"{settings.engine_dir} has no Medusa heads; serve it with `triton-repo --no-medusa`")
        self.use_medusa = settings.wants_medusa
        self.lock = threading.Lock()
        if int(settings.warmup_tokens or 0) > 0:
            from medusa_forge.engine.generation import GenerationConfig

            self.engine.generate("def", GenerationConfig(max_new_tokens=int(settings.warmup_tokens),
                                                         use_medusa=self.use_medusa, ignore_eos=True))

    @property
    def drafts_per_step(self) -> int:
        return self.engine.tree.num_nodes - 1 if self.use_medusa else 0

    def run(self, row: RowRequest, on_tokens: Callable[[list[int]], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> Reply:
        """Generate for one row under the engine lock; ``on_tokens`` sees each step's new ids.

        Raises :class:`RequestCancelled` once ``cancelled()`` says so (also before starting, for a request
        cancelled while it waited) and :class:`RequestTimedOut` past the deadline, both between steps (the
        engine restarts cleanly on the next request).
        """
        with self.lock:
            watch = _Watch(self.timeout_s, cancelled)
            watch.check(0)  # gone while it waited: no prefill for nobody
            produced = [0]

            def step(new: list[int]) -> None:
                produced[0] += len(new)
                if on_tokens is not None:
                    on_tokens(new)
                watch.check(produced[0])

            result = self.engine.generate(row.prompt, row.gcfg, on_tokens=step)
        return Reply.from_result(result, self.drafts_per_step)

    def run_streaming(self, row: RowRequest, send: Callable[[dict[str, np.ndarray], bool], None],
                      cancelled: Callable[[], bool] | None = None) -> Reply:
        """Stream one row: ``send(tensors, final)`` per decoding step with the settled text delta and
        the step's token ids, then a final response with the remaining text and the statistics."""
        deltas = TextDeltas(self.engine.tokenizer.decode, row.gcfg.stop_strings)

        def on_tokens(new: list[int]) -> None:
            send(reply_tensors(None, deltas.push(new), list(new), final=False, gcfg=row.gcfg), False)

        reply = self.run(row, on_tokens, cancelled)
        send(reply_tensors(reply, deltas.finish(reply.text), [], final=True), True)
        return reply

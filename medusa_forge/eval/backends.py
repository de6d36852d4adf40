"""What ``eval`` measures: a served model (Triton gRPC) or, for GPU runs without Triton, an engine in process.

Both give a :class:`Completion` for a prompt, with the same fields and the same clock (the caller's
wall time from sending the request to the first and the last token), so MMLU and speed results
have one format whichever way they were taken.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class Completion:
    text: str
    ttft_s: float  # request sent -> first token received (streaming), else == total_s
    total_s: float  # request sent -> last token received
    output_tokens: list[int] | None = None  # generated ids (native engine only)
    accepted_per_step: list[int] = field(default_factory=list)  # tokens per decoding step (native only)
    total_accepted_draft_tokens: int | None = None  # tensorrtllm_backend's speculative statistics
    total_draft_tokens: int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.output_tokens) if self.output_tokens is not None else 0


class Backend(Protocol):
    label: str  # model name (Triton) or engine path (in process), for reports
    kind: str  # "triton" | "in-process"

    @property
    def can_stream(self) -> bool: ...

    def complete(self, prompt: str, max_tokens: int, stream: bool = False, ignore_eos: bool = False) -> Completion: ...


class TritonBackend:
    """A model on a Triton server, through :class:`medusa_forge.serve.client.TritonLLMClient`.

    One client per thread: a decoupled model is called over a bidirectional stream, and a client
    holds one stream at a time. Each client keeps its stream open from request to request
    (``keep_stream``), so what is timed is the model and not a stream's setup and teardown (a few
    ms per request; ``bench serve`` measures it); :meth:`close` ends them. ``temperature > 0`` asks
    a Medusa model for typical acceptance. EOS is ignored by sending ``end_id = -1`` (the native
    model's convention for "no end token").
    """

    kind = "triton"

    def __init__(
        self, url: str, model: str, timeout_s: float = 300.0, temperature: float = 0.0, keep_stream: bool = True
    ):
        self.url = url
        self.label = model
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.keep_stream = keep_stream
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()
        self.check_ready()

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            from medusa_forge.serve.client import TritonLLMClient

            client = self._local.client = TritonLLMClient(
                self.url, self.label, self.timeout_s, keep_stream=self.keep_stream
            )
            with self._lock:
                self._clients.append(client)
        return client

    def check_ready(self) -> None:
        """Fail before the first request: an unreachable server and an unready model each get one line."""
        from medusa_forge.errors import ForgeError

        if self._client().is_ready():
            return
        live, states = _probe_server(self.url, min(self.timeout_s, 10.0))
        if not live:
            raise ForgeError(
                f"Triton server at {self.url} is unreachable; start it with `medusa-forge serve` or check --url"
            )
        raise ForgeError(
            f"model '{self.label}' is not ready on {self.url} (models there: {states or 'none'}); "
            "check the model name and the server log"
        )

    @property
    def can_stream(self) -> bool:
        """Only a decoupled model can answer with one response per step (Triton's rule)."""
        return self._client().decoupled

    def complete(self, prompt: str, max_tokens: int, stream: bool = False, ignore_eos: bool = False) -> Completion:
        sampling = {"temperature": self.temperature} if self.temperature > 0 else {}
        if ignore_eos:
            sampling["end_id"] = -1
        r = self._client().generate(prompt, max_tokens, stream=stream, **sampling)
        return Completion(
            r.text,
            r.ttft_s,
            r.total_s,
            r.output_tokens,
            list(r.accepted_per_step),
            r.total_accepted_draft_tokens,
            r.total_draft_tokens,
        )

    def close(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            c.close()


class EngineBackend:
    """A native engine in this process, greedy, base (``use_medusa=False``) or Medusa decoding.

    The engine has one static KV cache, so requests are serialised by a lock; two backends may share
    one engine (base and Medusa modes of the same weights), which the lock also covers.
    """

    kind = "in-process"

    def __init__(
        self, engine, use_medusa: bool, label: str, lock: threading.Lock | None = None, temperature: float = 0.0
    ):
        self.engine = engine
        self.use_medusa = use_medusa
        self.label = label
        self.lock = lock or threading.Lock()
        self.temperature = temperature

    can_stream = True  # the engine reports every step through on_tokens

    def complete(self, prompt: str, max_tokens: int, stream: bool = False, ignore_eos: bool = False) -> Completion:
        from medusa_forge.engine.generation import GenerationConfig

        gcfg = GenerationConfig(
            max_new_tokens=max_tokens, use_medusa=self.use_medusa, temperature=self.temperature, ignore_eos=ignore_eos
        )
        first: list[float] = []
        with self.lock:
            t0 = time.perf_counter()
            r = self.engine.generate(prompt, gcfg, on_tokens=lambda _: first or first.append(time.perf_counter()))
            t1 = time.perf_counter()
        ttft = (first[0] - t0) if first else t1 - t0
        accepted = sum(n - 1 for n in r.accepted_per_step) if self.use_medusa else None
        drafts = sum(r.drafts_per_step) if self.use_medusa else None  # each step's tree less its root
        return Completion(r.text, ttft, t1 - t0, list(r.tokens), list(r.accepted_per_step), accepted, drafts)


def _probe_server(url: str, timeout_s: float) -> tuple[bool, str]:
    """(server live?, "name: STATE, ...") for an error message; health endpoints only, no inference."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        client = grpcclient.InferenceServerClient(url.removeprefix("grpc://"))
    except InferenceServerException:
        return False, ""
    try:
        if not client.is_server_live(client_timeout=timeout_s):
            return False, ""
        index = client.get_model_repository_index(as_json=True, client_timeout=timeout_s).get("models", [])
        return True, ", ".join(f"{m['name']}: {m.get('state', 'UNAVAILABLE')}" for m in index)
    except InferenceServerException:
        return False, ""
    finally:
        client.close()

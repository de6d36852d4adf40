"""gRPC client of the one contract (medusa_forge/contract.py), for `query`, `eval` and the load test.

It works unchanged against the native Python-backend model and tensorrtllm_backend's ensemble:
it sends the contract's inputs with a batch dimension of one, asks for no explicit output list and
reads whichever of the contract's outputs come back.

Every request goes over gRPC's bidirectional stream (``ModelStreamInfer``), as tensorrtllm_backend's
own end_to_end_grpc_client.py does: it is the only RPC a decoupled model accepts, it works for a
non-decoupled one too, and an ensemble does not say in its config whether its LLM step is
decoupled. ``stream`` then only tells the model whether to answer step by step. Each request
opens its own stream and closes it after the final response: an idle client holds no stream, and
an open stream would keep tritonserver from shutting down (its gRPC server waits for every open
RPC). ``keep_stream=True`` keeps one stream open from request to request instead (until an error,
an abandoned request or ``close()``): it saves the stream's setup and teardown, a few ms per request
(``bench serve`` measures both), at the price of holding an RPC open while idle. A client serves one
request at a time; use one per thread.

Every wait is bounded by ``timeout_s``: a dead or hung server becomes a :class:`ForgeError` naming
the server and what failed, never a hang; an abandoned request (timeout, error in ``on_text``,
Ctrl-C) is cancelled on the server by closing its stream with ``cancel_requests=True``.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from medusa_forge.contract import INPUT_BY_NAME, MODEL_NAME
from medusa_forge.errors import ForgeError


@dataclass
class GenerationReply:
    text: str
    ttft_s: float  # request sent -> first text received (== total_s without streaming)
    total_s: float  # request sent -> final response received
    output_tokens: list[int] | None = None  # native model only
    accepted_per_step: list[int] = field(default_factory=list)  # native model only
    acceptance_rate: float | None = None
    total_accepted_draft_tokens: int | None = None
    total_draft_tokens: int | None = None
    responses: int = 1


def _grpc():
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    return grpcclient, InferenceServerException


def _message(exc: Exception) -> str:
    msg = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    status = exc.status() if hasattr(exc, "status") and callable(exc.status) else None
    msg = " ".join(str(msg).split())  # one line: gRPC details can carry newlines
    return f"{msg} ({status})" if status and status not in msg else msg


def _status(exc: Exception) -> str:
    status = exc.status() if hasattr(exc, "status") and callable(exc.status) else None
    return str(status or "")


# What gRPC says when no connection could be made at all (nothing listens, wrong host).
_NO_CONNECTION = (
    "failed to connect",
    "connection refused",
    "name resolution",
    "dns resolution",
    "no route to host",
    "could not contact",
)


class TritonLLMClient:
    def __init__(
        self, url: str = "localhost:8001", model: str = MODEL_NAME, timeout_s: float = 120.0, keep_stream: bool = False
    ):
        grpcclient, _ = _grpc()
        self.url = url.removeprefix("grpc://")
        self.model = model
        self.timeout_s = timeout_s
        self.keep_stream = keep_stream
        self._client = grpcclient.InferenceServerClient(self.url)
        self._responses: queue.Queue | None = None  # the open stream's responses, None: no stream open
        self._lock = threading.Lock()
        self._decoupled: bool | None = None  # the model's transaction policy, read once when asked

    def close(self) -> None:
        self._close_stream(cancel=True)
        self._client.close()

    def __enter__(self) -> TritonLLMClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------- metadata
    def _call(self, what: str, fn, *args, **kwargs):
        _, InferenceServerException = _grpc()
        try:
            return fn(*args, client_timeout=self.timeout_s, **kwargs)
        except InferenceServerException as e:
            raise ForgeError(f"{what} on {self.url} failed: {_message(e)}") from None

    def is_ready(self) -> bool:
        _, InferenceServerException = _grpc()
        try:
            return bool(self._client.is_model_ready(self.model, client_timeout=min(5.0, self.timeout_s)))
        except InferenceServerException:
            return False

    def inference_statistics(self) -> dict:
        """Triton's per-model counters (``success``, ``compute_infer`` ... in ns), as JSON."""
        return self._call("reading statistics", self._client.get_inference_statistics, self.model, as_json=True)

    def model_config(self, model: str | None = None) -> dict:
        """The served ``config.pbtxt`` of ``model`` (default: this client's), as JSON."""
        return self._call(
            f"reading the config of model '{model or self.model}'",
            self._client.get_model_config,
            model or self.model,
            as_json=True,
        ).get("config", {})

    @property
    def decoupled(self) -> bool:
        """Whether the model may answer step by step (``stream=true``): its transaction policy is
        decoupled, or, for an ensemble (whose own config does not say), one of its steps' models is."""
        if self._decoupled is None:
            cfg = self.model_config()
            flag = bool(cfg.get("model_transaction_policy", {}).get("decoupled", False))
            if not flag and cfg.get("platform") == "ensemble":
                steps = cfg.get("ensemble_scheduling", {}).get("step", [])
                flag = any(
                    self.model_config(s["model_name"]).get("model_transaction_policy", {}).get("decoupled")
                    for s in steps
                    if s.get("model_name")
                )
            self._decoupled = flag
        return self._decoupled

    # --------------------------------------------------------------- requests
    def make_inputs(
        self,
        prompt: str,
        max_tokens: int,
        stream: bool,
        stop_words: tuple[str, ...] = (),
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        end_id: int | None = None,
        random_seed: int | None = None,
    ):
        grpcclient, _ = _grpc()
        values = {
            "text_input": np.array([[prompt.encode("utf-8")]], dtype=np.object_),
            "max_tokens": np.array([[max_tokens]], dtype=np.int32),
            "stream": np.array([[stream]], dtype=bool),
        }
        if stop_words:
            values["stop_words"] = np.array([[s.encode("utf-8") for s in stop_words]], dtype=np.object_)
        if temperature and top_k is None and top_p is None:
            top_p = 1.0  # sample from the whole distribution: top_k = top_p = 0 would be greedy (TensorRT-LLM's rule)
        scalars = {
            "temperature": (temperature, np.float32),
            "top_k": (top_k, np.int32),
            "top_p": (top_p, np.float32),
            "end_id": (end_id, np.int32),
            "random_seed": (random_seed, np.uint64),
        }
        for name, (value, dtype) in scalars.items():
            if value is not None:
                values[name] = np.array([[value]], dtype=dtype)
        inputs = []
        for name, array in values.items():
            tensor = grpcclient.InferInput(name, list(array.shape), INPUT_BY_NAME[name].client_dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        return inputs

    def generate(
        self,
        prompt: str,
        max_tokens: int,
        stream: bool = False,
        on_text: Callable[[str], None] | None = None,
        **sampling,
    ) -> GenerationReply:
        """One completion; ``stream`` needs a decoupled model; ``on_text`` receives text as it arrives."""
        return self.send(self.make_inputs(prompt, max_tokens, stream, **sampling), on_text)

    def _open_stream(self) -> queue.Queue:
        if self._responses is not None and not self._responses.empty():
            # A kept stream got something between requests: only an error can arrive there (the
            # server went away, or the stream timed out). Start afresh instead of reading it as an answer.
            self._close_stream(cancel=True)
        if self._responses is None:
            responses: queue.Queue = queue.Queue()
            try:
                self._client.start_stream(callback=lambda result, error: responses.put((result, error)))
            except Exception as e:  # noqa: BLE001 - tritonclient raises several kinds here
                raise ForgeError(f"cannot open a gRPC stream to {self.url}: {_message(e)}") from None
            self._responses = responses
        return self._responses

    def _close_stream(self, cancel: bool) -> None:
        if self._responses is not None:
            self._responses = None
            with contextlib.suppress(Exception):
                self._client.stop_stream(cancel_requests=cancel)

    def send(self, inputs, on_text: Callable[[str], None] | None = None) -> GenerationReply:
        """One request from ready-made ``InferInput`` tensors (``make_inputs``, or your own)."""
        with self._lock:
            return self._send(inputs, on_text)

    def _send(self, inputs, on_text) -> GenerationReply:
        _, InferenceServerException = _grpc()
        t0 = time.perf_counter()
        responses = self._open_stream()
        acc = _Accumulator()
        ttft = None
        deadline = t0 + self.timeout_s
        done = False
        try:
            self._client.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
            while not done:
                try:
                    result, error = responses.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    raise ForgeError(
                        f"no response from {self.url} (model '{self.model}') within "
                        f"{self.timeout_s:g} s; is the server alive? (--timeout to wait longer)"
                    ) from None
                if error is not None:  # a request error or a broken stream: either way start afresh
                    raise self._failure(error, acc.count)
                text = acc.add(result)
                if text and ttft is None:
                    ttft = time.perf_counter() - t0
                if text and on_text is not None:
                    on_text(text)
                done = _is_final(result)
        except InferenceServerException as e:
            # The stream broke before the request could be queued on it; tritonclient then reports
            # the cause (unreachable, connection lost) through the callback, not in this exception.
            try:
                _, error = responses.get(timeout=min(1.0, max(0.0, deadline - time.perf_counter())))
            except queue.Empty:
                error = None
            raise self._failure(error if error is not None else e, acc.count) from None
        finally:
            if not (done and self.keep_stream):
                self._close_stream(cancel=not done)  # abandoned: cancel it on the server
        reply = acc.reply(t0, time.perf_counter())
        reply.ttft_s = ttft if ttft is not None else reply.total_s
        return reply

    def _failure(self, error: Exception, responses: int) -> ForgeError:
        """One line naming the server and what went wrong: nothing listens there, the connection was
        lost (a crashed or killed server), or the model's own error for this request."""
        detail = _message(error)
        busy = "retry later" in detail  # the model's own UNAVAILABLE (a full queue), not a lost server
        if (
            (_status(error) == "StatusCode.UNAVAILABLE" and not busy)
            or "Socket closed" in detail
            or "Stream removed" in detail
        ):
            if responses == 0 and any(k in detail.lower() for k in _NO_CONNECTION):
                return ForgeError(
                    f"Triton server at {self.url} is unreachable ({detail}); is it running? (check --url)"
                )
            return ForgeError(
                f"lost the connection to the Triton server at {self.url} during a request to model "
                f"'{self.model}' after {responses} response(s) ({detail}); did the server die? "
                "(check its log)"
            )
        return ForgeError(f"model '{self.model}' on {self.url}: {detail}")


def _is_final(result) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


class _Accumulator:
    """Folds the responses of one request into a :class:`GenerationReply`."""

    def __init__(self):
        self.text: list[str] = []
        self.tokens: list[int] | None = None
        self.stats: dict[str, object] = {}
        self.count = 0

    def add(self, result) -> str:
        self.count += 1
        text = ""
        out = result.as_numpy("text_output")
        if out is not None and out.size:
            cell = out.reshape(-1)[0]
            text = cell.decode("utf-8", errors="replace") if isinstance(cell, bytes) else str(cell)
            self.text.append(text)
        ids = result.as_numpy("output_tokens")
        if ids is not None:
            self.tokens = (self.tokens or []) + [int(t) for t in ids.reshape(ids.shape[0], -1)[0] if t >= 0]
        steps = result.as_numpy("accepted_per_step")
        if steps is not None:
            self.stats["accepted_per_step"] = [int(t) for t in steps.reshape(steps.shape[0], -1)[0] if t >= 0]
        for name, cast in (
            ("acceptance_rate", float),
            ("total_accepted_draft_tokens", int),
            ("total_draft_tokens", int),
        ):
            value = result.as_numpy(name)
            if value is not None and value.size:
                self.stats[name] = cast(value.reshape(-1)[0])
        return text

    def reply(self, t0: float, t1: float) -> GenerationReply:
        return GenerationReply(
            text="".join(self.text),
            ttft_s=t1 - t0,
            total_s=t1 - t0,
            output_tokens=self.tokens,
            responses=self.count,
            **self.stats,
        )

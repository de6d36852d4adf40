"""The ``model.py`` that Triton's Python backend loads for a native engine (copied into ``<repo>/<name>/1/``).

It only translates between Triton and :mod:`medusa_forge.serve.native_service`; everything it does
is importable and testable without Triton. Behaviour:

- ``initialize`` loads the engine named by the config's ``parameters`` and generates a couple of
  tokens; any failure raises, so Triton marks the model UNAVAILABLE (not READY, with the reason in
  the repository index) and tritonserver, with its default ``--exit-on-error``, refuses to start.
- ``execute`` parses each request, hands it to the instance's scheduler and returns at once; a
  thread per request waits for its outcome and answers through the request's response sender. So
  a request never waits for another one's ``execute``: with ``max_batch_size`` > 1 it joins the
  running batch at the next step. The Python backend lets any model, decoupled or not, answer
  through the sender after ``execute`` returned None (exactly one final response when not decoupled).
- Non-decoupled: one response per request. Decoupled (``--decoupled``): with ``stream=true`` one
  response per decoding step carrying the new text and token ids, then a final one with the rest of
  the text and the statistics; with ``stream=false`` a single final response.
- A bad request gets an error response naming the problem (``INVALID_ARG``); the instance keeps serving.
  A full request queue answers ``UNAVAILABLE`` (retry later).
- A cancelled request (client gone, stream closed, ``stop_stream(cancel_requests=True)``) stops
  generating within one decoding step; so does one past the model's ``request_timeout_s``. When
  even its error response cannot be sent (the client is gone), that is logged and the instance
  goes on with the next request.
- Concurrency per instance: see native_service.py.
"""

from __future__ import annotations

import functools
import json
import threading

import triton_python_backend_utils as pb_utils

from medusa_forge.engine.tickets import QueueFull
from medusa_forge.errors import ForgeError
from medusa_forge.serve.contracts import ServedContract, served_contract
from medusa_forge.serve.native_service import (
    NativeModelSettings,
    NativeService,
    Pending,
    RequestCancelled,
    scheduler_warnings,
)
from medusa_forge.serve.replies import stack_rows


def _error(message: str, code_name: str) -> pb_utils.TritonError:
    code = getattr(pb_utils.TritonError, code_name, None)  # older pb_utils have no codes
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


def _describe(exc: Exception) -> pb_utils.TritonError:
    if isinstance(exc, RequestCancelled):
        return _error("request cancelled", "INTERNAL")
    if isinstance(exc, QueueFull):  # busy, not wrong: the client may retry the same request
        return _error(str(exc), "UNAVAILABLE")
    if isinstance(exc, ForgeError):
        return _error(str(exc), "INVALID_ARG")
    return _error(f"internal error: {type(exc).__name__}: {exc}", "INTERNAL")


def _response(tensors) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])


def _failed(exc: Exception) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(output_tensors=[], error=_describe(exc))


def _log_warning(message: str) -> None:
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        logger.log_warn(message)


def _log_info(message: str) -> None:
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        logger.log_info(message)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        settings = NativeModelSettings.from_parameters(params)
        if settings.batch_size != max(1, self.max_batch_size):
            raise ForgeError(
                f"config max_batch_size {self.max_batch_size} differs from parameter max_batch_size "
                f"{settings.batch_size}; regenerate the repository with `medusa-forge triton-repo`"
            )
        device_id = args.get("model_instance_device_id")
        self.service = NativeService(settings, device_id=int(device_id) if device_id not in (None, "") else None)
        self.contract = served_contract(settings.contract)
        scheduler = self.service.scheduler.describe()
        for warning in scheduler_warnings(scheduler):
            _log_warning(warning)
        # The speculation policy and the cost model it measured decide every step's tree: say which.
        _log_info(
            f"medusa-forge scheduler of {args.get('model_name', 'this model')}: {json.dumps(scheduler, sort_keys=True)}"
        )

    def _rows(self, request):
        inputs = {}
        for spec in self.contract.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is not None:
                inputs[spec.name] = tensor.as_numpy()
        return self.contract.parse(
            inputs, self.service.use_medusa, self.max_batch_size, self.decoupled, self.service.engine.tokenizer
        )

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                rows = self._rows(request)  # the request's tensors are freed once execute returns
                if rows[0].stream:

                    def send(tensors, last: bool, sender=sender) -> None:
                        sender.send(_response(tensors), flags=_FINAL if last else 0)

                    pending = self.service.submit_streaming(rows[0], send, cancelled=sender.is_cancelled)
                else:
                    pending = self.service.submit(rows, cancelled=sender.is_cancelled)
            except Exception as e:  # noqa: BLE001 - bad request, full queue, caller gone: its error response
                _send_error(sender, e)
                continue
            threading.Thread(
                target=_answer,
                args=(pending, sender, rows[0].stream, rows[0].pad_id, self.contract),
                daemon=True,
                name="native-reply",
            ).start()

    def finalize(self) -> None:
        service, self.service = getattr(self, "service", None), None
        if service is not None:  # None when initialize failed
            service.close()  # what is queued or running gets "request cancelled"
            # What the policy chose over the model's life: steps by tree size, the observed slowdowns.
            _log_info(f"medusa-forge scheduler at unload: {json.dumps(service.scheduler.describe(), sort_keys=True)}")


_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _answer(pending: Pending, sender, stream: bool, pad_id: int, contract: ServedContract) -> None:
    """Wait for one request's outcome and send it (a streamed one has sent its chunks already)."""
    try:
        replies = pending.wait()
        if not stream:
            tensors = stack_rows([contract.reply(r, r.text, r.tokens, True) for r in replies], pad_id)
            sender.send(_response(tensors), flags=_FINAL)
    except Exception as e:  # noqa: BLE001 - cancelled, timed out, or engine failure
        pending.respond(functools.partial(_send_error, sender, e))  # after any chunk already streamed


def _send_error(sender, exc: Exception) -> None:
    try:
        sender.send(_failed(exc), flags=_FINAL)
    except Exception as send_error:  # noqa: BLE001 - nobody left to tell; never stop serving
        _log_warning(f"could not send the error response ({exc}) of a request: {send_error}")

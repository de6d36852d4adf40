"""The ``model.py`` that Triton's Python backend loads for a native engine (copied into ``<repo>/<name>/1/``).

It only translates between Triton and :mod:`medusa_forge.serve.native_service`; everything it does
is importable and testable without Triton. Behaviour:

- ``initialize`` loads the engine named by the config's ``parameters`` and generates a couple of
  tokens; any failure raises, so Triton marks the model UNAVAILABLE (not READY, with the reason in
  the repository index) and tritonserver, with its default ``--exit-on-error``, refuses to start.
- Non-decoupled: one response per request. Decoupled (``--decoupled``): with ``stream=true`` one
  response per decoding step carrying the new text and token ids, then a final one with the rest of
  the text and the statistics; with ``stream=false`` a single final response.
- A bad request gets an error response naming the problem (``INVALID_ARG``); the instance keeps serving.
- A cancelled request (client gone, stream closed, ``stop_stream(cancel_requests=True)``) stops
  generating within one decoding step; so does one past the model's ``request_timeout_s``. When
  even its error response cannot be sent (the client is gone), that is logged and the instance
  goes on with the next request.
- One request executes at a time per instance (see native_service.py for the concurrency model).
"""

from __future__ import annotations

import json

import triton_python_backend_utils as pb_utils

from medusa_forge.contract import INPUTS
from medusa_forge.errors import ForgeError
from medusa_forge.serve.native_service import NativeModelSettings, NativeService, RequestCancelled
from medusa_forge.serve.replies import reply_tensors, stack_rows
from medusa_forge.serve.request import parse_request


def _error(message: str, invalid_argument: bool) -> "pb_utils.TritonError":
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_argument else "INTERNAL", None)
    return pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)


def _describe(exc: Exception) -> "pb_utils.TritonError":
    if isinstance(exc, RequestCancelled):
        return _error("request cancelled", invalid_argument=False)
    if isinstance(exc, ForgeError):
        return _error(str(exc), invalid_argument=True)
    return _error(f"internal error: {type(exc).__name__}: {exc}", invalid_argument=False)


def _response(tensors) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in tensors.items()])


def _failed(exc: Exception) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(output_tensors=[], error=_describe(exc))


def _log_warning(message: str) -> None:
    logger = getattr(pb_utils, "Logger", None)
    if logger is not None:
        logger.log_warn(message)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        device_id = args.get("model_instance_device_id")
        self.service = NativeService(NativeModelSettings.from_parameters(params),
                                     device_id=int(device_id) if device_id not in (None, "") else None)

    def _rows(self, request):
        inputs = {}
        for spec in INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
            if tensor is not None:
                inputs[spec.name] = tensor.as_numpy()
        return parse_request(inputs, self.service.use_medusa, self.max_batch_size, self.decoupled,
                             self.service.engine.tokenizer)

    def _complete(self, rows, cancelled) -> dict:
        per_row = []
        for row in rows:
            reply = self.service.run(row, cancelled=cancelled)
            per_row.append(reply_tensors(reply, reply.text, reply.tokens, final=True))
        return stack_rows(per_row, rows[0].pad_id)

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                self._execute_decoupled(request)
            return None
        responses = []
        for request in requests:
            try:
                responses.append(_response(self._complete(self._rows(request), request.is_cancelled)))
            except Exception as e:  # noqa: BLE001 - every failure becomes this request's error response
                responses.append(_failed(e))
        return responses

    def _execute_decoupled(self, request) -> None:
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            rows = self._rows(request)
            if rows[0].stream:
                def send(tensors, last: bool) -> None:
                    sender.send(_response(tensors), flags=final if last else 0)

                self.service.run_streaming(rows[0], send, cancelled=sender.is_cancelled)
            else:
                sender.send(_response(self._complete(rows, sender.is_cancelled)), flags=final)
        except Exception as e:  # noqa: BLE001 - cancelled, timed out, bad request or engine failure
            try:
                sender.send(_failed(e), flags=final)
            except Exception as send_error:  # noqa: BLE001 - nobody left to tell; never stop serving
                _log_warning(f"could not send the error response ({e}) of a request: {send_error}")

    def finalize(self) -> None:
        self.service = None

"""tensorrtllm_backend v0.11.0's inflight_batcher_llm_client.py requests, against a native ``tensorrt_llm`` model.

That client (tag v0.11.0, commit 6791733e) calls the ensemble's LLM step with token ids; its tensors
are built here as it builds them (``client_inputs`` in test_llm_request.py, then gRPC inputs with
``np_to_triton_dtype``), non-streaming with ``async_infer`` (a callback, ``parameters={'Streaming':
False}``) and streaming over a gRPC stream; it reads ``output_ids`` [1, 1, k] and ``sequence_length``
[1, 1] from each response, and ``cum_log_probs`` / ``output_log_probs`` / ``context_logits`` /
``generation_logits`` when it asked. Outputs exclude the prompt, as triton-repo configures
TensorRT-LLM (the client's ``--exclude-input-in-output``).

Served by test_serve_upstream_clients.py's ``unary_ensemble`` server: ``tensorrt_llm`` (unary) and
``tensorrt_llm_decoupled`` (streaming) over the session's native engine (Medusa, tree `small`).
"""

from __future__ import annotations

import queue
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from test_llm_request import client_inputs
from test_serve_upstream_clients import engine, unary_ensemble  # noqa: F401 - the fixtures
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.logits_processing import LogitsSettings

TEXT = "def fibonacci(n):\n    "


def grpc_inputs(arrays: dict[str, np.ndarray]) -> list:
    out = []
    for name, array in arrays.items():
        t = grpcclient.InferInput(name, array.shape, np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        out.append(t)
    return out


def unary(url: str, model: str, arrays: dict, outputs=None):
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(url) as client:
        client.async_infer(
            model,
            grpc_inputs(arrays),
            outputs=outputs,
            request_id="",
            callback=partial(lambda q, result, error: q.put(error or result), answers),
            parameters={"Streaming": False},
        )
        return answers.get(timeout=120)


def streamed(url: str, model: str, arrays: dict) -> tuple[list[int], list]:
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=partial(lambda q, result, error: q.put(error or result), answers))
        client.async_stream_infer(model, grpc_inputs(arrays), request_id="")
        client.stop_stream(cancel_requests=False)
    tokens, results = [], []
    while not answers.empty():
        result = answers.get()
        assert not isinstance(result, InferenceServerException), result
        results.append(result)
        lengths = result.as_numpy("sequence_length")
        if lengths[0][0] > 0:
            tokens += list(result.as_numpy("output_ids")[0][0])
    return tokens, results


def test_the_clients_default_request_gets_greedy_decoding_of_its_ids(unary_ensemble, engine):  # noqa: F811
    ids = engine.tokenizer.encode(TEXT)
    want = engine.generate_ids(ids, GenerationConfig(max_new_tokens=16, eos_token_ids=(2,)))
    result = unary(unary_ensemble, "tensorrt_llm", client_inputs(ids))
    assert not isinstance(result, InferenceServerException), result
    n = result.as_numpy("sequence_length")[0][0]
    assert result.as_numpy("output_ids")[0][0][:n].tolist() == want.tokens and n == len(want.tokens)
    tokens, results = streamed(unary_ensemble, "tensorrt_llm_decoupled", client_inputs(ids, streaming=True))
    assert tokens == want.tokens and len(results) > 2


def test_every_single_beam_option_of_the_client(unary_ensemble, engine):  # noqa: F811
    ids = engine.tokenizer.encode(TEXT)
    options = dict(
        repetition_penalty=1.3,
        presence_penalty=0.4,
        frequency_penalty=0.2,
        return_context_logits=True,
        return_generation_logits=True,
    )
    settings = LogitsSettings(float(np.float32(1.3)), float(np.float32(0.4)), float(np.float32(0.2)), end_ids=(2,))
    want = engine.generate_ids(
        ids,
        GenerationConfig(
            max_new_tokens=16,
            eos_token_ids=(2,),
            logits_settings=settings,
            return_log_probs=True,
            return_context_logits=True,
            return_generation_logits=True,
        ),
    )
    result = unary(unary_ensemble, "tensorrt_llm", client_inputs(ids, return_log_probs=True, **options))
    assert not isinstance(result, InferenceServerException), result
    assert result.as_numpy("output_ids")[0][0].tolist() == want.tokens
    np.testing.assert_allclose(result.as_numpy("output_log_probs")[0][0], want.log_probs, atol=1e-4)
    assert result.as_numpy("cum_log_probs")[0][0] == pytest.approx(sum(want.log_probs), abs=1e-4)
    np.testing.assert_allclose(result.as_numpy("context_logits")[0], want.context_logits, atol=1e-4)
    np.testing.assert_allclose(result.as_numpy("generation_logits")[0][0], want.generation_logits, atol=1e-4)
    tokens, _ = streamed(unary_ensemble, "tensorrt_llm_decoupled", client_inputs(ids, streaming=True, **options))
    assert tokens == want.tokens


def test_requested_outputs_come_back_alone(unary_ensemble, engine):  # noqa: F811
    outputs = [grpcclient.InferRequestedOutput(n) for n in ("output_ids", "sequence_length")]
    result = unary(unary_ensemble, "tensorrt_llm", client_inputs(engine.tokenizer.encode(TEXT)), outputs)
    assert {o.name for o in result.get_response().outputs} == {"output_ids", "sequence_length"}


def test_beam_width_4_gets_invalid_arg_and_the_next_request_is_served(unary_ensemble, engine):  # noqa: F811
    ids = engine.tokenizer.encode(TEXT)
    bad = {**client_inputs(ids), "beam_width": np.array([[4]], dtype=np.int32)}
    error = unary(unary_ensemble, "tensorrt_llm", bad)
    assert isinstance(error, InferenceServerException) and error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "input 'beam_width' must be 1" in error.message()
    assert unary(unary_ensemble, "tensorrt_llm", client_inputs(ids)).as_numpy("output_ids").size

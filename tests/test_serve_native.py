"""The native engine behind a real tritonserver (nvidia-pytriton's, CPU), queried over gRPC.

One server for the whole session (the ``native_triton`` fixture in conftest.py): a float32 native
engine of pycoder-26m with random heads and the `small` tree, served as ``medusa`` (Medusa decoding)
and ``base`` (plain decoding of the same weights), both decoupled so they stream.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from click.testing import CliRunner
from conftest import triton_inputs as _inputs

from medusa_forge.cli import cli
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.errors import ForgeError
from medusa_forge.serve.client import TritonLLMClient

NEW_TOKENS = 6
SMALL_TREE_DRAFTS = 7  # `small` has 7 nodes besides the root


@pytest.fixture(scope="module")
def prompts(held_out_prompts) -> list[str]:
    """Two held-out prompts of different topics, cut to ~100 characters (a few dozen tokens)."""
    chosen, topics = [], set()
    for p in held_out_prompts:
        if p["topic"] not in topics:
            topics.add(p["topic"])
            chosen.append(p["prompt"][:100])
        if len(chosen) == 2:
            return chosen
    raise AssertionError("the prompt file has fewer than two topics")


@pytest.fixture(scope="module")
def engine(native_triton):
    """The same engine in this process: the reference the server must reproduce."""
    from medusa_forge.engine.load import load_engine

    return load_engine(native_triton.engine_dir)


def client(native_triton, model: str, timeout_s: float = 120.0) -> TritonLLMClient:
    return TritonLLMClient(native_triton.grpc_url, model, timeout_s)


def test_both_models_of_the_repository_are_ready(native_triton):
    index = grpcclient.InferenceServerClient(native_triton.grpc_url).get_model_repository_index(as_json=True)
    assert {m["name"]: m["state"] for m in index["models"]} == {"medusa": "READY", "base": "READY"}


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "streaming"])
def test_greedy_answers_over_grpc_equal_the_engine_in_process(native_triton, engine, prompts, stream):
    for prompt in prompts:
        expected = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW_TOKENS, use_medusa=False))
        for model in (native_triton.medusa_model, native_triton.base_model):
            with client(native_triton, model) as c:
                got = c.generate(prompt, NEW_TOKENS, stream=stream)
            assert got.output_tokens == expected.tokens, (model, prompt)
            assert got.text == expected.text


def test_medusa_model_reports_its_decoding_statistics(native_triton, prompts):
    with client(native_triton, native_triton.medusa_model) as c:
        r = c.generate(prompts[0], NEW_TOKENS, end_id=-1)
    assert len(r.output_tokens) == NEW_TOKENS
    assert sum(r.accepted_per_step) + 1 == NEW_TOKENS  # +1: the prefill's token
    assert r.total_draft_tokens == len(r.accepted_per_step) * SMALL_TREE_DRAFTS
    assert r.total_accepted_draft_tokens == sum(n - 1 for n in r.accepted_per_step)
    assert 0.0 <= r.acceptance_rate <= 1.0
    with client(native_triton, native_triton.base_model) as c:
        base = c.generate(prompts[0], NEW_TOKENS, end_id=-1)
    assert base.accepted_per_step == [1] * (NEW_TOKENS - 1) and base.total_draft_tokens == 0


def test_streaming_sends_each_step_as_it_is_decoded(native_triton, prompts):
    chunks: list[tuple[float, str]] = []
    with client(native_triton, native_triton.base_model) as c:
        whole = c.generate(prompts[1], NEW_TOKENS, end_id=-1)
        t0 = time.perf_counter()
        streamed = c.generate(
            prompts[1],
            NEW_TOKENS,
            stream=True,
            end_id=-1,
            on_text=lambda text: chunks.append((time.perf_counter() - t0, text)),
        )
    assert streamed.responses == NEW_TOKENS + 1  # one per step (plain decoding: one token each) + the final one
    assert "".join(text for _, text in chunks) == whole.text == streamed.text
    assert streamed.output_tokens == whole.output_tokens
    assert len(chunks) > 1 and chunks[0][0] < chunks[-1][0]
    assert streamed.ttft_s < streamed.total_s


def test_query_prints_what_generate_prints(native_triton, prompts):
    runner = CliRunner()
    gen = runner.invoke(
        cli,
        [
            "generate",
            "--model",
            str(native_triton.engine_dir),
            "--prompt",
            prompts[0],
            "--max-new-tokens",
            str(NEW_TOKENS),
            "--json",
        ],
    )
    assert gen.exit_code == 0, gen.output
    expected = json.loads(gen.output)
    query = runner.invoke(
        cli,
        [
            "query",
            "--url",
            native_triton.grpc_url,
            "--model",
            native_triton.medusa_model,
            "--prompt",
            prompts[0],
            "--max-tokens",
            str(NEW_TOKENS),
            "--json",
        ],
    )
    assert query.exit_code == 0, query.output
    got = json.loads(query.output)
    assert (got["text"], got["output_tokens"]) == (expected["text"], expected["tokens"])
    streamed = runner.invoke(
        cli,
        [
            "query",
            "--url",
            native_triton.grpc_url,
            "--model",
            native_triton.medusa_model,
            "--prompt",
            prompts[0],
            "--max-tokens",
            str(NEW_TOKENS),
            "--stream",
        ],
    )
    assert streamed.exit_code == 0, streamed.output
    assert streamed.output == expected["text"] + "\n"


PROMPT = np.array([[b"def add(a, b):"]], dtype=np.object_)
FOUR = np.array([[4]], dtype=np.int32)
BAD_REQUESTS = [
    ("missing text_input", dict(max_tokens=FOUR), "missing required input(s) ['text_input']"),
    ("missing max_tokens", dict(text_input=PROMPT), "missing required input(s) ['max_tokens']"),
    (
        "negative max_tokens",
        dict(text_input=PROMPT, max_tokens=np.array([[-3]], dtype=np.int32)),
        "input 'max_tokens' must be >= 1, got -3",
    ),
    (
        "max_tokens as FP32",
        dict(text_input=PROMPT, max_tokens=np.array([[4.0]], dtype=np.float32)),
        "inference input 'max_tokens' data-type is 'FP32', but model 'base' expects 'INT32'",
    ),
    (
        "empty prompt",
        dict(text_input=np.array([[b""]], dtype=np.object_), max_tokens=FOUR),
        "input 'text_input' is an empty prompt; give at least one token of input",
    ),
    (
        "top_p above 1",
        dict(text_input=PROMPT, max_tokens=FOUR, top_p=np.array([[1.5]], dtype=np.float32)),
        "input 'top_p' must be in [0, 1] (0: off), got 1.5",
    ),
    (
        "negative temperature",
        dict(text_input=PROMPT, max_tokens=FOUR, temperature=np.array([[-1.0]], dtype=np.float32)),
        "input 'temperature' must be a finite number >= 0, got -1.0",
    ),
    (
        "beam_width 4",
        dict(text_input=PROMPT, max_tokens=FOUR, beam_width=np.array([[4]], dtype=np.int32)),
        "input 'beam_width' must be 1 (the native engine decodes a single beam), got 4",
    ),
    (
        "prompt past the KV cache",
        dict(text_input=PROMPT, max_tokens=np.array([[5000]], dtype=np.int32)),
        "exceeds the KV cache of 2048 tokens",
    ),
]


@pytest.mark.parametrize("inputs,message", [(i, m) for _, i, m in BAD_REQUESTS], ids=[n for n, _, _ in BAD_REQUESTS])
def test_bad_request_gets_an_error_naming_the_problem(native_triton, inputs, message):
    with client(native_triton, native_triton.base_model, timeout_s=60) as c:
        with pytest.raises(ForgeError) as err:
            c.send(_inputs(**inputs))
    assert message in str(err.value)


def test_server_keeps_serving_after_bad_requests(native_triton):
    with client(native_triton, native_triton.base_model) as c:
        with pytest.raises(ForgeError):
            c.send(_inputs(max_tokens=FOUR))
        assert len(c.generate("def add(a, b):", 3, end_id=-1).output_tokens) == 3


def test_concurrent_clients_get_the_sequential_answers(native_triton, prompts):
    """8 clients x 2 requests on both models at once: no errors, every answer the sequential one."""
    work = [(m, p) for m in (native_triton.base_model, native_triton.medusa_model) for p in prompts]
    sequential = {}
    for m, p in work:
        with client(native_triton, m) as c:
            sequential[m, p] = c.generate(p, 4).output_tokens
    results, errors = [], []

    def worker(i: int) -> None:
        try:
            with client(native_triton, work[i % len(work)][0]) as c:
                for k in range(2):
                    m, p = work[(i + k) % len(work)]
                    c.model = m
                    results.append(((m, p), c.generate(p, 4, stream=bool(k % 2)).output_tokens))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 16
    assert all(tokens == sequential[key] for key, tokens in results)


def test_a_client_that_goes_away_mid_stream_frees_the_model(native_triton):
    """The abandoned request (1500 tokens, minutes on CPU) stops within a step, so the next one runs."""

    class Gone(Exception):
        pass

    def leave(_text: str) -> None:
        raise Gone()

    with client(native_triton, native_triton.base_model) as c:
        with pytest.raises(Gone):
            c.generate("def main():", 1500, stream=True, end_id=-1, on_text=leave)
        t0 = time.perf_counter()
        assert len(c.generate("def main():", 2, end_id=-1).output_tokens) == 2
    assert time.perf_counter() - t0 < 30.0


def test_requests_stop_at_the_models_timeout(native_triton):
    """In process (the Triton model runs the same code): a generation past request_timeout_s fails."""
    from medusa_forge.serve.native_service import NativeModelSettings, NativeService, RequestTimedOut
    from medusa_forge.serve.request import RowRequest

    service = NativeService(
        NativeModelSettings(
            engine_dir=str(native_triton.engine_dir), use_medusa="false", warmup_tokens="0", request_timeout_s="0.2"
        )
    )
    row = RowRequest("def main():", GenerationConfig(max_new_tokens=1000, use_medusa=False, ignore_eos=True), False)
    t0 = time.perf_counter()
    with pytest.raises(RequestTimedOut, match=r"request exceeded the model's timeout of 0.2 s after \d+ tokens"):
        service.run(row)
    assert time.perf_counter() - t0 < 10.0

"""tensorrtllm_backend v0.11.0's example clients' requests, against the native ensemble in a real tritonserver.

The requests below are built the way ``inflight_batcher_llm/client/end_to_end_grpc_client.py`` at
tag v0.11.0 (commit 6791733e64fe7edd9eda7e0d804d0d04d30fb057) builds them (our own code, same
tensors): ``text_input`` a [1, 1] object array of str, ``max_tokens`` [1, 1] INT32, ``stream``
[1, 1] BOOL, ``beam_width`` [1, 1] INT32 and ``temperature`` [1, 1] FP32 always (temperature 1.0
unless given); then, when given, ``bad_words`` / ``stop_words`` [1, n] object, the three penalties
[1, 1] FP32, ``return_context_logits`` / ``return_generation_logits`` [1, 1] BOOL,
``embedding_bias_words`` [1, n] object with ``embedding_bias_weights`` [1, n] FP32, ``end_id`` /
``pad_id`` [1, 1] INT32. It always talks over a gRPC stream (``start_stream``,
``async_stream_infer``, ``stop_stream``), streaming or not, appends the streamed ``text_output``
deltas (``output[0].decode()``) and reads ``context_logits`` / ``generation_logits`` from every
response when it asked for them.

Served by the session's ``native_triton`` (conftest.py): pycoder-26m, random heads, the `small`
tree, decoupled, as ``medusa`` and ``base``; and by ``unary_ensemble``'s server: the same engine as
``ensemble`` (not decoupled: errors keep their status code) and ``ensemble_batched`` (in-flight
batching, 4 slots). The expected answers come from the same engine in this
process, with the settings built by hand from the tokenizer as the backend's preprocessing builds them.
"""

from __future__ import annotations

import queue
import threading
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.logits_processing import LogitsSettings

PROMPT = "def fibonacci(n):\n    "
NEW_TOKENS = 12


def _tensor(name: str, array: np.ndarray) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, array.shape, np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t


def e2e_inputs(
    prompt: str,
    output_len: int,
    streaming: bool,
    beam_width: int = 1,
    temperature: float = 1.0,
    repetition_penalty=None,
    presence_penalty=None,
    frequency_penalty=None,
    stop_words=(),
    bad_words=(),
    bias_words=None,
    bias_weights=None,
    return_context_logits=False,
    return_generation_logits=False,
    end_id=None,
    pad_id=None,
) -> list:
    """The tensors end_to_end_grpc_client.py's run_inference sends, in its order."""
    text = np.array([[prompt]]).astype(object)
    inputs = [
        _tensor("text_input", text),
        _tensor("max_tokens", np.ones_like(text).astype(np.int32) * output_len),
        _tensor("stream", np.array([[streaming]], dtype=bool)),
        _tensor("beam_width", np.array([[beam_width]], dtype=np.int32)),
        _tensor("temperature", np.array([[temperature]], dtype=np.float32)),
    ]
    if bad_words:
        inputs.append(_tensor("bad_words", np.array([list(bad_words)], dtype=object)))
    if stop_words:
        inputs.append(_tensor("stop_words", np.array([list(stop_words)], dtype=object)))
    for name, value in (
        ("repetition_penalty", repetition_penalty),
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
    ):
        if value is not None:
            inputs.append(_tensor(name, np.array([[value]], dtype=np.float32)))
    for name, flag in (
        ("return_context_logits", return_context_logits),
        ("return_generation_logits", return_generation_logits),
    ):
        if flag:
            inputs.append(_tensor(name, np.array([[flag]], dtype=bool)))
    if bias_words is not None and bias_weights is not None:
        inputs.append(_tensor("embedding_bias_words", np.array([list(bias_words)], dtype=object)))
        inputs.append(_tensor("embedding_bias_weights", np.array([list(bias_weights)], dtype=np.float32)))
    for name, value in (("end_id", end_id), ("pad_id", pad_id)):
        if value is not None:
            inputs.append(_tensor(name, np.array([[value]], dtype=np.int32)))
    return inputs


def e2e_run(url: str, model: str, inputs: list, streaming: bool) -> tuple[str, list, list]:
    """Send as the client does (one gRPC stream, closed right after the request) and fold the
    answers as it does: (text, results, errors)."""
    answers: queue.Queue = queue.Queue()
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=partial(lambda q, result, error: q.put(error or result), answers))
        client.async_stream_infer(model, inputs, request_id="")
        client.stop_stream()
    text, results, errors = "", [], []
    while not answers.empty():
        result = answers.get()
        if isinstance(result, InferenceServerException):
            errors.append(result)
            continue
        results.append(result)
        output = result.as_numpy("text_output")
        text = text + output[0].decode("utf-8") if streaming else output[0].decode("utf-8")
    return text, results, errors


@pytest.fixture(scope="module")
def unary_ensemble(native_triton, tmp_path_factory):
    """The same engine as a non-decoupled model named ``ensemble`` (the clients' default name) in a
    server of its own: unary gRPC answers carry the error's status code, which a stream's do not."""
    from medusa_forge.serve.native_repo import NativeRepoConfig, write_native_model
    from medusa_forge.serve.native_service import NativeModelSettings
    from medusa_forge.serve.triton_repo import RepoRequest, write_triton_repo
    from medusa_forge.serve.tritonserver import TritonServer

    root = tmp_path_factory.mktemp("unary_ensemble")
    write_triton_repo(RepoRequest(engine=native_triton.engine_dir, out=root / "repo", name="ensemble"))
    # The LLM step's contract, unary (inflight_batcher_llm_client.py's default) and decoupled (--streaming).
    llm = NativeModelSettings(engine_dir=str(native_triton.engine_dir), contract="tensorrt_llm")
    write_native_model(NativeRepoConfig(llm, "tensorrt_llm"), root / "repo")
    write_native_model(NativeRepoConfig(llm, "tensorrt_llm_decoupled", decoupled=True), root / "repo")
    # The ensemble on in-flight batching: requests with and without options share its steps.
    batched = NativeModelSettings(engine_dir=str(native_triton.engine_dir))
    write_native_model(NativeRepoConfig(batched, "ensemble_batched", max_batch_size=4, decoupled=True), root / "repo")
    with TritonServer(root / "repo", exit_timeout_s=5, log_path=root / "tritonserver.log") as server:
        yield server.grpc_url


@pytest.fixture(scope="module")
def engine(native_triton):
    from medusa_forge.engine.load import load_engine

    return load_engine(native_triton.engine_dir)


def word_ids(engine, words) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(engine.tokenizer.hf.encode(w, add_special_tokens=False)) for w in words)


EVERY_OPTION = dict(
    temperature=0.0,
    repetition_penalty=1.3,
    presence_penalty=0.4,
    frequency_penalty=0.2,
    stop_words=["\n\n\n"],
    bad_words=["return", " n"],
    bias_words=["(", " if"],
    bias_weights=[-4.0, 1.5],
    return_context_logits=True,
    return_generation_logits=True,
    end_id=2,
    pad_id=2,
)


def expected(engine, options: dict, use_medusa: bool):
    """The in-process answer to the same options, settings made as the backend's preprocessing makes them."""
    bias = tuple(
        (t, w) for word, w in zip(options["bias_words"], options["bias_weights"]) for t in engine.tokenizer.encode(word)
    )
    settings = LogitsSettings(
        options["repetition_penalty"],
        options["presence_penalty"],
        options["frequency_penalty"],
        0,
        bias,
        word_ids(engine, options["bad_words"]),
        (options["end_id"],),
    )
    return engine.generate(
        PROMPT,
        GenerationConfig(
            max_new_tokens=NEW_TOKENS,
            use_medusa=use_medusa,
            logits_settings=settings,
            eos_token_ids=(options["end_id"],),
            stop_words=word_ids(engine, options["stop_words"]),
            return_context_logits=True,
            return_generation_logits=True,
        ),
    )


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_the_end_to_end_client_with_its_defaults_gets_greedy_text_as_from_tensorrt_llm(
    native_triton, engine, streaming
):
    """Temperature 1.0 with no top_k / top_p: greedy, as TensorRT-LLM 0.11 reads top_k = top_p = 0."""
    want = engine.generate(PROMPT, GenerationConfig(max_new_tokens=NEW_TOKENS)).text
    for model in (native_triton.medusa_model, native_triton.base_model):
        text, results, errors = e2e_run(
            native_triton.grpc_url, model, e2e_inputs(PROMPT, NEW_TOKENS, streaming), streaming
        )
        assert not errors and results and text == want


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_the_end_to_end_client_with_every_single_beam_option_gets_the_engines_answer(native_triton, engine, streaming):
    for model, medusa in ((native_triton.medusa_model, True), (native_triton.base_model, False)):
        want = expected(engine, EVERY_OPTION, medusa)
        assert (
            want.tokens != engine.generate(PROMPT, GenerationConfig(max_new_tokens=NEW_TOKENS)).tokens
        )  # options bite
        text, results, errors = e2e_run(
            native_triton.grpc_url, model, e2e_inputs(PROMPT, NEW_TOKENS, streaming, **EVERY_OPTION), streaming
        )
        assert not errors and text == want.text, model
        for r in results:  # the client reads both from every response
            assert r.as_numpy("context_logits") is not None and r.as_numpy("generation_logits") is not None
        final = results[-1]
        np.testing.assert_allclose(final.as_numpy("context_logits"), want.context_logits[None], atol=1e-4)
        np.testing.assert_allclose(final.as_numpy("generation_logits"), want.generation_logits[None, None], atol=1e-4)
        assert final.as_numpy("generation_logits").shape == (1, 1, len(want.tokens), engine.cfg.vocab_size)


def test_log_probs_and_min_length_over_the_ensemble(native_triton, engine):
    """return_log_probs and min_length are ensemble inputs the example client does not send."""
    eos = 2
    extra = {"return_log_probs": np.array([[True]], dtype=bool), "min_length": np.array([[3]], dtype=np.int32)}
    # "</s>" is encoded with special tokens, as the preprocessing does: <s> gets the weight too; ban it.
    inputs = e2e_inputs(
        PROMPT,
        NEW_TOKENS,
        False,
        temperature=0.0,
        bias_words=["</s>"],
        bias_weights=[40.0],
        bad_words=["<s>"],
        end_id=eos,
    ) + [_tensor(k, v) for k, v in extra.items()]
    for model, medusa in ((native_triton.medusa_model, True), (native_triton.base_model, False)):
        _, results, errors = e2e_run(native_triton.grpc_url, model, inputs, False)
        assert not errors
        tokens = results[-1].as_numpy("output_tokens")[0].tolist()
        assert len(tokens) == 4 and tokens[-1] == eos and eos not in tokens[:-1]  # held back for 3 tokens
        bias = tuple((t, 40.0) for t in engine.tokenizer.encode("</s>"))
        want = engine.generate(
            PROMPT,
            GenerationConfig(
                max_new_tokens=NEW_TOKENS,
                use_medusa=medusa,
                eos_token_ids=(eos,),
                return_log_probs=True,
                logits_settings=LogitsSettings(
                    min_length=3, embedding_bias=bias, bad_words=word_ids(engine, ["<s>"]), end_ids=(eos,)
                ),
            ),
        )
        out_lp, cum = results[-1].as_numpy("output_log_probs"), results[-1].as_numpy("cum_log_probs")
        assert out_lp.shape == (1, 1, 4) and cum.shape == (1, 1)
        np.testing.assert_allclose(out_lp[0, 0], want.log_probs, atol=1e-4)
        assert cum[0, 0] == pytest.approx(sum(want.log_probs), abs=1e-4)


def _with(name: str, array: np.ndarray) -> list:
    return [t for t in e2e_inputs(PROMPT, 4, False, temperature=0.0) if t.name() != name] + [_tensor(name, array)]


BAD = [
    (
        "beam_width 4",
        e2e_inputs(PROMPT, 4, False, beam_width=4),
        "input 'beam_width' must be 1 (the native engine decodes a single beam), got 4",
    ),
    (
        "bias words and weights of different lengths",
        e2e_inputs(PROMPT, 4, False, bias_words=["a", "b"], bias_weights=[1.0]),
        "inputs 'embedding_bias_words' (2 words) and 'embedding_bias_weights' (1 weights) must have the same length",
    ),
    (
        "beam_width as FP32",
        _with("beam_width", np.array([[1.0]], dtype=np.float32)),
        "inference input 'beam_width' data-type is 'FP32', but model",
    ),
    (
        "temperature as FP64",
        _with("temperature", np.array([[0.0]], dtype=np.float64)),
        "inference input 'temperature' data-type is 'FP64', but model",
    ),
    (
        "two penalties in one row",
        _with("repetition_penalty", np.array([[1.1, 1.2]], dtype=np.float32)),
        "unexpected shape for input 'repetition_penalty'",
    ),
    (
        "a prompt table",
        _with("prompt_embedding_table", np.zeros((1, 2, 8), dtype=np.float16)),
        "input 'prompt_embedding_table': prompt tuning (prompt_embedding_table / prompt_vocab_size) is not supported",
    ),
    (
        "a negative min_length",
        _with("min_length", np.array([[-1]], dtype=np.int32)),
        "input 'min_length' must be >= 0, got -1",
    ),
]


@pytest.mark.parametrize("inputs,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_values_get_invalid_arg_naming_the_input_and_the_next_request_is_served(unary_ensemble, inputs, message):
    with grpcclient.InferenceServerClient(unary_ensemble) as client:
        with pytest.raises(InferenceServerException) as err:
            client.infer("ensemble", inputs)
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT" and message in err.value.message(), err.value
        good = client.infer("ensemble", e2e_inputs(PROMPT, 4, False, temperature=0.0))
        assert good.as_numpy("text_output")[0].decode()


@pytest.mark.parametrize("inputs,message", [b[1:] for b in BAD[:2]], ids=[b[0] for b in BAD[:2]])
def test_over_the_clients_stream_the_error_names_the_input_and_the_next_request_is_served(
    native_triton, inputs, message
):
    _, results, errors = e2e_run(native_triton.grpc_url, native_triton.medusa_model, inputs, False)
    assert not results and len(errors) == 1 and message in errors[0].message()
    text, _, errors = e2e_run(
        native_triton.grpc_url, native_triton.medusa_model, e2e_inputs(PROMPT, 4, False, temperature=0.0), False
    )
    assert not errors and text


def test_the_end_to_end_client_calls_the_ensemble_by_its_default_name(unary_ensemble, engine):
    text, _, errors = e2e_run(unary_ensemble, "ensemble", e2e_inputs(PROMPT, NEW_TOKENS, False, temperature=0.0), False)
    assert not errors and text == engine.generate(PROMPT, GenerationConfig(max_new_tokens=NEW_TOKENS)).text


def test_requests_with_and_without_options_share_a_batch_and_get_their_serial_answers(unary_ensemble, engine):
    """Six clients at once on the batched ensemble: options are per request, in a shared batch."""
    want = {
        True: expected(engine, EVERY_OPTION, True).text,
        False: engine.generate(PROMPT, GenerationConfig(max_new_tokens=NEW_TOKENS)).text,
    }
    got: dict[int, tuple] = {}

    def client(i: int) -> None:
        options, streaming = (EVERY_OPTION if i % 2 == 0 else {"temperature": 0.0}), i % 3 == 0
        got[i] = e2e_run(
            unary_ensemble, "ensemble_batched", e2e_inputs(PROMPT, NEW_TOKENS, streaming, **options), streaming
        )

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(got) == list(range(6))
    for i, (text, _, errors) in got.items():
        assert not errors and text == want[i % 2 == 0], i

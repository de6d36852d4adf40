"""The tensorrt_llm model's requests, as tensorrtllm_backend v0.11.0's inflight_batcher_llm_client.py builds them.

``inflight_batcher_llm/client/inflight_batcher_llm_client.py`` at tag v0.11.0 (commit 6791733e)
always sends ``input_ids`` [1, L] INT32, ``input_lengths`` [1, 1], ``request_output_len`` [1, 1],
``beam_width`` [1, 1], ``temperature`` [1, 1] FP32 (1.0), ``streaming`` [1, 1] BOOL, ``end_id`` /
``pad_id`` [1, 1] INT32, ``return_log_probs`` [1, 1] BOOL, ``runtime_top_k`` [1, 1] INT32 (1) and
``runtime_top_p`` [1, 1] FP32 (0.0); when asked, the three penalties [1, 1] FP32 and
``return_context_logits`` / ``return_generation_logits`` [1, 1] BOOL. Word lists and the dense bias
are what the ensemble's preprocessing step hands this model (``_to_word_list_format``,
``_get_embedding_bias``), rebuilt here by our own code.
"""

from __future__ import annotations

import numpy as np
import pytest

from medusa_forge.contract import LLM_INPUTS, LLM_OUTPUTS
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.logits_processing import LogitsSettings
from medusa_forge.errors import ForgeError
from medusa_forge.serve.llm_request import parse_llm_request, word_list
from medusa_forge.serve.replies import Reply, llm_reply_tensors
from medusa_forge.serve.trtllm_repo import TEMPLATE_DIR

IDS = [1, 329, 439, 10, 290, 11]


def client_inputs(
    ids=IDS,
    output_len=16,
    streaming=False,
    temperature=1.0,
    top_k=1,
    top_p=0.0,
    end_id=2,
    pad_id=2,
    return_log_probs=False,
    **optional,
) -> dict[str, np.ndarray]:
    """What inflight_batcher_llm_client.py's prepare_inputs sends (numpy, before gRPC)."""
    inputs = {
        "input_ids": np.array([ids], dtype=np.int32),
        "input_lengths": np.array([[len(ids)]], dtype=np.int32),
        "request_output_len": np.array([[output_len]], dtype=np.int32),
        "beam_width": np.array([[1]], dtype=np.int32),
        "temperature": np.array([[temperature]], dtype=np.float32),
        "streaming": np.array([[streaming]], dtype=bool),
        "end_id": np.array([[end_id]], dtype=np.int32),
        "pad_id": np.array([[pad_id]], dtype=np.int32),
        "return_log_probs": np.array([[return_log_probs]], dtype=bool),
        "runtime_top_k": np.array([[top_k]], dtype=np.int32),
        "runtime_top_p": np.array([[top_p]], dtype=np.float32),
    }
    for name, value in optional.items():
        dtype = bool if name.startswith("return_") else np.float32
        inputs[name] = np.array([[value]], dtype=dtype)
    return inputs


def word_list_format(words: list[list[int]]) -> np.ndarray:
    """[1, 2, L]: ids back to back, then cumulative end offsets padded with -1 (the preprocessing's format)."""
    flat = [t for w in words for t in w]
    ends = list(np.cumsum([len(w) for w in words]))
    width = max(1, len(flat))
    return np.array([[flat + [0] * (width - len(flat)), ends + [-1] * (width - len(ends))]], dtype=np.int32)


def test_the_llm_contract_is_the_pinned_tensorrt_llm_models():
    import re

    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    text = re.sub(
        r"\$\{(\w+)\}",
        lambda m: {
            "triton_max_batch_size": "1",
            "decoupled_mode": "true",
            "max_queue_delay_microseconds": "0",
            "logits_datatype": "TYPE_FP32",
        }.get(m.group(1), "x"),
        (TEMPLATE_DIR / "tensorrt_llm" / "config.pbtxt").read_text(),
    )
    cfg = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims), t.optional) for t in cfg.input] == [
        (t.name, t.data_type, t.dims, t.optional) for t in LLM_INPUTS
    ]
    assert [(t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims)) for t in cfg.output] == [
        (t.name, t.data_type, t.dims) for t in LLM_OUTPUTS[:6]
    ]


def test_the_clients_defaults_are_greedy_decoding_of_the_ids():
    [row] = parse_llm_request(client_inputs(), use_medusa=True, max_batch_size=1, decoupled=True)
    assert row.prompt_ids == tuple(IDS) and not row.stream and row.pad_id == 2
    assert row.gcfg == GenerationConfig(max_new_tokens=16, temperature=0.0, eos_token_ids=(2,))


def test_every_single_beam_option_of_the_client_and_the_preprocessings_lists_parse():
    inputs = client_inputs(
        streaming=True,
        return_log_probs=True,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        return_context_logits=True,
        return_generation_logits=True,
    )
    inputs["bad_words_list"] = word_list_format([[290], [10, 11]])
    inputs["stop_words_list"] = word_list_format([[436, 201]])
    bias = np.zeros((1, 8192), np.float32)
    bias[0, [1, 10]] = [-1.5, 2.0]
    inputs["embedding_bias"] = bias
    inputs["min_length"] = np.array([[3]], dtype=np.int32)
    [row] = parse_llm_request(inputs, use_medusa=True, max_batch_size=1, decoupled=True)
    assert (
        row.stream
        and row.gcfg.return_log_probs
        and row.gcfg.return_context_logits
        and row.gcfg.return_generation_logits
    )
    assert row.gcfg.stop_words == ((436, 201),)
    f32 = float(np.float32(1.2))  # sent as FP32
    assert row.gcfg.logits_settings == LogitsSettings(
        f32, 0.5, 0.25, 3, ((1, -1.5), (10, 2.0)), ((290,), (10, 11)), (2,)
    )


def test_an_empty_word_list_and_bias_mean_none():
    inputs = {
        **client_inputs(),
        "bad_words_list": np.zeros((1, 2, 0), np.int32),
        "embedding_bias": np.zeros((1, 0), np.float32),
    }
    [row] = parse_llm_request(inputs, True, 1, True)
    assert row.gcfg.logits_settings is None and word_list("bad_words_list", inputs, 1, 0) == ()


BAD = [
    ("beam width 4", {"beam_width": np.array([[4]], np.int32)}, "input 'beam_width' must be 1"),
    ("a stop request", {"stop": np.array([[True]], bool)}, "input 'stop': stop requests are not supported"),
    ("draft tokens", {"draft_input_ids": np.array([[5, 6]], np.int32)}, "input 'draft_input_ids': draft-model"),
    ("LoRA", {"lora_task_id": np.array([[3]], np.uint64)}, "input 'lora_task_id': LoRA is not supported"),
    ("length past the ids", {"input_lengths": np.array([[9]], np.int32)}, "input 'input_lengths' must be in 1..6"),
    (
        "offsets past the ids",
        {"bad_words_list": np.array([[[5, 6], [3, -1]]], np.int32)},
        "input 'bad_words_list' has offsets [3] that do not increase within its 2 ids",
    ),
    (
        "an offset that is not a number",
        {"stop_words_list": np.array([[[5], [None]]], object)},
        "input 'stop_words_list' must be an integer, got NoneType None",
    ),
    ("top-p decay", {"runtime_top_p_decay": np.array([[0.5]], np.float32)}, "input 'runtime_top_p_decay' must be 1"),
    ("streaming on a plain model", {"streaming": np.array([[True]], bool)}, "streaming=true needs a decoupled model"),
]


@pytest.mark.parametrize("change,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_values_get_one_line_naming_the_input(change, message):
    with pytest.raises(ForgeError) as err:
        parse_llm_request({**client_inputs(), **change}, True, 1, decoupled=False)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_replies_carry_the_new_ids_and_their_length():
    out = llm_reply_tensors(Reply("", [7, 8, 9], [2], [7], [-0.5, -0.5, -1.0]), [7, 8, 9], final=True)
    assert out["output_ids"].tolist() == [[[7, 8, 9]]] and out["sequence_length"].tolist() == [[3]]
    assert out["cum_log_probs"].tolist() == [[-2.0]] and "text_output" not in out
    assert llm_reply_tensors(None, [], final=False)["sequence_length"].tolist() == [[0]]


NAMES = [t.name for t in LLM_INPUTS] + ["text_input", ""]


def test_any_input_either_parses_or_raises_a_one_line_forge_error():
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp

    arrays = st.one_of(
        hnp.arrays(
            st.sampled_from([np.int32, np.int64, np.uint64, np.float32, np.bool_]),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
        ),
        hnp.arrays(
            np.object_,
            hnp.array_shapes(min_dims=1, max_dims=3, max_side=2),
            elements=st.one_of(st.binary(max_size=4), st.none(), st.integers(-5, 5)),
        ),
        st.sampled_from([None, 3, [[1]]]),
    )

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.dictionaries(st.sampled_from(NAMES), arrays, max_size=6), st.integers(0, 3), st.booleans())
    def check(overrides, max_batch, decoupled):
        try:
            rows = parse_llm_request({**client_inputs(), **overrides}, True, max_batch, decoupled)
        except ForgeError as e:
            assert str(e) and "\n" not in str(e)
            return
        for r in rows:
            assert r.prompt_ids and r.gcfg.max_new_tokens >= 1 and r.gcfg.temperature >= 0

    check()

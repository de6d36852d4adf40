"""contract.py is tensorrtllm_backend v0.11.0's ensemble contract, read from the pinned template.

The template is upstream's ``all_models/inflight_batcher_llm/ensemble/config.pbtxt`` at tag v0.11.0
(commit 6791733e64fe7edd9eda7e0d804d0d04d30fb057), the file ``triton-repo`` fills for TensorRT-LLM
(serve/trtllm_repo.py checks its git blob id), so both engines' repositories declare the same
tensors and contract.py stays the one description of them.
"""

from __future__ import annotations

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from medusa_forge.contract import ENSEMBLE_OUTPUTS, INPUTS, NATIVE_USE, OUTPUTS
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.serve.native_repo import NativeRepoConfig, native_config_pbtxt
from medusa_forge.serve.native_service import NativeModelSettings
from medusa_forge.serve.replies import Reply, reply_tensors, stack_rows
from medusa_forge.serve.trtllm_repo import TEMPLATE_DIR


def tensors(config: model_config_pb2.ModelConfig, which: str) -> list[tuple]:
    return [
        (t.name, model_config_pb2.DataType.Name(t.data_type), tuple(t.dims), getattr(t, "optional", False))
        for t in getattr(config, which)
    ]


def parse(path) -> model_config_pb2.ModelConfig:
    text = path.read_text().replace("${triton_max_batch_size}", "1").replace("${logits_datatype}", "TYPE_FP32")
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_the_inputs_are_the_pinned_ensembles_in_its_order_with_its_types_dims_and_optionality():
    upstream = parse(TEMPLATE_DIR / "ensemble" / "config.pbtxt")
    assert tensors(upstream, "input") == [(t.name, t.data_type, t.dims, t.optional) for t in INPUTS]


def test_the_outputs_are_the_pinned_ensembles_then_the_statistics():
    upstream = parse(TEMPLATE_DIR / "ensemble" / "config.pbtxt")
    ours = [(t.name, t.data_type, t.dims, False) for t in OUTPUTS]
    assert tensors(upstream, "output") == ours[: len(ENSEMBLE_OUTPUTS)]
    assert [t.name for t in OUTPUTS[: len(ENSEMBLE_OUTPUTS)]] == list(ENSEMBLE_OUTPUTS)


def test_every_input_says_what_the_native_engine_does_with_it():
    assert list(NATIVE_USE) == [t.name for t in INPUTS] and all(NATIVE_USE.values())


def test_the_native_repository_declares_the_whole_contract():
    cfg = text_format.Parse(
        native_config_pbtxt(NativeRepoConfig(NativeModelSettings(engine_dir="/e"))), model_config_pb2.ModelConfig()
    )
    assert tensors(cfg, "input") == [(t.name, t.data_type, t.dims, t.optional) for t in INPUTS]
    assert [t[:3] for t in tensors(cfg, "output")] == [(t.name, t.data_type, t.dims) for t in OUTPUTS]


def test_log_probs_and_logits_come_back_only_when_asked_with_the_ensembles_shapes():
    plain = Reply("ab", [5, 6], [1], [0])
    assert set(reply_tensors(plain, "ab", [5, 6], final=True)) & set(ENSEMBLE_OUTPUTS[1:]) == set()
    asked = Reply("ab", [5, 6], [1], [0], [-0.5, -0.25], np.zeros((3, 8), np.float32), np.ones((2, 8), np.float32))
    out = reply_tensors(asked, "ab", [5, 6], final=True)
    assert {k: (v.shape, v.dtype) for k, v in out.items() if k in ENSEMBLE_OUTPUTS} == {
        "text_output": ((1,), np.object_),
        "cum_log_probs": ((1, 1), np.float32),
        "output_log_probs": ((1, 1, 2), np.float32),
        "context_logits": ((1, 3, 8), np.float32),
        "generation_logits": ((1, 1, 2, 8), np.float32),
    }
    assert out["cum_log_probs"][0, 0] == -0.75
    assert set(reply_tensors(asked, "a", [5], final=False)) == {"text_output", "output_tokens"}
    chunk = reply_tensors(None, "a", [5], final=False, gcfg=GenerationConfig(return_context_logits=True))
    assert {k: v.shape for k, v in chunk.items()} == {
        "text_output": (1,),
        "output_tokens": (1, 1),
        "context_logits": (1, 1, 1),
    }


def test_ragged_rows_are_padded_in_every_dimension_with_the_pad_id_or_zero():
    rows = [
        reply_tensors(Reply("a", [1], [], [], [-1.0], np.ones((2, 3), np.float32)), "a", [1], True),
        reply_tensors(Reply("bc", [2, 3], [1], [0], [-1.0, -2.0], np.ones((4, 3), np.float32)), "bc", [2, 3], True),
    ]
    out = stack_rows(rows, pad_id=7)
    assert out["output_tokens"].tolist() == [[1, 7], [2, 3]]
    assert out["output_log_probs"].tolist() == [[[-1.0, 0.0]], [[-1.0, -2.0]]]
    assert out["context_logits"].shape == (2, 4, 3) and out["context_logits"][0, 2:].sum() == 0

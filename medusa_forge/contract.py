"""The Triton tensor contract, defined once for the server models and every client.

It is tensorrtllm_backend's ensemble contract (all_models/inflight_batcher_llm/ensemble/config.pbtxt),
so a client cannot tell whether the native engine or TensorRT-LLM serves it, plus three outputs
of ours that only the native model fills (the TensorRT-LLM ensemble simply does not list them).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton config name: TYPE_STRING, TYPE_INT32, ...
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def client_dtype(self) -> str:
        """The datatype string tritonclient uses (``BYTES``, ``INT32``, ...)."""
        return {"TYPE_STRING": "BYTES", "TYPE_BOOL": "BOOL"}.get(self.data_type, self.data_type.removeprefix("TYPE_"))


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_input", "TYPE_STRING", (1,)),
    TensorSpec("max_tokens", "TYPE_INT32", (1,)),
    TensorSpec("bad_words", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("stop_words", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("end_id", "TYPE_INT32", (1,), optional=True),
    TensorSpec("pad_id", "TYPE_INT32", (1,), optional=True),
    TensorSpec("top_k", "TYPE_INT32", (1,), optional=True),
    TensorSpec("top_p", "TYPE_FP32", (1,), optional=True),
    TensorSpec("temperature", "TYPE_FP32", (1,), optional=True),
    TensorSpec("random_seed", "TYPE_UINT64", (1,), optional=True),
    TensorSpec("stream", "TYPE_BOOL", (1,), optional=True),
)

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "TYPE_STRING", (-1,)),
    # Speculative-decoding statistics, as tensorrtllm_backend names them.
    TensorSpec("acceptance_rate", "TYPE_FP32", (1,)),
    TensorSpec("total_accepted_draft_tokens", "TYPE_INT32", (1,)),
    TensorSpec("total_draft_tokens", "TYPE_INT32", (1,)),
    # Ours (native engine only): the generated token ids and tokens produced per decoding step.
    TensorSpec("output_tokens", "TYPE_INT32", (-1,)),
    TensorSpec("accepted_per_step", "TYPE_INT32", (-1,)),
)

INPUT_BY_NAME = {t.name: t for t in INPUTS}
OUTPUT_BY_NAME = {t.name: t for t in OUTPUTS}

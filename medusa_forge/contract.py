"""The Triton tensor contract, defined once for the server models and every client.

It is tensorrtllm_backend's ensemble contract as pinned for TensorRT-LLM 0.11 (tag v0.11.0, commit
6791733e64fe7edd9eda7e0d804d0d04d30fb057, ``all_models/inflight_batcher_llm/ensemble/config.pbtxt``),
so a client cannot tell whether the native engine or TensorRT-LLM serves it:

- the ensemble has ``max_batch_size > 0``, so every tensor carries a leading batch dimension: a client
  sends ``text_input`` as shape ``[1, 1]`` and gets ``text_output`` back as ``[1, 1]``;
- ``text_input`` and ``max_tokens`` have dims ``[-1]`` there (one value per row is what is read);
- we list the subset of the ensemble's optional inputs that the native engine honours; the rest
  (``length_penalty``, ``beam_width``, LoRA / prompt tables, ...) exist only on the TensorRT-LLM side.

Outputs: ``text_output`` is the template's. The speculative-decoding statistics use the names that
tensorrtllm_backend gave them when it added them (commit 071ee5e, Feb 2025; the v0.11.0 ensemble does
not emit them), and ``output_tokens`` / ``accepted_per_step`` are ours. Clients therefore request no
explicit output list and read whichever of these the served model returns.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_NAME = "ensemble"  # the model clients call, whichever engine serves it


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton config name: TYPE_STRING, TYPE_INT32, ...
    dims: tuple[int, ...]  # per request row (the batch dimension is not listed, as in config.pbtxt)
    optional: bool = False

    @property
    def client_dtype(self) -> str:
        """The datatype string tritonclient uses (``BYTES``, ``INT32``, ...)."""
        return {"TYPE_STRING": "BYTES", "TYPE_BOOL": "BOOL"}.get(self.data_type, self.data_type.removeprefix("TYPE_"))


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_input", "TYPE_STRING", (-1,)),
    TensorSpec("max_tokens", "TYPE_INT32", (-1,)),
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

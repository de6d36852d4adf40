"""The Triton tensor contract, defined once for the server models and every client.

It is tensorrtllm_backend's ensemble contract as pinned for TensorRT-LLM 0.11 (tag v0.11.0, commit
6791733e64fe7edd9eda7e0d804d0d04d30fb057, ``all_models/inflight_batcher_llm/ensemble/config.pbtxt``):
every input and output it declares, with its data type, dims and optionality, so a client cannot tell
whether the native engine or TensorRT-LLM serves it.

- The ensemble has ``max_batch_size > 0``, so every tensor carries a leading batch dimension: a
  client sends ``text_input`` as shape ``[1, 1]`` and gets ``text_output`` back as ``[1, 1]``.
- How the native engine honours each input is in :data:`NATIVE_USE` (and serve/request.py):
  single-beam only, ``length_penalty`` accepted and unused (beam search only), prompt tables and
  encoder-decoder input refused.
- ``cum_log_probs`` [1, 1], ``output_log_probs`` [1, 1, n], ``context_logits`` [1, T, V] and
  ``generation_logits`` [1, 1, n, V] (beam dimension 1) come back only when asked for with
  ``return_log_probs`` / ``return_context_logits`` / ``return_generation_logits``.

Beyond the ensemble: the speculative-decoding statistics use the names tensorrtllm_backend gave them
when it added them (commit 071ee5e, Feb 2025; the v0.11.0 ensemble does not emit them), and
``output_tokens`` / ``accepted_per_step`` are ours. Clients therefore request no explicit output list
and read whichever of these the served model returns.
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


# In the order of the pinned ensemble's config.pbtxt.
INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_input", "TYPE_STRING", (-1,)),
    TensorSpec("decoder_text_input", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("max_tokens", "TYPE_INT32", (-1,)),
    TensorSpec("bad_words", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("stop_words", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("end_id", "TYPE_INT32", (1,), optional=True),
    TensorSpec("pad_id", "TYPE_INT32", (1,), optional=True),
    TensorSpec("top_k", "TYPE_INT32", (1,), optional=True),
    TensorSpec("top_p", "TYPE_FP32", (1,), optional=True),
    TensorSpec("temperature", "TYPE_FP32", (1,), optional=True),
    TensorSpec("length_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSpec("repetition_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSpec("min_length", "TYPE_INT32", (1,), optional=True),
    TensorSpec("presence_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSpec("frequency_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSpec("random_seed", "TYPE_UINT64", (1,), optional=True),
    TensorSpec("return_log_probs", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("return_context_logits", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("return_generation_logits", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("beam_width", "TYPE_INT32", (1,), optional=True),
    TensorSpec("stream", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("prompt_embedding_table", "TYPE_FP16", (-1, -1), optional=True),
    TensorSpec("prompt_vocab_size", "TYPE_INT32", (1,), optional=True),
    TensorSpec("embedding_bias_words", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("embedding_bias_weights", "TYPE_FP32", (-1,), optional=True),
)

# What the native engine does with each input (serve/request.py implements it).
NATIVE_USE: dict[str, str] = {
    "text_input": "the prompt, tokenized as the backend's preprocessing does (special tokens added)",
    "decoder_text_input": "refused when not empty: encoder-decoder models only",
    "max_tokens": "tokens to generate",
    "bad_words": "each word's ids (no special tokens) banned as TensorRT-LLM's banBadWords does",
    "stop_words": "generation ends once the sequence ends with a word's ids (kept in the output)",
    "end_id": "the end token (a negative id: none, generate max_tokens)",
    "pad_id": "accepted; pads the ragged output_tokens of a batch (default -1)",
    "top_k": "sampling; 1, or 0 with top_p 0 (both unset), is greedy as in TensorRT-LLM",
    "top_p": "sampling; 0 is off (greedy with top_k 0), as in TensorRT-LLM",
    "temperature": "> 0 with top_k > 1 or top_p > 0: sampling, or typical acceptance with Medusa; else greedy",
    "length_penalty": "accepted and unused: it scores beams, and the engine decodes one beam",
    "repetition_penalty": "TensorRT-LLM 0.11's penalty over prompt and output tokens",
    "min_length": "the end id is held back until this many tokens were generated",
    "presence_penalty": "TensorRT-LLM 0.11's penalty over prompt and output tokens",
    "frequency_penalty": "TensorRT-LLM 0.11's penalty over prompt and output tokens",
    "random_seed": "seeds sampling",
    "return_log_probs": "adds cum_log_probs and output_log_probs",
    "return_context_logits": "adds context_logits",
    "return_generation_logits": "adds generation_logits",
    "beam_width": "1 only (other values: INVALID_ARG)",
    "stream": "one response per decoding step (decoupled model)",
    "prompt_embedding_table": "refused: prompt tuning is not supported by the native engine",
    "prompt_vocab_size": "refused: prompt tuning is not supported by the native engine",
    "embedding_bias_words": "each word's ids (special tokens included, as the preprocessing does) get its weight",
    "embedding_bias_weights": "one weight per embedding_bias_words entry",
}

OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("text_output", "TYPE_STRING", (-1,)),
    TensorSpec("cum_log_probs", "TYPE_FP32", (-1,)),
    TensorSpec("output_log_probs", "TYPE_FP32", (-1, -1)),
    TensorSpec("context_logits", "TYPE_FP32", (-1, -1)),
    TensorSpec("generation_logits", "TYPE_FP32", (-1, -1, -1)),
    # Speculative-decoding statistics, as tensorrtllm_backend names them.
    TensorSpec("acceptance_rate", "TYPE_FP32", (1,)),
    TensorSpec("total_accepted_draft_tokens", "TYPE_INT32", (1,)),
    TensorSpec("total_draft_tokens", "TYPE_INT32", (1,)),
    # Ours (native engine only): the generated token ids and tokens produced per decoding step.
    TensorSpec("output_tokens", "TYPE_INT32", (-1,)),
    TensorSpec("accepted_per_step", "TYPE_INT32", (-1,)),
)
ENSEMBLE_OUTPUTS = ("text_output", "cum_log_probs", "output_log_probs", "context_logits", "generation_logits")

INPUT_BY_NAME = {t.name: t for t in INPUTS}
OUTPUT_BY_NAME = {t.name: t for t in OUTPUTS}

# The ensemble's LLM step, the model ``inflight_batcher_llm_client.py`` calls (token ids in and out):
# ``all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt`` at v0.11.0, in its order. A native
# model serves it with NativeModelSettings.contract = "tensorrt_llm" (serve/contracts.py, llm_request.py).
LLM_MODEL_NAME = "tensorrt_llm"
LLM_INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("input_ids", "TYPE_INT32", (-1,)),
    TensorSpec("input_lengths", "TYPE_INT32", (1,)),
    TensorSpec("request_output_len", "TYPE_INT32", (1,)),
    TensorSpec("draft_input_ids", "TYPE_INT32", (-1,), optional=True),
    TensorSpec("decoder_input_ids", "TYPE_INT32", (-1,), optional=True),
    TensorSpec("decoder_input_lengths", "TYPE_INT32", (1,), optional=True),
    TensorSpec("draft_logits", "TYPE_FP32", (-1, -1), optional=True),
    TensorSpec("draft_acceptance_threshold", "TYPE_FP32", (1,), optional=True),
    TensorSpec("end_id", "TYPE_INT32", (1,), optional=True),
    TensorSpec("pad_id", "TYPE_INT32", (1,), optional=True),
    TensorSpec("stop_words_list", "TYPE_INT32", (2, -1), optional=True),
    TensorSpec("bad_words_list", "TYPE_INT32", (2, -1), optional=True),
    TensorSpec("embedding_bias", "TYPE_FP32", (-1,), optional=True),
    TensorSpec("beam_width", "TYPE_INT32", (1,), optional=True),
    TensorSpec("temperature", "TYPE_FP32", (1,), optional=True),
    TensorSpec("runtime_top_k", "TYPE_INT32", (1,), optional=True),
    TensorSpec("runtime_top_p", "TYPE_FP32", (1,), optional=True),
    TensorSpec("runtime_top_p_min", "TYPE_FP32", (1,), optional=True),
    TensorSpec("runtime_top_p_decay", "TYPE_FP32", (1,), optional=True),
    TensorSpec("runtime_top_p_reset_ids", "TYPE_INT32", (1,), optional=True),
    TensorSpec("len_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSpec("early_stopping", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("repetition_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSpec("min_length", "TYPE_INT32", (1,), optional=True),
    TensorSpec("beam_search_diversity_rate", "TYPE_FP32", (1,), optional=True),
    TensorSpec("presence_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSpec("frequency_penalty", "TYPE_FP32", (1,), optional=True),
    TensorSpec("random_seed", "TYPE_UINT64", (1,), optional=True),
    TensorSpec("return_log_probs", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("return_context_logits", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("return_generation_logits", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("stop", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("streaming", "TYPE_BOOL", (1,), optional=True),
    TensorSpec("prompt_embedding_table", "TYPE_FP16", (-1, -1), optional=True),
    TensorSpec("prompt_vocab_size", "TYPE_INT32", (1,), optional=True),
    TensorSpec("lora_task_id", "TYPE_UINT64", (1,), optional=True),
    TensorSpec("lora_weights", "TYPE_FP16", (-1, -1), optional=True),
    TensorSpec("lora_config", "TYPE_INT32", (-1, 3), optional=True),
)
LLM_OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("output_ids", "TYPE_INT32", (-1, -1)),
    TensorSpec("sequence_length", "TYPE_INT32", (-1,)),
    TensorSpec("cum_log_probs", "TYPE_FP32", (-1,)),
    TensorSpec("output_log_probs", "TYPE_FP32", (-1, -1)),
    TensorSpec("context_logits", "TYPE_FP32", (-1, -1)),
    TensorSpec("generation_logits", "TYPE_FP32", (-1, -1, -1)),
) + OUTPUTS[5:]  # and the statistics, as on the ensemble
LLM_INPUT_BY_NAME = {t.name: t for t in LLM_INPUTS}

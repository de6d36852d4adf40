"""The ``tensorrt_llm`` model's tensors (token ids in, token ids out) -> validated row requests.

The contract of tensorrtllm_backend v0.11.0's ``all_models/inflight_batcher_llm/tensorrt_llm``
(:data:`~medusa_forge.contract.LLM_INPUTS`), the model ``inflight_batcher_llm/client/
inflight_batcher_llm_client.py`` calls. What the native engine does with each input:

- ``input_ids`` [B, L] with ``input_lengths`` [B, 1] (a row's prompt is its first input_lengths ids),
  ``request_output_len``, ``streaming``, ``end_id``, ``pad_id``, ``random_seed``, the ``return_*`` flags,
  ``temperature`` / ``runtime_top_k`` / ``runtime_top_p`` (top_k 1 = greedy, top_p 0 = off) and the
  penalties / ``min_length`` as on the ensemble (serve/request.py);
- ``stop_words_list`` / ``bad_words_list`` [B, 2, L]: the backend's word-list format (row 0 the
  words' ids back to back, row 1 the cumulative end offsets, padded with -1), as its preprocessing
  ``_to_word_list_format`` writes it; ``embedding_bias`` [B, V] (or [B, 0]): a dense bias;
- ``beam_width`` 1 only; ``len_penalty``, ``early_stopping``, ``beam_search_diversity_rate`` accepted
  and unused (beam search only); ``runtime_top_p_min`` accepted (it bounds the decay, which must be 1);
- refused with one line each: draft-model speculative decoding (``draft_input_ids``,
  ``draft_logits``, ``draft_acceptance_threshold``), encoder-decoder input, prompt tables, LoRA, a
  ``runtime_top_p_decay`` other than 1 or ``runtime_top_p_reset_ids``, and ``stop`` requests (stop a
  request by cancelling it: ``stop_stream(cancel_requests=True)`` or the future's ``cancel()``).
"""

from __future__ import annotations

import numpy as np

from medusa_forge.contract import LLM_INPUTS
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.logits_processing import LogitsSettings
from medusa_forge.errors import ForgeError
from medusa_forge.serve.request import (
    RowRequest,
    _bool,
    _float,
    _int,
    _optional,
    _rows,
    check_names,
    penalties,
    sampling,
)

REFUSED = {
    "draft_input_ids": "draft-model speculative decoding is not supported (the native engine drafts with Medusa heads)",
    "draft_logits": "draft-model speculative decoding is not supported (the native engine drafts with Medusa heads)",
    "draft_acceptance_threshold": "draft-model speculative decoding is not supported",
    "decoder_input_ids": "is for encoder-decoder models; the native engine is decoder-only",
    "decoder_input_lengths": "is for encoder-decoder models; the native engine is decoder-only",
    "prompt_embedding_table": "prompt tuning is not supported by the native engine",
    "prompt_vocab_size": "prompt tuning is not supported by the native engine",
    "lora_task_id": "LoRA is not supported by the native engine",
    "lora_weights": "LoRA is not supported by the native engine",
    "lora_config": "LoRA is not supported by the native engine",
    "runtime_top_p_reset_ids": "top-p decay is not supported by the native engine",
}


def parse_llm_request(
    inputs: dict[str, np.ndarray], use_medusa: bool, max_batch_size: int, decoupled: bool
) -> list[RowRequest]:
    """One :class:`RowRequest` (with ``prompt_ids``) per batch row of the tensorrt_llm model's inputs."""
    check_names(inputs, LLM_INPUTS)
    ids = inputs["input_ids"]
    batch = ids.shape[0] if ids.ndim > 0 else 0
    if batch < 1:
        raise ForgeError(f"input 'input_ids' has shape {list(ids.shape)}; send [batch, tokens]")
    if "stop" in inputs and any(_bool(v, "stop") for v in _rows("stop", inputs["stop"], batch).reshape(-1)):
        raise ForgeError(
            "input 'stop': stop requests are not supported; cancel the request instead "
            "(stop_stream(cancel_requests=True), or cancel() on the call's future)"
        )
    for name, why in REFUSED.items():
        if name in inputs and inputs[name].size:
            raise ForgeError(f"input '{name}': {why}")
    if max_batch_size and batch > max_batch_size:
        raise ForgeError(f"batch of {batch} prompts exceeds max_batch_size {max_batch_size}")
    rows = [_parse_row(inputs, batch, row, use_medusa, decoupled) for row in range(batch)]
    if batch > 1 and any(r.stream for r in rows):
        raise ForgeError(f"streaming takes one prompt per request; got a batch of {batch}")
    return rows


def _parse_row(inputs: dict[str, np.ndarray], batch: int, row: int, use_medusa: bool, decoupled: bool) -> RowRequest:
    prompt = _prompt_ids(inputs, batch, row)
    max_tokens = _optional(_int, "request_output_len", inputs, batch, row)
    if max_tokens is None or max_tokens < 1:
        raise ForgeError(f"input 'request_output_len' must be >= 1, got {max_tokens}")
    stream = _optional(_bool, "streaming", inputs, batch, row) or False
    if stream and not decoupled:
        raise ForgeError(
            "streaming=true needs a decoupled model; regenerate the repository with "
            "`medusa-forge triton-repo --decoupled`"
        )
    beam_width = _optional(_int, "beam_width", inputs, batch, row)
    if beam_width is not None and beam_width != 1:
        raise ForgeError(f"input 'beam_width' must be 1 (the native engine decodes a single beam), got {beam_width}")
    decay = _optional(_float, "runtime_top_p_decay", inputs, batch, row)
    if decay is not None and decay != 1.0:
        raise ForgeError(f"input 'runtime_top_p_decay' must be 1 (top-p decay is not supported), got {decay}")
    for name, convert in (
        ("len_penalty", _float),
        ("early_stopping", _bool),
        ("beam_search_diversity_rate", _float),
        ("runtime_top_p_min", _float),
    ):
        _optional(convert, name, inputs, batch, row)  # beam search / top-p decay only: checked, then unused
    end_id = _optional(_int, "end_id", inputs, batch, row)
    pad_id = _optional(_int, "pad_id", inputs, batch, row)
    settings = LogitsSettings(
        **penalties(inputs, batch, row),
        embedding_bias=_dense_bias(inputs, batch, row),
        bad_words=word_list("bad_words_list", inputs, batch, row),
        end_ids=(end_id,) if end_id is not None and end_id >= 0 else (),
    )
    gcfg = GenerationConfig(
        max_new_tokens=max_tokens,
        use_medusa=use_medusa,
        **sampling(inputs, batch, row, top_k_name="runtime_top_k", top_p_name="runtime_top_p"),
        eos_token_ids=(end_id,) if end_id is not None and end_id >= 0 else None,
        ignore_eos=end_id is not None and end_id < 0,
        logits_settings=settings if settings.active else None,
        stop_words=word_list("stop_words_list", inputs, batch, row),
        return_log_probs=_optional(_bool, "return_log_probs", inputs, batch, row) or False,
        return_context_logits=_optional(_bool, "return_context_logits", inputs, batch, row) or False,
        return_generation_logits=_optional(_bool, "return_generation_logits", inputs, batch, row) or False,
    )
    return RowRequest("", gcfg, stream, pad_id if pad_id is not None else -1, prompt)


def _prompt_ids(inputs: dict[str, np.ndarray], batch: int, row: int) -> tuple[int, ...]:
    ids = [_int(v, "input_ids") for v in _rows("input_ids", inputs["input_ids"], batch)[row]]
    length = _optional(_int, "input_lengths", inputs, batch, row)
    if length is None or not 1 <= length <= len(ids):
        raise ForgeError(f"input 'input_lengths' must be in 1..{len(ids)} (the row's input_ids), got {length}")
    prompt = tuple(ids[:length])
    if any(t < 0 for t in prompt):
        raise ForgeError(f"input 'input_ids' holds a negative token id: {min(prompt)}")
    return prompt


def word_list(name: str, inputs: dict[str, np.ndarray], batch: int, row: int) -> tuple[tuple[int, ...], ...]:
    """Id sequences from the backend's [2, L] word-list format (ids; cumulative end offsets, -1 padded)."""
    if name not in inputs or inputs[name].size == 0:
        return ()
    array = inputs[name]
    if array.ndim != 3 or array.shape[0] != batch or array.shape[1] != 2:
        raise ForgeError(
            f"input '{name}' has shape {list(array.shape)}; expected [{batch}, 2, L] "
            "(ids, then cumulative end offsets padded with -1)"
        )
    flat = [_int(v, name) for v in array[row, 0]]
    ends = [e for e in (_int(v, name) for v in array[row, 1]) if e >= 0]
    if any(b < a for a, b in zip([0, *ends], ends)) or (ends and ends[-1] > len(flat)):
        raise ForgeError(f"input '{name}' has offsets {ends} that do not increase within its {len(flat)} ids")
    return tuple(tuple(flat[a:b]) for a, b in zip([0, *ends], ends) if b > a)


def _dense_bias(inputs: dict[str, np.ndarray], batch: int, row: int) -> tuple[tuple[int, float], ...]:
    if "embedding_bias" not in inputs or inputs["embedding_bias"].size == 0:
        return ()
    bias = _rows("embedding_bias", inputs["embedding_bias"], batch)[row]
    values = [_float(v, "embedding_bias") for v in bias]
    if not all(np.isfinite(values)):
        raise ForgeError("input 'embedding_bias' must hold finite numbers")
    return tuple((t, w) for t, w in enumerate(values) if w != 0.0)

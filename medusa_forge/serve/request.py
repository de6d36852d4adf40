"""Contract tensors of one Triton request -> validated generation requests (one per batch row).

Kept free of ``triton_python_backend_utils`` so the same checks run in-process and in tests. Every
problem is a :class:`ForgeError` whose one line names the tensor and what is wrong; the Triton model
turns it into an error response, so a bad request never takes the server down.

Triton itself already rejects a missing required input, a wrong datatype and a shape outside the
config's dims (its messages name the tensor); what remains for us is what the config cannot express:
values, shapes inside a row, and the inputs the native engine refuses (beam_width other than 1,
prompt tables, encoder-decoder input). Words (bad, stop, embedding bias) are tokenized as
tensorrtllm_backend v0.11.0's preprocessing model.py does: ``_to_word_list_format`` encodes each
bad / stop word without special tokens and skips words with no ids; ``_get_embedding_bias`` encodes
each bias word with the tokenizer's default (special tokens added) and adds its weight to every id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medusa_forge.contract import INPUTS
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.logits_processing import LogitsSettings
from medusa_forge.errors import ForgeError

REFUSED = {
    "prompt_embedding_table": "prompt tuning (prompt_embedding_table / prompt_vocab_size) is not supported by the "
    "native engine; leave both inputs out",
    "prompt_vocab_size": "prompt tuning (prompt_embedding_table / prompt_vocab_size) is not supported by the "
    "native engine; leave both inputs out",
}


@dataclass(frozen=True)
class RowRequest:
    prompt: str
    gcfg: GenerationConfig
    stream: bool
    pad_id: int = -1  # pads this row's output_tokens in a batch of ragged rows
    prompt_ids: tuple[int, ...] | None = None  # token ids instead of text (the tensorrt_llm model's input_ids)


def check_names(inputs: dict[str, np.ndarray], specs) -> None:
    """Every input an array, known to the model's contract ``specs``, and every required one there."""
    not_arrays = sorted(name for name, value in inputs.items() if not isinstance(value, np.ndarray))
    if not_arrays:
        raise ForgeError(f"input(s) {', '.join(not_arrays)} must be arrays with a batch dimension")
    unknown = sorted(set(inputs) - {spec.name for spec in specs})
    if unknown:
        raise ForgeError(
            f"unknown input(s) {', '.join(unknown)}; this model takes {', '.join(spec.name for spec in specs)}"
        )
    for spec in specs:
        if not spec.optional and spec.name not in inputs:
            raise ForgeError(f"missing required input '{spec.name}'")


def _rows(name: str, array: np.ndarray, batch: int) -> np.ndarray:
    """[batch, ...] with at least one value per row."""
    if array.ndim == 0 or array.shape[0] != batch:
        raise ForgeError(
            f"input '{name}' has shape {list(array.shape)}; expected its first dimension to be the batch size {batch}"
        )
    flat = array.reshape(batch, -1)
    return flat


def _scalar(name: str, inputs: dict[str, np.ndarray], batch: int, row: int):
    if name not in inputs:
        return None
    values = _rows(name, inputs[name], batch)[row]
    if values.size != 1:
        raise ForgeError(f"input '{name}' must hold one value per request, got {values.size}")
    return values[0]


def _int(value, name: str) -> int:
    """An integer value (numpy or Python); bools, floats, strings and objects are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ForgeError(f"input '{name}' must be an integer, got {_describe(value)}")
    return int(value)


def _float(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ForgeError(f"input '{name}' must be a number, got {_describe(value)}")
    return float(value)


def _bool(value, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and int(value) in (0, 1):
        return bool(value)
    raise ForgeError(f"input '{name}' must be a boolean, got {_describe(value)}")


def _describe(value) -> str:
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _text(value, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise ForgeError(f"input '{name}' is not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise ForgeError(f"input '{name}' must be a string (BYTES), got {type(value).__name__}")


def parse_request(
    inputs: dict[str, np.ndarray], use_medusa: bool, max_batch_size: int, decoupled: bool, tokenizer=None
) -> list[RowRequest]:
    """One :class:`RowRequest` per batch row of ``inputs`` (name -> array with the batch dimension).

    ``tokenizer`` (the engine's) turns bad / stop / embedding-bias words into ids; a request with
    words and no tokenizer is refused."""
    check_names(inputs, INPUTS)
    for name, why in REFUSED.items():
        if name in inputs:
            raise ForgeError(f"input '{name}': {why}")
    text = inputs["text_input"]
    batch = text.shape[0] if text.ndim > 0 else 0
    if batch < 1:
        raise ForgeError(f"input 'text_input' has shape {list(text.shape)}; send shape [1, 1] (batch of one prompt)")
    if max_batch_size and batch > max_batch_size:
        raise ForgeError(f"batch of {batch} prompts exceeds max_batch_size {max_batch_size}")
    rows = [_parse_row(inputs, batch, row, use_medusa, decoupled, tokenizer) for row in range(batch)]
    if batch > 1 and any(r.stream for r in rows):
        raise ForgeError(f"streaming (stream=true) takes one prompt per request; got a batch of {batch}")
    return rows


def _parse_row(
    inputs: dict[str, np.ndarray], batch: int, row: int, use_medusa: bool, decoupled: bool, tokenizer
) -> RowRequest:
    prompt_cells = _rows("text_input", inputs["text_input"], batch)[row]
    prompt = _text(prompt_cells[0], "text_input") if prompt_cells.size else ""
    if not prompt:
        raise ForgeError("input 'text_input' is an empty prompt; give at least one token of input")
    if any(_strings("decoder_text_input", inputs, batch, row)):
        raise ForgeError(
            "input 'decoder_text_input' is for encoder-decoder models; the native engine is "
            "decoder-only: send it empty or leave it out"
        )
    max_tokens = _max_tokens(inputs, batch, row)
    stream = _optional(_bool, "stream", inputs, batch, row) or False
    if stream and not decoupled:
        raise ForgeError(
            "stream=true needs a decoupled model; regenerate the repository with `medusa-forge triton-repo --decoupled`"
        )
    beam_width = _optional(_int, "beam_width", inputs, batch, row)
    if beam_width is not None and beam_width != 1:
        raise ForgeError(f"input 'beam_width' must be 1 (the native engine decodes a single beam), got {beam_width}")
    _optional(_float, "length_penalty", inputs, batch, row)  # beam search only: checked, then unused
    end_id = _optional(_int, "end_id", inputs, batch, row)
    pad_id = _optional(_int, "pad_id", inputs, batch, row)
    gcfg = GenerationConfig(
        max_new_tokens=max_tokens,
        use_medusa=use_medusa,
        **sampling(inputs, batch, row),
        eos_token_ids=(end_id,) if end_id is not None and end_id >= 0 else None,
        ignore_eos=end_id is not None and end_id < 0,
        logits_settings=_logits_settings(inputs, batch, row, tokenizer, end_id),
        stop_words=_word_ids("stop_words", inputs, batch, row, tokenizer),
        return_log_probs=_optional(_bool, "return_log_probs", inputs, batch, row) or False,
        return_context_logits=_optional(_bool, "return_context_logits", inputs, batch, row) or False,
        return_generation_logits=_optional(_bool, "return_generation_logits", inputs, batch, row) or False,
    )
    return RowRequest(prompt, gcfg, stream, pad_id if pad_id is not None else -1)


def _max_tokens(inputs: dict[str, np.ndarray], batch: int, row: int) -> int:
    cells = _rows("max_tokens", inputs["max_tokens"], batch)[row]
    if cells.size < 1:
        raise ForgeError("input 'max_tokens' is empty; give the number of tokens to generate")
    if cells.size > 1:
        raise ForgeError(
            f"input 'max_tokens' has shape {list(inputs['max_tokens'].shape)}; send one value per prompt "
            f"(shape [{batch}, 1])"
        )
    value = _int(cells[0], "max_tokens")
    if value < 1:
        raise ForgeError(f"input 'max_tokens' must be >= 1, got {value}")
    return value


def sampling(
    inputs: dict[str, np.ndarray], batch: int, row: int, top_k_name: str = "top_k", top_p_name: str = "top_p"
) -> dict:
    """temperature / top_k / top_p / seed of one row, read as TensorRT-LLM 0.11 reads them: top_k and
    top_p both 0 (their defaults when not sent) is greedy whatever the temperature (the sampling
    layers' runtime-argument setup turns k 0, p 0 into k 1), and so is top_k 1; greedy is temperature
    0 here, so Medusa stays exact. Sampling (or, with Medusa, typical acceptance) needs
    temperature > 0 with top_k > 1 or top_p > 0."""
    temperature = _optional(_float, "temperature", inputs, batch, row)
    top_k = _optional(_int, top_k_name, inputs, batch, row)
    top_p = _optional(_float, top_p_name, inputs, batch, row)
    seed = _optional(_int, "random_seed", inputs, batch, row)
    temperature = 0.0 if temperature is None else temperature
    if not np.isfinite(temperature) or temperature < 0:
        raise ForgeError(f"input 'temperature' must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ForgeError(f"input '{top_k_name}' must be >= 0, got {top_k}")
    if top_p is not None and not (0.0 <= top_p <= 1.0):
        raise ForgeError(f"input '{top_p_name}' must be in [0, 1] (0: off), got {top_p}")
    if seed is not None and not 0 <= seed < 2**64:
        raise ForgeError(f"input 'random_seed' must be in 0..2^64-1, got {seed}")
    if top_k == 1 or not (top_k or top_p):
        temperature, top_k = 0.0, 0
    return {"temperature": temperature, "top_k": top_k or 0, "top_p": top_p if top_p else 1.0, "seed": seed}


def penalties(inputs: dict[str, np.ndarray], batch: int, row: int) -> dict:
    """LogitsSettings' repetition / presence / frequency penalties and min_length of one row."""

    def finite(name: str, default: float) -> float:
        value = _optional(_float, name, inputs, batch, row)
        if value is not None and not np.isfinite(value):
            raise ForgeError(f"input '{name}' must be a finite number, got {value}")
        return default if value is None else value

    repetition = finite("repetition_penalty", 1.0)
    if repetition <= 0:
        raise ForgeError(f"input 'repetition_penalty' must be > 0, got {repetition}")
    min_length = _optional(_int, "min_length", inputs, batch, row) or 0
    if min_length < 0:
        raise ForgeError(f"input 'min_length' must be >= 0, got {min_length}")
    return {
        "repetition_penalty": repetition,
        "presence_penalty": finite("presence_penalty", 0.0),
        "frequency_penalty": finite("frequency_penalty", 0.0),
        "min_length": min_length,
    }


def _logits_settings(
    inputs: dict[str, np.ndarray], batch: int, row: int, tokenizer, end_id: int | None
) -> LogitsSettings | None:
    settings = LogitsSettings(
        **penalties(inputs, batch, row),
        embedding_bias=_embedding_bias(inputs, batch, row, tokenizer),
        bad_words=_word_ids("bad_words", inputs, batch, row, tokenizer),
        end_ids=(end_id,) if end_id is not None and end_id >= 0 else (),
    )
    return settings if settings.active else None


def _strings(name: str, inputs: dict[str, np.ndarray], batch: int, row: int) -> list[str]:
    if name not in inputs:
        return []
    return [_text(w, name) for w in _rows(name, inputs[name], batch)[row]]


def _need(tokenizer, name: str):
    if tokenizer is None:
        raise ForgeError(f"input '{name}' needs the engine's tokenizer to turn words into token ids")
    return tokenizer


def _word_ids(name: str, inputs: dict[str, np.ndarray], batch: int, row: int, tokenizer) -> tuple[tuple[int, ...], ...]:
    words = [w for w in _strings(name, inputs, batch, row) if w]
    if not words:
        return ()
    hf = _need(tokenizer, name).hf
    return tuple(ids for ids in (tuple(hf.encode(w, add_special_tokens=False)) for w in words) if ids)


def _embedding_bias(inputs: dict[str, np.ndarray], batch: int, row: int, tokenizer) -> tuple[tuple[int, float], ...]:
    words = _strings("embedding_bias_words", inputs, batch, row)
    if "embedding_bias_weights" not in inputs:
        if words:
            raise ForgeError("input 'embedding_bias_words' needs 'embedding_bias_weights' (one weight per word)")
        return ()
    weights = [
        _float(w, "embedding_bias_weights")
        for w in _rows("embedding_bias_weights", inputs["embedding_bias_weights"], batch)[row]
    ]
    if len(words) != len(weights):
        raise ForgeError(
            f"inputs 'embedding_bias_words' ({len(words)} words) and 'embedding_bias_weights' "
            f"({len(weights)} weights) must have the same length"
        )
    if not all(np.isfinite(w) for w in weights):
        raise ForgeError(f"input 'embedding_bias_weights' must be finite numbers, got {weights}")
    if not words:
        return ()
    tok = _need(tokenizer, "embedding_bias_words")
    return tuple((t, w) for word, w in zip(words, weights) for t in tok.encode(word))


def _optional(convert, name: str, inputs: dict[str, np.ndarray], batch: int, row: int):
    """An optional one-value-per-row input, converted and type-checked; None when absent."""
    value = _scalar(name, inputs, batch, row)
    return None if value is None else convert(value, name)

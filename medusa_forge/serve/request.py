"""Contract tensors of one Triton request -> validated generation requests (one per batch row).

Kept free of ``triton_python_backend_utils`` so the same checks run in-process and in tests. Every
problem is a :class:`ForgeError` whose one line names the tensor and what is wrong; the Triton model
turns it into an error response, so a bad request never takes the server down.

Triton itself already rejects a missing required input and a wrong datatype (its messages name the
tensor); what remains for us is what the config cannot express: values, shapes inside a row, and
the optional tensors the native engine does not implement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medusa_forge.contract import INPUT_BY_NAME, INPUTS
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.errors import ForgeError


@dataclass(frozen=True)
class RowRequest:
    prompt: str
    gcfg: GenerationConfig
    stream: bool


def _rows(name: str, array: np.ndarray, batch: int) -> np.ndarray:
    """[batch, ...] with at least one value per row."""
    if array.ndim == 0 or array.shape[0] != batch:
        raise ForgeError(f"input '{name}' has shape {list(array.shape)}; expected its first dimension to be the "
                         f"batch size {batch}")
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


def parse_request(inputs: dict[str, np.ndarray], use_medusa: bool, max_batch_size: int,
                  decoupled: bool) -> list[RowRequest]:
    """One :class:`RowRequest` per batch row of ``inputs`` (name -> array with the batch dimension)."""
    not_arrays = sorted(name for name, value in inputs.items() if not isinstance(value, np.ndarray))
    if not_arrays:
        raise ForgeError(f"input(s) {', '.join(not_arrays)} must be arrays with a batch dimension")
    unknown = sorted(set(inputs) - set(INPUT_BY_NAME))
    if unknown:
        raise ForgeError(f"unknown input(s) {', '.join(unknown)}; this model takes "
                         f"{', '.join(t.name for t in INPUTS)}")
    for spec in INPUTS:
        if not spec.optional and spec.name not in inputs:
            raise ForgeError(f"missing required input '{spec.name}'")
    text = inputs["text_input"]
    batch = text.shape[0] if text.ndim > 0 else 0
    if batch < 1:
        raise ForgeError(f"input 'text_input' has shape {list(text.shape)}; send shape [1, 1] (batch of one prompt)")
    if max_batch_size and batch > max_batch_size:
        raise ForgeError(f"batch of {batch} prompts exceeds max_batch_size {max_batch_size}")
    if "bad_words" in inputs and any(_text(w, "bad_words") for w in inputs["bad_words"].reshape(-1)):
        raise ForgeError("input 'bad_words' is not supported by the native engine; send it empty or leave it out")
    rows = []
    for row in range(batch):
        rows.append(_parse_row(inputs, batch, row, use_medusa, decoupled))
    if batch > 1 and any(r.stream for r in rows):
        raise ForgeError("streaming (stream=true) takes one prompt per request; got a batch of "
                         f"{batch}")
    return rows


def _parse_row(inputs: dict[str, np.ndarray], batch: int, row: int, use_medusa: bool, decoupled: bool) -> RowRequest:
    prompt_cells = _rows("text_input", inputs["text_input"], batch)[row]
    prompt = _text(prompt_cells[0], "text_input") if prompt_cells.size else ""
    if not prompt:
        raise ForgeError("input 'text_input' is an empty prompt; give at least one token of input")
    max_cells = _rows("max_tokens", inputs["max_tokens"], batch)[row]
    if max_cells.size < 1:
        raise ForgeError("input 'max_tokens' is empty; give the number of tokens to generate")
    if max_cells.size > 1:
        raise ForgeError(f"input 'max_tokens' has shape {list(inputs['max_tokens'].shape)}; send one value per prompt "
                         f"(shape [{batch}, 1])")
    max_tokens = _int(max_cells[0], "max_tokens")
    if max_tokens < 1:
        raise ForgeError(f"input 'max_tokens' must be >= 1, got {max_tokens}")
    stream = _optional(_bool, "stream", inputs, batch, row) or False
    if stream and not decoupled:
        raise ForgeError("stream=true needs a decoupled model; regenerate the repository with "
                         "`medusa-forge triton-repo --decoupled`")
    temperature = _optional(_float, "temperature", inputs, batch, row)
    top_k = _optional(_int, "top_k", inputs, batch, row)
    top_p = _optional(_float, "top_p", inputs, batch, row)
    seed = _optional(_int, "random_seed", inputs, batch, row)
    end_id = _optional(_int, "end_id", inputs, batch, row)
    temperature = 0.0 if temperature is None else temperature
    if not np.isfinite(temperature) or temperature < 0:
        raise ForgeError(f"input 'temperature' must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ForgeError(f"input 'top_k' must be >= 0, got {top_k}")
    if top_p is not None and not (0.0 < top_p <= 1.0):
        raise ForgeError(f"input 'top_p' must be in (0, 1], got {top_p}")
    if seed is not None and not 0 <= seed < 2**64:
        raise ForgeError(f"input 'random_seed' must be in 0..2^64-1, got {seed}")
    stops: tuple[str, ...] = ()
    if "stop_words" in inputs:
        stops = tuple(s for s in (_text(w, "stop_words") for w in _rows("stop_words", inputs["stop_words"], batch)[row]) if s)
    gcfg = GenerationConfig(
        max_new_tokens=max_tokens, use_medusa=use_medusa, temperature=temperature,
        top_k=top_k if top_k is not None else 0, top_p=top_p if top_p is not None else 1.0,
        stop_strings=stops, seed=seed, eos_token_ids=(end_id,) if end_id is not None and end_id >= 0 else None,
        ignore_eos=end_id is not None and end_id < 0)
    return RowRequest(prompt, gcfg, stream)


def _optional(convert, name: str, inputs: dict[str, np.ndarray], batch: int, row: int):
    """An optional one-value-per-row input, converted and type-checked; None when absent."""
    value = _scalar(name, inputs, batch, row)
    return None if value is None else convert(value, name)

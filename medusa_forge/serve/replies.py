"""One request's answer as contract tensors (medusa_forge/contract.py), batch dimension included.

Shapes are what tensorrtllm_backend v0.11.0's ensemble returns for one beam, which its clients read:
``text_output`` [1] (its postprocessing model.py ``_postprocessing`` returns one string per batch
row and beam, a 1-D array, and end_to_end_grpc_client.py reads ``output[0].decode()``);
``cum_log_probs`` [1, 1]; ``output_log_probs`` [1, 1, n]; ``context_logits`` [1, T, V];
``generation_logits`` [1, 1, n, V], all float32.

The log probs and logits come back only when the request asked for them (``return_log_probs`` /
``return_context_logits`` / ``return_generation_logits``), the real values with the final response.
A streamed chunk then carries the placeholders the v0.11.0 postprocessing sends for a tensor its
LLM step did not produce (zeros shaped [1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1, 1]), so a client that
reads them from every response (end_to_end_grpc_client.py does) finds them. The speculative-decoding
statistics and ``output_tokens`` / ``accepted_per_step`` are as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medusa_forge.engine.generation import GenerationConfig, GenerationResult

PLACEHOLDERS = {  # the v0.11.0 postprocessing's stand-ins, by the flag that asks for the tensor
    "return_log_probs": {
        "cum_log_probs": np.zeros((1, 1), np.float32),
        "output_log_probs": np.zeros((1, 1, 1), np.float32),
    },
    "return_context_logits": {"context_logits": np.zeros((1, 1, 1), np.float32)},
    "return_generation_logits": {"generation_logits": np.zeros((1, 1, 1, 1), np.float32)},
}


@dataclass
class Reply:
    text: str
    tokens: list[int]
    accepted_per_step: list[int]
    drafts_per_step: list[int]  # draft tokens each step verified (its tree's nodes less the root; 0: plain)
    log_probs: list[float] | None = None
    context_logits: np.ndarray | None = None
    generation_logits: np.ndarray | None = None

    @classmethod
    def from_result(cls, result: GenerationResult) -> Reply:
        return cls(
            result.text,
            list(result.tokens),
            list(result.accepted_per_step),
            list(result.drafts_per_step),
            result.log_probs,
            result.context_logits,
            result.generation_logits,
        )

    @property
    def total_accepted_draft_tokens(self) -> int:
        return sum(n - 1 for n, d in zip(self.accepted_per_step, self.drafts_per_step) if d)

    @property
    def total_draft_tokens(self) -> int:
        return sum(self.drafts_per_step)

    @property
    def acceptance_rate(self) -> float:
        return self.total_accepted_draft_tokens / self.total_draft_tokens if self.total_draft_tokens else 0.0


def reply_tensors(
    reply: Reply | None, text: str, tokens: list[int], final: bool, gcfg: GenerationConfig | None = None
) -> dict[str, np.ndarray]:
    """Contract outputs for one response, batch dimension included ([1, ...]).

    A streamed chunk carries its text delta and token ids (and the placeholders of what ``gcfg``
    asked for); the final response (or the only one) adds the per-request statistics and the log
    probs / logits the request asked for.
    """
    out = {
        "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
        "output_tokens": np.array([tokens], dtype=np.int32).reshape(1, -1),
    }
    if final and reply is not None:
        out.update(
            {
                "acceptance_rate": np.array([[reply.acceptance_rate]], dtype=np.float32),
                "total_accepted_draft_tokens": np.array([[reply.total_accepted_draft_tokens]], dtype=np.int32),
                "total_draft_tokens": np.array([[reply.total_draft_tokens]], dtype=np.int32),
                "accepted_per_step": np.array([reply.accepted_per_step], dtype=np.int32).reshape(1, -1),
            }
        )
        out.update(_asked(reply))
    elif gcfg is not None:
        for flag, tensors in PLACEHOLDERS.items():
            if getattr(gcfg, flag):
                out.update(tensors)
    return out


def _asked(reply: Reply) -> dict[str, np.ndarray]:
    out = {}
    if reply.log_probs is not None:
        lp = np.asarray(reply.log_probs, dtype=np.float32)
        out["cum_log_probs"] = np.array([[lp.sum(dtype=np.float64)]], dtype=np.float32)
        out["output_log_probs"] = lp.reshape(1, 1, -1)
    if reply.context_logits is not None:
        out["context_logits"] = np.asarray(reply.context_logits, dtype=np.float32)[None]
    if reply.generation_logits is not None:
        out["generation_logits"] = np.asarray(reply.generation_logits, dtype=np.float32)[None, None]
    return out


def stack_rows(per_row: list[dict[str, np.ndarray]], pad_id: int = -1) -> dict[str, np.ndarray]:
    """Batch rows into one response: ragged tensors are right-padded in every dimension but the
    batch's, integers with ``pad_id`` and floats with 0."""
    if len(per_row) == 1:
        return per_row[0]
    out = {}
    for name in per_row[0]:
        arrays = [r[name] for r in per_row]
        shape = np.max([a.shape for a in arrays], axis=0)
        fill = pad_id if np.issubdtype(arrays[0].dtype, np.integer) else 0
        arrays = [
            a
            if a.shape == tuple(shape)
            else np.pad(a, [(0, 0)] + [(0, int(m - d)) for m, d in zip(shape[1:], a.shape[1:])], constant_values=fill)
            for a in arrays
        ]
        out[name] = np.concatenate(arrays, axis=0)
    return out


def llm_reply_tensors(
    reply: Reply | None, tokens: list[int], final: bool, gcfg: GenerationConfig | None = None
) -> dict[str, np.ndarray]:
    """The tensorrt_llm model's outputs for one response: ``output_ids`` [1, 1, k] and
    ``sequence_length`` [1, 1] of this response's new ids (the prompt excluded, as triton-repo sets
    ``exclude_input_in_output`` for TensorRT-LLM), then what :func:`reply_tensors` adds."""
    out = reply_tensors(reply, "", tokens, final, gcfg)
    del out["text_output"]
    return {
        "output_ids": np.array(tokens, dtype=np.int32).reshape(1, 1, -1),
        "sequence_length": np.array([[len(tokens)]], dtype=np.int32),
        **out,
    }

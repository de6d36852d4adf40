"""Request-side types: what a caller asks for and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medusa_forge.engine.logits_processing import LogitsSettings


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings for one request.

    temperature == 0 is greedy: with Medusa the output is token-identical to plain greedy decoding.
    temperature > 0 with Medusa uses typical acceptance (FasterDecoding's posterior threshold
    ``p > min(threshold, alpha * exp(-entropy))``, root token greedy); without Medusa it samples
    (top-k / top-p filtered).
    """

    max_new_tokens: int = 128
    use_medusa: bool = True
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    posterior_threshold: float = 0.09
    posterior_alpha: float = 0.3
    stop_strings: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None  # None: the model's own
    ignore_eos: bool = False
    seed: int | None = None
    # TensorRT-LLM's request options (see logits_processing.py): penalties, bias, bad words and
    # min_length change the logits every token is chosen from; stop words end the sequence once it
    # ends with one of these id sequences (kept in the output).
    logits_settings: LogitsSettings | None = None
    stop_words: tuple[tuple[int, ...], ...] = ()
    return_log_probs: bool = False  # GenerationResult.log_probs: log_softmax of the processed logits
    return_context_logits: bool = False  # the prompt's logits [T, V]
    return_generation_logits: bool = False  # the raw logits each output token was chosen from [n, V]

    @property
    def needs_logits(self) -> bool:
        """Whether the host must see logits (processing them or returning them) at every step."""
        return bool(
            (self.logits_settings is not None and self.logits_settings.active)
            or self.return_log_probs
            or self.return_context_logits
            or self.return_generation_logits
        )


@dataclass
class GenerationResult:
    prompt_tokens: int
    tokens: list[int]
    text: str
    steps: int
    accepted_per_step: list[int] = field(default_factory=list)  # tokens produced by each decoding step
    finish_reason: str = "length"  # "eos" | "length" | "stop"
    ttft_s: float = 0.0
    total_s: float = 0.0
    log_probs: list[float] | None = None  # one per output token (return_log_probs)
    context_logits: np.ndarray | None = None  # float32 [prompt_tokens, V] (return_context_logits)
    generation_logits: np.ndarray | None = None  # float32 [len(tokens), V] (return_generation_logits)
    # Draft tokens each decoding step verified (its tree's nodes less the root; 0 for a plain step):
    # under batching the tree changes from step to step, so one number per request would be wrong.
    drafts_per_step: list[int] = field(default_factory=list)

    @property
    def cum_log_prob(self) -> float | None:
        return float(sum(self.log_probs)) if self.log_probs is not None else None

    @property
    def tokens_per_s(self) -> float:
        return len(self.tokens) / self.total_s if self.total_s > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens per decoding step (1.0 for plain decoding)."""
        return sum(self.accepted_per_step) / len(self.accepted_per_step) if self.accepted_per_step else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "prompt_tokens": self.prompt_tokens,
            "steps": self.steps,
            "accepted_per_step": self.accepted_per_step,
            "drafts_per_step": self.drafts_per_step,
            "mean_accepted": round(self.mean_accepted, 4),
            "finish_reason": self.finish_reason,
            "ttft_s": round(self.ttft_s, 6),
            "total_s": round(self.total_s, 6),
            "tokens_per_s": round(self.tokens_per_s, 3),
            **({"log_probs": self.log_probs} if self.log_probs is not None else {}),
        }

"""Per-request logits processing with TensorRT-LLM 0.11's semantics, for plain rows and tree nodes.

What TensorRT-LLM 0.11 does to a request's logits before it picks a token (tensorrtllm_backend
v0.11.0 pins TensorRT-LLM at commit 05316d3313360012536ace46c781518f5afae75e; read in
``cpp/tensorrt_llm/kernels/penaltyKernels.cu`` (``batchApplyPenalty``, stored version 249d93d5),
``banBadWords.cu`` (23bc5b7c), ``stopCriteriaKernels.cu`` (027cd518) and
``layers/defaultDecodingParams.h`` (1020a8d7)), in this order:

1. embedding bias: ``logit += bias[token]`` (float32);
2. penalties, for every token that occurs at least once in the sequence so far, *prompt included*
   (the context phase counts the prompt's ids, each generation step adds the token just produced):
   repetition ``logit < 0 ? logit * r : logit / r``, then presence ``logit -= p``, then frequency
   ``logit -= f * count``; a token that never occurred is untouched;
3. min_length: while fewer than ``min_length`` tokens have been generated, the end id's logit is
   set to ``-FLT_MAX``;
4. bad words (a separate layer after the penalties): a one-token word is always banned; a longer
   word bans its last token (``-inf``) when the sequence (prompt included) ends with its other tokens.

Temperature, which TensorRT-LLM folds into step 2 (after the bias, before the penalties), is left
to the sampler here: greedy decoding, the case whose equality with TensorRT-LLM we test, does not
read it. Stop words (``stopCriteriaKernels.cu``) end a sequence once it ends with a stop word's ids,
prompt included, the stop word's tokens kept in the output: :func:`stop_cut`.

One call handles any set of rows: ``outputs[i]`` lists the ids generated before row i's choice.
For plain decoding that is the request's tokens so far; for a Medusa tree node it is the tokens so
far followed by the path from the root to that node (inclusive), so each node is processed as
plain decoding would process the same position, and greedy acceptance stays exact.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MASK_VALUE = torch.finfo(torch.float32).min  # TensorRT-LLM's min-length mask (-FLT_MAX), not -inf


@dataclass(frozen=True)
class LogitsSettings:
    """One request's logits processing; defaults are TensorRT-LLM's no-ops."""

    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_length: int = 0  # tokens generated before an end id may be chosen
    embedding_bias: tuple[tuple[int, float], ...] = ()  # (token, weight); repeated tokens add up
    bad_words: tuple[tuple[int, ...], ...] = ()  # id sequences
    end_ids: tuple[int, ...] = ()  # ids min_length holds back (none given: the engine's end ids)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def active(self) -> bool:
        """Whether :func:`process` can change any logit."""
        return bool(self.penalized or self.embedding_bias or self.bad_words or self.min_length > 0)


def process(
    logits: Tensor, outputs: Sequence[Sequence[int]], prompt: Sequence[int], settings: LogitsSettings | None
) -> Tensor:
    """Processed float32 copy of ``logits`` [N, V]; row i follows ``prompt`` + ``outputs[i]``."""
    out = logits.float().clone()
    if settings is None or not settings.active:
        return out
    if len(outputs) != out.shape[0]:
        raise ValueError(f"{len(outputs)} output histories for {out.shape[0]} logits rows")
    vocab = out.shape[1]
    if settings.embedding_bias:
        out += _dense_bias(settings.embedding_bias, vocab, out.device)
    if settings.penalized:
        _penalize(out, _counts(outputs, prompt, vocab, out.device), settings)
    if settings.min_length > 0:
        ends = [t for t in settings.end_ids if 0 <= t < vocab]
        short = [i for i, o in enumerate(outputs) if len(o) < settings.min_length]
        if ends and short:
            out[torch.tensor(short, device=out.device)[:, None], torch.tensor(ends, device=out.device)] = MASK_VALUE
    if settings.bad_words:
        rows, cols = _banned(outputs, prompt, settings.bad_words, vocab)
        if rows:
            out[torch.tensor(rows, device=out.device), torch.tensor(cols, device=out.device)] = float("-inf")
    return out


def _dense_bias(pairs: tuple[tuple[int, float], ...], vocab: int, device) -> Tensor:
    bias = torch.zeros(vocab, dtype=torch.float32)
    kept = [(t, w) for t, w in pairs if 0 <= t < vocab]
    if kept:
        bias.index_add_(0, torch.tensor([t for t, _ in kept]), torch.tensor([w for _, w in kept], dtype=torch.float32))
    return bias.to(device)


def _counts(outputs: Sequence[Sequence[int]], prompt: Sequence[int], vocab: int, device) -> Tensor:
    """Occurrences [N, V] of every token in prompt + outputs[i]; ids outside the vocab are skipped.

    The rows' shared history (the prompt and, for tree nodes, the tokens so far) is counted once."""
    shared = list(os.path.commonprefix([list(o) for o in outputs])) if outputs else []
    base = torch.zeros(vocab, dtype=torch.int32)
    ids = torch.tensor([t for t in (*prompt, *shared) if 0 <= t < vocab], dtype=torch.long)
    if ids.numel():
        base += torch.bincount(ids, minlength=vocab).to(torch.int32)
    counts = base.repeat(len(outputs), 1)
    pairs = [(i, t) for i, o in enumerate(outputs) for t in o[len(shared) :] if 0 <= t < vocab]
    if pairs:
        index = (torch.tensor([i for i, _ in pairs]), torch.tensor([t for _, t in pairs]))
        counts.index_put_(index, torch.ones(len(pairs), dtype=torch.int32), accumulate=True)
    return counts.to(device)


def _penalize(out: Tensor, counts: Tensor, s: LogitsSettings) -> None:
    seen = counts > 0
    if s.repetition_penalty != 1.0:
        r = s.repetition_penalty
        out.copy_(torch.where(seen, torch.where(out < 0, out * r, out / r), out))
    if s.presence_penalty != 0.0:
        out.sub_(seen.float() * s.presence_penalty)
    if s.frequency_penalty != 0.0:
        out.sub_(counts.float() * s.frequency_penalty)


def _banned(
    outputs: Sequence[Sequence[int]], prompt: Sequence[int], words: tuple[tuple[int, ...], ...], vocab: int
) -> tuple[list[int], list[int]]:
    rows, cols = [], []
    for i, o in enumerate(outputs):
        for word in words:
            if not word or not 0 <= word[-1] < vocab:
                continue
            if ends_with(prompt, o, word[:-1]):
                rows.append(i)
                cols.append(word[-1])
    return rows, cols


def ends_with(prompt: Sequence[int], generated: Sequence[int], tail: Sequence[int]) -> bool:
    """Whether prompt + generated ends with ``tail`` (an empty tail always matches)."""
    n = len(tail)
    if n == 0:
        return True
    if n > len(prompt) + len(generated):
        return False
    if n <= len(generated):
        return list(generated[len(generated) - n :]) == list(tail)
    k = n - len(generated)
    return list(prompt[len(prompt) - k :]) == list(tail[:k]) and list(generated) == list(tail[k:])


def stop_cut(
    prompt: Sequence[int], tokens: Sequence[int], new: int, stop_words: tuple[tuple[int, ...], ...]
) -> int | None:
    """The shortest length n among the last ``new`` tokens' positions at which prompt + tokens[:n]
    ends with a stop word (its ids stay in the output, as in TensorRT-LLM), or None."""
    if not stop_words:
        return None
    for n in range(len(tokens) - new + 1, len(tokens) + 1):
        if any(word and ends_with(prompt, tokens[:n], word) for word in stop_words):
            return n
    return None


def token_log_probs(processed: Tensor, tokens: Tensor) -> Tensor:
    """log_softmax of each processed row [R, V] at its chosen token [R] (float32)."""
    return torch.log_softmax(processed.float(), dim=-1).gather(1, tokens.view(-1, 1)).view(-1)

"""logits_processing.process against a plain per-row reference of TensorRT-LLM 0.11's rules.

The reference below is written from tensorrtllm_backend v0.11.0's pinned TensorRT-LLM
(05316d33): ``penaltyKernels.cu`` batchApplyPenalty (bias, then repetition / presence / frequency
over the prompt and the generated tokens, then min_length's -FLT_MAX on the end id),
``banBadWords.cu`` (last token of a word banned once the sequence ends with the rest) and
``stopCriteriaKernels.cu`` (the sequence, prompt included, ends with a stop word).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from medusa_forge.engine.logits_processing import (
    LogitsSettings,
    process,
    stop_cut,
    token_log_probs,
)

V = 12
FLT_MIN = -3.4028234663852886e38


def reference_row(row: list[float], generated: list[int], prompt: list[int], s: LogitsSettings) -> list[float]:
    """One row, one token at a time, in the kernels' order."""
    seq = list(prompt) + list(generated)
    out = []
    for token, logit in enumerate(row):
        logit += sum(w for t, w in s.embedding_bias if t == token)
        count = seq.count(token)
        if count > 0:
            logit = logit * s.repetition_penalty if logit < 0 else logit / s.repetition_penalty
            logit -= s.presence_penalty
            logit -= s.frequency_penalty * count
        out.append(logit)
    if len(generated) < s.min_length:
        for end in s.end_ids:
            out[end] = FLT_MIN
    for word in s.bad_words:
        head = list(word[:-1])
        if len(word) == 1 or (len(seq) >= len(head) and seq[len(seq) - len(head) :] == head):
            out[word[-1]] = -math.inf
    return out


PROMPT = [3, 5, 5, 7]
CASES = {
    "nothing set changes nothing": LogitsSettings(),
    "repetition penalty divides positive and multiplies negative logits of seen tokens": LogitsSettings(
        repetition_penalty=1.7
    ),
    "presence penalty subtracts once per seen token": LogitsSettings(presence_penalty=0.8),
    "frequency penalty subtracts per occurrence, prompt included": LogitsSettings(frequency_penalty=0.35),
    "all three penalties apply in the kernel's order": LogitsSettings(1.3, 0.5, 0.25),
    "embedding bias adds up over repeated tokens": LogitsSettings(embedding_bias=((2, 1.5), (2, 0.5), (9, -4.0))),
    "min_length holds back every end id while the output is short": LogitsSettings(min_length=3, end_ids=(0, 11)),
    "one-token bad words are always banned": LogitsSettings(bad_words=((4,), (10,))),
    "a bad word's last token is banned after the rest, prompt included": LogitsSettings(
        bad_words=((7, 1), (5, 7, 2), (6, 8, 9), (1, 2, 3, 4, 5, 6, 7))
    ),
    "everything at once": LogitsSettings(1.2, 0.3, 0.1, 2, ((1, 2.0), (5, -1.0)), ((7, 6), (8,)), (0,)),
}
HISTORIES = [[], [6], [6, 8], [5, 5, 1], [2, 2, 2, 7], [6, 8, 9]]


@pytest.mark.parametrize("settings", CASES.values(), ids=CASES.keys())
def test_process_equals_the_per_row_reference(settings):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(HISTORIES), V, generator=g) * 3
    got = process(logits, HISTORIES, PROMPT, settings)
    want = torch.tensor([reference_row(logits[i].tolist(), h, PROMPT, settings) for i, h in enumerate(HISTORIES)])
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6, equal_nan=False)
    assert torch.equal(torch.isinf(got), torch.isinf(want))


def test_random_settings_and_histories_equal_the_reference():
    rng = random.Random(1)
    for trial in range(40):
        s = LogitsSettings(
            rng.choice([1.0, 0.7, 1.5]),
            rng.choice([0.0, 0.4]),
            rng.choice([0.0, -0.2, 0.3]),
            rng.randrange(4),
            tuple((rng.randrange(V), rng.uniform(-2, 2)) for _ in range(rng.randrange(3))),
            tuple(tuple(rng.randrange(V) for _ in range(rng.randrange(1, 4))) for _ in range(rng.randrange(3))),
            (rng.randrange(V),),
        )
        prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 6))]
        shared = [rng.randrange(V) for _ in range(rng.randrange(4))]  # tree nodes share the tokens so far
        hist = [shared + [rng.randrange(V) for _ in range(rng.randrange(5))] for _ in range(5)]
        logits = torch.randn(5, V, generator=torch.Generator().manual_seed(trial))
        want = torch.tensor([reference_row(logits[i].tolist(), h, prompt, s) for i, h in enumerate(hist)])
        assert torch.allclose(process(logits, hist, prompt, s), want, atol=1e-6), (trial, s)


def test_process_leaves_its_input_alone_and_ignores_ids_past_the_vocab():
    logits = torch.zeros(1, V, dtype=torch.bfloat16)
    s = LogitsSettings(presence_penalty=1.0, embedding_bias=((V + 3, 9.0),), bad_words=((V + 1,),))
    out = process(logits, [[V + 5]], [1], s)
    assert torch.equal(logits, torch.zeros(1, V, dtype=torch.bfloat16))
    assert out[0, 1] == -1.0 and out.sum() == -1.0


@pytest.mark.parametrize(
    "settings,active",
    [
        (LogitsSettings(), False),
        (LogitsSettings(min_length=4), True),
        (LogitsSettings(min_length=4, end_ids=(2,)), True),
        (LogitsSettings(repetition_penalty=1.1), True),
        (LogitsSettings(embedding_bias=((1, 0.0),)), True),
        (LogitsSettings(bad_words=((3,),)), True),
    ],
    ids=lambda v: str(v),
)
def test_active_says_whether_any_logit_can_change(settings, active):
    assert settings.active is active


STOPS = [
    ("no stop words", [4, 5, 6], 3, (), None),
    ("a one-token stop word ends the output at it", [4, 5, 6], 3, ((5,),), 2),
    ("a stop word may begin in the prompt", [2, 9], 2, ((7, 2),), 1),
    ("only the new tokens are looked at", [5, 6, 7], 1, ((5,),), None),
    ("the earliest match among the new tokens wins", [1, 2, 3, 1, 2], 5, ((1, 2),), 2),
]


@pytest.mark.parametrize("tokens,new,stops,cut", [s[1:] for s in STOPS], ids=[s[0] for s in STOPS])
def test_stop_cut_finds_the_first_stop_word_among_the_new_tokens(tokens, new, stops, cut):
    assert stop_cut([3, 7], tokens, new, stops) == cut


def test_token_log_probs_are_log_softmax_at_the_chosen_tokens():
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, float("-inf")]])
    got = token_log_probs(logits, torch.tensor([2, 0]))
    assert torch.allclose(got, torch.tensor([2 - math.log(1 + math.e + math.e**2), -math.log(2)]))

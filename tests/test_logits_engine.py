"""Logits processing inside the engine: greedy Medusa == greedy plain decoding under TensorRT-LLM's
request options (issue 21, must-show 2), and equal log probs.

30 held-out prompts (one in five of the file, from the third; test_engine_exact takes the first of
each five), each decoded with one of the settings below, plain and with the `small` tree. The heads
are the trained ones the package ships: they draft tokens the tree accepts, so Medusa commits several
tokens a step (random heads rarely get past one) and does so in fewer steps.
"""

from __future__ import annotations

import numpy as np
import pytest

from medusa_forge.demo import shipped_heads
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.load import load_engine
from medusa_forge.engine.logits_processing import LogitsSettings

NEW_TOKENS = 32
PROMPT_TOKENS = 64
LOG_PROB_ATOL = 1e-4  # float32 CPU: tree rows and plain rows differ by a few ulps of the logits


@pytest.fixture(scope="module")
def engine(model_dir, one_thread):
    return load_engine(model_dir, shipped_heads(), tree="small", device="cpu", max_seq_len=256)


@pytest.fixture(scope="module")
def prompt_ids(engine, held_out_prompts):
    chosen = held_out_prompts[2::5][:30]
    assert len(chosen) == 30
    out = []
    for p in chosen:
        ids = engine.tokenizer.encode(p["prompt"])
        out.append(ids if len(ids) <= PROMPT_TOKENS else ids[:1] + ids[-(PROMPT_TOKENS - 1) :])
    return out


def words(engine, *texts: str) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(engine.tokenizer.hf.encode(t, add_special_tokens=False)) for t in texts)


@pytest.fixture(scope="module")
def settings(engine) -> dict[str, LogitsSettings]:
    paren, newline = words(engine, "(", "\n")
    return {
        "repetition": LogitsSettings(repetition_penalty=1.4),
        "presence + frequency": LogitsSettings(presence_penalty=0.6, frequency_penalty=0.3),
        "bias": LogitsSettings(embedding_bias=((paren[0], -6.0), (newline[0], 2.5))),
        "bad words": LogitsSettings(bad_words=words(engine, "self", "\n\n", " =", "()")),
        "min_length": LogitsSettings(min_length=NEW_TOKENS + 1, end_ids=(engine.cfg.eos_token_ids or (2,))[:1]),
        "everything": LogitsSettings(1.2, 0.2, 0.1, 8, ((paren[0], -3.0),), words(engine, " return", "):"), ()),
    }


def run(engine, ids, s, medusa: bool, **extra):
    return engine.generate_ids(
        ids, GenerationConfig(max_new_tokens=NEW_TOKENS, use_medusa=medusa, logits_settings=s, **extra)
    )


def greedy_would_write(engine, ids: list[int], tokens: list[int]) -> bool:
    """Whether unprocessed greedy decoding of ``ids`` gives ``tokens``: each is the argmax of the context
    logits of the prompt and the tokens before it (one prefill rather than a decoding step per token)."""
    logits = engine.generate_ids(
        ids + tokens[:-1], GenerationConfig(max_new_tokens=1, use_medusa=False, return_context_logits=True)
    ).context_logits
    return logits[len(ids) - 1 :].argmax(axis=-1).tolist() == tokens


def test_greedy_medusa_equals_greedy_plain_under_every_setting(engine, prompt_ids, settings):
    names = list(settings)
    changed = 0
    for k, ids in enumerate(prompt_ids):
        s = settings[names[k % len(names)]]
        plain, medusa = run(engine, ids, s, False), run(engine, ids, s, True)
        assert medusa.tokens == plain.tokens, (k, names[k % len(names)])
        assert medusa.steps < len(medusa.tokens)  # the tree did accept drafts
        changed += not greedy_would_write(engine, ids, plain.tokens)
    assert changed >= 15  # the settings bite: half the outputs or more differ from unprocessed greedy decoding


def test_bad_words_and_min_length_hold_in_the_output(engine, prompt_ids, settings):
    banned = settings["bad words"].bad_words
    for ids in prompt_ids[:6]:
        out = run(engine, ids, settings["bad words"], True).tokens
        seq = ids + out
        for word in banned:
            n = len(word)
            assert not any(tuple(seq[i - n + 1 : i + 1]) == word for i in range(len(ids), len(seq))), word


def test_min_length_holds_back_an_end_id_the_bias_pushes_forward(engine, prompt_ids):
    eos = (engine.cfg.eos_token_ids or (2,))[0]
    s = LogitsSettings(min_length=5, embedding_bias=((eos, 50.0),), end_ids=(eos,))
    for ids in prompt_ids[:4]:
        plain, medusa = run(engine, ids, s, False), run(engine, ids, s, True)
        assert medusa.tokens == plain.tokens
        assert len(plain.tokens) == 6 and plain.tokens[-1] == eos and eos not in plain.tokens[:-1]
        assert plain.finish_reason == "eos"


def test_medusa_log_probs_equal_plain_log_probs(engine, prompt_ids, settings):
    for k, ids in enumerate(prompt_ids[:8]):
        s = list(settings.values())[k % len(settings)]
        plain = run(engine, ids, s, False, return_log_probs=True, return_generation_logits=True)
        medusa = run(engine, ids, s, True, return_log_probs=True, return_generation_logits=True)
        assert medusa.tokens == plain.tokens
        assert len(medusa.log_probs) == len(medusa.tokens)
        np.testing.assert_allclose(medusa.log_probs, plain.log_probs, atol=LOG_PROB_ATOL, rtol=0)
        assert all(lp <= 0 for lp in medusa.log_probs)
        assert medusa.generation_logits.shape == (len(medusa.tokens), engine.cfg.vocab_size)
        np.testing.assert_allclose(medusa.generation_logits, plain.generation_logits, atol=1e-3, rtol=0)


def test_asking_for_logits_changes_no_token_and_the_next_request_is_unaffected(engine, prompt_ids):
    ids = prompt_ids[0]
    before = run(engine, ids, None, True).tokens
    asked = run(engine, ids, None, True, return_log_probs=True, return_context_logits=True)
    assert asked.tokens == before
    assert asked.context_logits.shape == (len(ids), engine.cfg.vocab_size)
    assert asked.context_logits.dtype == np.float32
    assert run(engine, ids, None, True).tokens == before
    sampled = dict(temperature=0.8, top_k=50, seed=3)
    assert (
        run(engine, ids, None, False, return_log_probs=True, **sampled).tokens
        == run(engine, ids, None, False, **sampled).tokens
    )  # the same draws from the same logits

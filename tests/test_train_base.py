"""The frozen base as training uses it: batched left-padded decoding and full-sequence hidden states."""

from __future__ import annotations

import pytest
import torch

from medusa_forge.engine import GenerationConfig, MedusaEngine
from medusa_forge.errors import ForgeError
from medusa_forge.model.checkpoint import load_hf_model
from medusa_forge.model.forward import hidden_states
from medusa_forge.model.step_meta import StepMeta
from medusa_forge.model.tokenizer import Tokenizer
from medusa_forge.train.base import batched_generate


@pytest.fixture(scope="module")
def model(model_dir):
    return load_hf_model(model_dir)


@pytest.fixture(scope="module")
def prompts(model_dir, held_out_prompts) -> list[list[int]]:
    tok = Tokenizer(model_dir)
    return [tok.encode(r["prompt"])[:n] for r, n in zip(held_out_prompts[:3], (37, 12, 58))]


NEW = 8


@pytest.fixture(scope="module")
def greedy(model, prompts) -> list[list[int]]:
    """Greedy continuations, batched two rows at a time (so rows of different lengths share a batch)."""
    return batched_generate(model, prompts, NEW, batch_size=2, eos_ids=(), progress=False)


def test_batched_greedy_equals_the_engines_plain_greedy(model, prompts, greedy):
    """Left padding must not change a single token: same prompts, one batch vs one at a time."""
    engine = MedusaEngine(model, None, None, None, max_seq_len=96)
    for p, o in zip(prompts, greedy):
        ref = engine.generate_ids(p, GenerationConfig(max_new_tokens=NEW, use_medusa=False, ignore_eos=True))
        assert o == ref.tokens


def test_generation_stops_rows_at_eos_and_keeps_input_order(model, prompts, greedy):
    eos = greedy[1][2]  # pretend the third token of row 1 is EOS
    cut = batched_generate(model, prompts, NEW, batch_size=3, eos_ids=(eos,), progress=False)
    assert cut[1] == greedy[1][:3]
    assert cut == [g[: g.index(eos) + 1] if eos in g else g for g in greedy]


def test_sampling_is_reproducible_with_a_seed(model, prompts):
    a = batched_generate(model, prompts[:2], 3, batch_size=2, temperature=1.0, seed=7, progress=False)
    b = batched_generate(model, prompts[:2], 3, batch_size=2, temperature=1.0, seed=7, progress=False)
    assert a == b


def test_hidden_states_ignore_right_padding(model, prompts):
    p = prompts[0]
    alone = hidden_states(model, torch.tensor([p]))
    padded = hidden_states(model, torch.tensor([p + [2] * 9, prompts[2][: len(p) + 9]]))
    assert torch.allclose(alone[0], padded[0, : len(p)], atol=1e-5)
    # and they are the decoder's own prefill states
    model.setup_caches(1, 64)
    ref = model(torch.tensor([p]), StepMeta.causal(len(p), 64, "cpu"))
    assert torch.allclose(alone, ref, atol=1e-5)


def test_empty_prompt_is_refused(model):
    with pytest.raises(ForgeError, match="empty prompt"):
        batched_generate(model, [[1, 5], []], 3, batch_size=2, progress=False)

"""Spec for model/tokenizer.py: the fast path (the Rust backend, no transformers wrapping) gives
exactly the ids transformers' tokenizer call gives, BOS included."""

from __future__ import annotations

import json

from conftest import MODEL_DIR, PROMPTS

from medusa_forge.model.tokenizer import Tokenizer


def test_fast_encode_gives_transformers_ids_on_every_held_out_prompt():
    tok = Tokenizer(MODEL_DIR)
    assert tok._backend is not None  # pycoder-26m ships a tokenizer.json: the fast path is taken
    prompts = [json.loads(line)["prompt"] for line in open(PROMPTS)]
    prompts += ["", " ", "\n\n\t", "</s> <s> inside text", "ünïcode ✓ 中文"]
    for text in prompts:
        assert tok.encode(text) == list(tok.hf(text).input_ids), text[:60]
    assert tok.encode("x")[0] == tok.hf.bos_token_id

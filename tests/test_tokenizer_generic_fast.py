"""A transformers 5 tokenizer (class ``TokenizersBackend``) under transformers 4, as in the TensorRT-LLM images.

transformers 4.42 / 4.57 cannot resolve that class; medusa_forge.model.tokenizer then reads tokenizer.json with the
generic fast class. Here (transformers 5) AutoTokenizer resolves it, so the generic one is built directly and must
tokenize exactly as AutoTokenizer does.
"""

from __future__ import annotations

import json

import pytest
import tokenizers
import transformers
from tokenizers import Tokenizer as RustTokenizer
from transformers import AutoTokenizer

from medusa_forge.model.tokenizer import Tokenizer, fast_from_files, generic_fast, string_merges


@pytest.fixture(scope="module")
def pair(model_dir):
    if not hasattr(transformers, "TokenizersBackend"):
        pytest.skip(f"transformers {transformers.__version__} cannot load the tokenizer to compare with")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "TokenizersBackend"  # pycoder-26m was saved by transformers 5
    return AutoTokenizer.from_pretrained(str(model_dir)), fast_from_files(model_dir, config)


def test_the_generic_fast_tokenizer_encodes_and_decodes_as_autotokenizer(pair, held_out_prompts):
    auto, generic = pair
    assert len(generic) == len(auto)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        assert getattr(generic, name) == getattr(auto, name), name
    for row in held_out_prompts[:40]:
        ids = auto(row["prompt"]).input_ids
        assert generic(row["prompt"]).input_ids == ids
        assert generic.backend_tokenizer.encode(row["prompt"]).ids == ids
        assert generic.decode(ids, skip_special_tokens=True) == auto.decode(ids, skip_special_tokens=True)


def test_the_generic_class_is_used_only_where_transformers_cannot_resolve_the_saved_one(model_dir):
    resolves = hasattr(transformers, "TokenizersBackend")
    assert (generic_fast(model_dir) is None) == resolves
    assert type(Tokenizer(model_dir).hf).__name__ == ("TokenizersBackend" if resolves else "PreTrainedTokenizerFast")


def test_merges_rewritten_as_strings_for_old_tokenizers_tokenize_the_same(model_dir, held_out_prompts):
    data = json.loads((model_dir / "tokenizer.json").read_text())
    assert isinstance(data["model"]["merges"][0], list)  # the pair form tokenizers >= 0.20 writes
    legacy = string_merges(data)
    assert isinstance(legacy["model"]["merges"][0], str) and data["model"]["merges"][0] == legacy["model"]["merges"][
        0
    ].split(" ")
    old = RustTokenizer.from_str(json.dumps(legacy))
    try:
        new = RustTokenizer.from_str(json.dumps(data))
    except Exception:  # noqa: BLE001
        pytest.skip(f"tokenizers {tokenizers.__version__} reads only string merges: compared where both forms read")
    for row in held_out_prompts[:40]:
        assert old.encode(row["prompt"]).ids == new.encode(row["prompt"]).ids
    assert string_merges({**data, "model": {**data["model"], "merges": [["a b", "c"]]}}) is None

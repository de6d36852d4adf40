"""`bench suite` end to end on CPU at toy sizes (the GPU session runs it for real): every engine and
peer runs on the same prompts, our Medusa decoding is identical to our base for every tree, and the
ratios come from the runs themselves, one per tree."""

from __future__ import annotations

import pytest

from medusa_forge.bench.suite import markdown, suite
from medusa_forge.prompts import read_prompts


@pytest.fixture(scope="module")
def result(model_dir, heads_dir, prompts_path):
    prompts = read_prompts(prompts_path, per_topic=1)[:2]
    return suite(
        str(model_dir),
        str(heads_dir),
        prompts,
        ["small", "chain-2"],
        max_new_tokens=6,
        max_prompt_tokens=64,
        peer_per_topic=1,
        step_shape=False,
        hf_compile=False,
    )


def test_every_engine_ran_every_prompt_and_medusa_matches_our_base(result):
    engines = result["engines"]
    assert set(engines) == {
        "ours_base",
        "ours_medusa[small]",
        "ours_medusa[chain-2]",
        "reference_medusa_eager",
        "hf_generate",
    }
    assert all(e["tokens_per_s"] > 0 for e in engines.values())
    assert engines["ours_base"]["prompts"] == engines["ours_medusa[small]"]["prompts"] == result["prompts"] == 2
    assert result["identity"]["ours_medusa[small]"] == result["identity"]["ours_medusa[chain-2]"] == "2/2"


def test_ratios_are_the_runs_tokens_per_s_one_per_tree(result):
    e, r = result["engines"], result["ratios"]
    for tree in ("small", "chain-2"):
        name = f"ours_medusa[{tree}]"
        assert r[f"{name}_vs_our_base"] == pytest.approx(
            e[name]["tokens_per_s"] / e["ours_base"]["tokens_per_s"], rel=1e-2
        )
    assert r["medusa_vs_our_base"] == r["ours_medusa[small]_vs_our_base"]  # the first tree is the headline
    assert r["hf_variant"] == "hf_generate"
    text = markdown(result, {"device": "cpu", "commit": "test"})
    assert "- ours_medusa[chain-2]_vs_our_base: **" in text and "| ours_medusa[small] |" in text

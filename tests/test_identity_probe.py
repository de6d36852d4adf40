"""Spec for ``bench probe`` (medusa_forge.bench.identity_probe): the tool that finds where tree
decoding stops being bit-identical to plain decoding. On the CPU the engine runs the PyTorch
reference ops, which are not batch invariant, so KV bits may differ there; tokens must not."""

from __future__ import annotations

import random

import torch

from medusa_forge.bench.identity_probe import first_kv_mismatch, oracle_tree_decode, probe
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.load import load_engine


def test_first_kv_mismatch_names_the_lowest_slot_then_layer_and_its_tree_row():
    a = torch.zeros(3, 2, 1, 2, 16, 4)  # [layers, k/v, batch, kv heads, slots, head dim]
    b = a.clone()
    assert first_kv_mismatch(a, b, 16, {}) is None
    b[2, 0, 0, 1, 9, 3] = 0.5  # layer 2 K at slot 9
    b[1, 1, 0, 0, 9, 0] = 0.25  # layer 1 V at slot 9: the lower layer is reported
    b[0, 0, 0, 0, 12, 0] = 1.0  # a later slot
    assert first_kv_mismatch(a, b, 16, {9: 4}) == {
        "slot": 9,
        "layer": 1,
        "kv": "v",
        "tree_row": 4,
        "max_abs_diff": 0.25,
    }
    assert first_kv_mismatch(a, b, 9, {}) is None  # slots at or past `upto` are not compared


def test_oracle_heads_make_long_acceptances_and_the_same_tokens_as_plain_decoding(model_dir, heads_dir):
    engine = load_engine(model_dir, heads_dir, tree="mc_sim_7b_63", device="cpu", max_seq_len=256)
    ids = engine.tokenizer.encode("import numpy as np\n\ndef moving_average(x, n):\n")
    report = probe(engine, [ids], new_tokens=24)
    summary = report.summary()
    assert summary["tokens_identical"] == 1
    assert summary["mean_accepted_per_step"] > 2.0  # the heads propose the base model's own tokens
    truth = engine.generate_ids(ids, GenerationConfig(max_new_tokens=24, use_medusa=False, ignore_eos=True)).tokens
    tokens, rows, accepted = oracle_tree_decode(engine, ids, truth, random.Random(1))
    assert tokens == truth
    assert sum(accepted) >= len(truth) - 1 and len(rows) == sum(accepted)
    assert all(0 <= r < engine.tree.num_nodes for r in rows.values())

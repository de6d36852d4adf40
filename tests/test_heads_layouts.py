"""Medusa heads in every layout users have, in and out (issue 11): round trips, the engine, the CLI.

Spec: round trips between all layouts are tensor-equal for pycoder-26m heads (the random float32 v1 heads
of the ``heads_dir`` fixture, and a bfloat16 "version 2" shared-lm_head variant of them), and the native engine's
greedy output, steps and acceptance are identical whichever layout it was given. Each written layout is
checked against the loader that reads it in test_heads_layouts_pins.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import run_cli
from heads_layouts_fixtures import TARGET_LAYOUT, H, K, L, V, tensors_of

from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.load import load_engine
from medusa_forge.engine.medusa_engine import MedusaEngine
from medusa_forge.heads.checkpoint import load_heads, read_heads_config
from medusa_forge.heads.cli import TARGET_NAMES
from medusa_forge.heads.layouts import TARGETS, detect, export_heads, inspect_heads
from medusa_forge.model.checkpoint import load_hf_model
from medusa_forge.model.tokenizer import Tokenizer
from medusa_forge.tree import ChoiceTree


# ----------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("variant", ["v1", "v2"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_each_layout_is_detected_and_reads_back_tensor_equal(variant, target, sources, exported, lm_head):
    src, out = tensors_of(sources[variant]), exported[variant, target]
    assert detect(out).layout == TARGET_LAYOUT[target]
    got = tensors_of(out)
    assert got.num_heads == K and got.num_layers == L and got.hidden_size == H and got.dtype == src.dtype
    assert torch.equal(got.res_weight, src.res_weight) and torch.equal(got.res_bias, src.res_bias)
    if variant == "v1":
        assert torch.equal(got.proj_weight, src.proj_weight)
    elif target in ("trtllm-medusa-dir", "axolotl"):  # these loaders need a projection per head: a copy of lm_head
        assert torch.equal(got.proj_weight, lm_head.to(src.dtype)[None].expand(K, V, H))
    else:  # FasterDecoding, TGI (1 layer) and vLLM (original_lm_head) keep shared heads shared
        assert got.proj_weight is None and got.shared_lm_head


PER_HEAD_TARGETS = ("trtllm-medusa-dir", "axolotl")  # loaders that need a vocab projection per head


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_every_layout_converts_to_every_other_losslessly(variant, sources, exported, model_dir, lm_head, tmp_path):
    """All 5 x 5 (from, to) pairs, each starting from the layout ``heads export`` wrote: tensor-equal, same dtype,
    same base model name; shared heads gain projections (copies of lm_head) only via a per-head target."""
    start = tensors_of(sources[variant])
    for a in TARGETS:
        for b in TARGETS:
            out = tmp_path / f"{a}-to-{b}"
            export_heads(exported[variant, a], b, out, base_model=model_dir)
            end = tensors_of(out)
            where = f"{a} -> {b}"
            assert torch.equal(end.res_weight, start.res_weight) and torch.equal(end.res_bias, start.res_bias), where
            assert end.dtype == start.dtype and end.base_model_name_or_path == start.base_model_name_or_path, where
            if variant == "v1":
                assert torch.equal(end.proj_weight, start.proj_weight), where
            elif a in PER_HEAD_TARGETS or b in PER_HEAD_TARGETS:
                assert torch.equal(end.proj_weight, lm_head.to(start.dtype)[None].expand(K, V, H)), where
            else:
                assert end.shared_lm_head, where
            shutil.rmtree(out)


def test_read_heads_config_gives_the_counts_of_every_layout(exported):
    """``build`` checks a tree against the head count from ``read_heads_config``: it must work for every layout."""
    for (variant, target), d in exported.items():
        conf = read_heads_config(d)
        assert (conf["medusa_num_heads"], conf["medusa_num_layers"]) == (K, L), (variant, target)


def test_fasterdecoding_legacy_trainer_output_is_read_as_version_2(v2_dir, model_dir, tmp_path):
    """FasterDecoding/Medusa@e2a5d20 ``medusa/train/train_legacy.py`` saves ``MedusaConfig(..., version="2")`` via
    ``save_pretrained`` (adds ``transformers_version``), the tokenizer, and ``medusa_lm_head.safetensors``."""
    d = tmp_path / "legacy"
    shutil.copytree(v2_dir, d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (model_dir / f).is_file():
            shutil.copy(model_dir / f, d / f)
    conf = json.loads((d / "config.json").read_text())
    conf = {k: conf[k] for k in ("base_model_name_or_path", "medusa_num_heads", "medusa_num_layers", "version")}
    (d / "config.json").write_text(json.dumps(conf | {"transformers_version": "4.34.0"}))
    rep = inspect_heads(d)
    assert (rep.layout, rep.shared_lm_head, rep.heads, rep.problems) == ("fasterdecoding", True, K, [])
    assert torch.equal(tensors_of(d).res_weight, tensors_of(v2_dir).res_weight)


# ----------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def engine_parts(model_dir, held_out_prompts):
    model = load_hf_model(model_dir, dtype=torch.float32)
    tok = Tokenizer(model_dir)
    prompts = [tok.encode(p["prompt"])[-40:] for p in held_out_prompts[3:5]]
    return model, tok, prompts


def greedy(model, tok, heads, prompts):
    engine = MedusaEngine(model, heads, ChoiceTree.parse("small"), tok, max_seq_len=128)
    gcfg = GenerationConfig(max_new_tokens=10, ignore_eos=True)
    return [(r.tokens, r.steps, r.accepted_per_step) for r in (engine.generate_ids(p, gcfg) for p in prompts)]


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_native_engine_gives_identical_greedy_output_from_each_layout(
    variant, sources, exported, engine_parts, one_thread
):
    model, tok, prompts = engine_parts
    reference = load_heads(sources[variant], H, V)
    expected = greedy(model, tok, reference, prompts)
    plain = MedusaEngine(model, None, ChoiceTree.parse("small"), tok, max_seq_len=128)
    assert [t for t, _, _ in expected] == [
        plain.generate_ids(p, GenerationConfig(max_new_tokens=10, ignore_eos=True, use_medusa=False)).tokens
        for p in prompts
    ]  # Medusa greedy == plain greedy decoding
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_logits = reference(x, model.lm_head.weight)
    for target in TARGETS:
        heads = load_heads(exported[variant, target], H, V)  # what load_engine and the converters call
        with torch.no_grad():
            # bit-equal tensors; expanded v2 heads compute lm_head per head (bmm), hence allclose
            assert torch.allclose(heads(x, model.lm_head.weight), expected_logits, atol=1e-5), target
        assert greedy(model, tok, heads, prompts) == expected, target  # same tokens, steps and acceptance


def test_load_engine_runs_an_axolotl_full_model_as_both_model_and_heads(exported, engine_parts, one_thread):
    _, _, prompts = engine_parts
    d = exported["v1", "axolotl"]
    engine = load_engine(d, d, tree="small", device="cpu", max_seq_len=256)
    assert engine.heads.config.num_heads == K and engine.heads.proj_weight is not None
    assert engine.generate_ids(prompts[0], GenerationConfig(max_new_tokens=8, ignore_eos=True)).steps > 0


# ----------------------------------------------------------------------------------------- CLI


def test_cli_targets_are_the_export_targets():
    assert TARGET_NAMES == tuple(TARGETS)


@pytest.mark.parametrize(
    "variant, target, layout, lm_head, dtype",
    [
        ("v1", "vllm", "vllm (model.safetensors)", "per-head projections (v1)", "float32"),
        ("v2", "fasterdecoding", "fasterdecoding (medusa_lm_head.pt)", "shared base lm_head (version 2)", "bfloat16"),
    ],
)
def test_heads_inspect_prints_layout_sizes_and_version(
    variant, target, layout, lm_head, dtype, exported, model_dir, capsys
):
    code, out, _ = run_cli(["heads", "inspect", str(exported[variant, target]), "--base-model", str(model_dir)], capsys)
    assert code == 0
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert lines["layout"].strip() == layout and lines["lm_head"].strip() == lm_head
    assert (lines["heads"].strip(), lines["layers"].strip()) == ("4", "1 ResBlock(s) per head")
    assert (lines["hidden"].strip(), lines["vocab"].strip(), lines["dtype"].strip()) == ("512", "8192", dtype)
    assert lines["problems"].strip() == "none" and target in lines["loads in"]


def test_heads_export_cli_writes_atomically_and_refuses_to_clobber(heads_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, _ = run_cli(
        ["heads", "export", "--from", str(heads_dir), "--to", "trtllm-medusa-dir", "--out", str(out)], capsys
    )
    assert code == 0 and "--num_medusa_heads 4 --num_medusa_layers 1" in stdout
    code, _, err = run_cli(["heads", "export", "--from", str(heads_dir), "--to", "vllm", "--out", str(out)], capsys)
    assert code == 2 and "not empty; pass --overwrite" in err
    assert json.loads((out / "config.json").read_text())["num_medusa_heads"] == 4  # untouched
    code, _, _ = run_cli(
        ["heads", "export", "--from", str(heads_dir), "--to", "vllm", "--out", str(out), "--overwrite"], capsys
    )
    assert code == 0 and detect(out).layout == "vllm" and not list(tmp_path.glob(".out.tmp-*"))


def test_inspect_reports_problems_and_exits_1(heads_dir, tmp_path, capsys):
    d = tmp_path / "h"
    d.mkdir()
    conf = json.loads((heads_dir / "config.json").read_text()) | {"medusa_num_heads": 3}
    (d / "config.json").write_text(json.dumps(conf))
    (d / "medusa_lm_head.safetensors").symlink_to(heads_dir / "medusa_lm_head.safetensors")
    rep = inspect_heads(d)
    assert rep.layout == "fasterdecoding" and rep.heads == 4 and rep.problems
    code, out, _ = run_cli(["heads", "inspect", str(d)], capsys)
    assert code == 1 and "holds 4 Medusa heads (0..3) but config.json says medusa_num_heads=3" in out

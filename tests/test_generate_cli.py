"""`medusa-forge generate`: output formats, and one clear line + exit 2 for every bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import make_heads, run_cli
from safetensors.torch import load_file, save_file


def test_generate_json_reports_steps_and_acceptance(model_dir, heads_dir, capsys):
    code, out, _ = run_cli(
        [
            "generate",
            "--model",
            str(model_dir),
            "--medusa",
            str(heads_dir),
            "--medusa-choices",
            "small",
            "--prompt",
            "import os\n",
            "--max-new-tokens",
            "12",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    obj = json.loads(out.strip().splitlines()[-1])
    assert set(obj) >= {"text", "tokens", "steps", "accepted_per_step", "tokens_per_s"}
    assert len(obj["tokens"]) == 12 and sum(obj["accepted_per_step"]) + 1 >= 12


def test_generate_streams_text_without_medusa(model_dir, capsys):
    code, out, _ = run_cli(
        ["generate", "--model", str(model_dir), "--prompt", "def main(", "--max-new-tokens", "8"], capsys
    )
    assert code == 0 and out.strip()


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bad_inputs")


@pytest.fixture(scope="module")
def corrupt_model(model_dir, bad_dir):
    bad = bad_dir / "corrupt"
    shutil.copytree(model_dir, bad)
    blob = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(blob[: len(blob) // 3])
    return bad


@pytest.fixture(scope="module")
def wrong_vocab_heads(model_dir, bad_dir):
    """Heads whose projections have 100 rows fewer than the base vocab."""
    d = make_heads(model_dir, bad_dir / "heads_v", num_heads=2)
    sd = load_file(str(d / "medusa_lm_head.safetensors"))
    sd = {k: (v[:-100].contiguous() if k.endswith(".1.weight") else v) for k, v in sd.items()}
    save_file(sd, str(d / "medusa_lm_head.safetensors"))
    return d


@pytest.fixture(scope="module")
def two_heads(model_dir, bad_dir):
    return make_heads(model_dir, bad_dir / "two", num_heads=2)


@pytest.fixture(scope="module")
def wrong_hidden_heads(model_dir, bad_dir):
    d = make_heads(model_dir, bad_dir / "heads_h", num_heads=2)
    sd = load_file(str(d / "medusa_lm_head.safetensors"))
    sd = {k: v[..., :256].contiguous() for k, v in sd.items()}
    save_file(sd, str(d / "medusa_lm_head.safetensors"))
    return d


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_model", "model directory not found"),
        ("corrupt_weights", "not a readable safetensors file"),
        ("heads_vocab", "heads do not match the base"),
        ("heads_hidden", "heads do not match the base"),
        ("tree_too_deep", "has depth 4 but the model has only 2 Medusa heads"),
        ("empty_prompt", "empty prompt"),
        ("too_many_tokens", "exceeds the KV cache of 256 tokens"),
        ("no_heads_dir", "Medusa heads directory not found"),
    ],
)
def test_bad_input_gets_one_line_and_exit_2(
    case, expected, model_dir, tmp_path, corrupt_model, wrong_vocab_heads, wrong_hidden_heads, two_heads, capsys
):
    base = ["generate", "--model", str(model_dir), "--prompt", "x = 1", "--max-new-tokens", "4"]
    args = {
        "missing_model": ["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"],
        "corrupt_weights": ["generate", "--model", str(corrupt_model), "--prompt", "x"],
        "heads_vocab": base + ["--medusa", str(wrong_vocab_heads), "--medusa-choices", "chain-2"],
        "heads_hidden": base + ["--medusa", str(wrong_hidden_heads), "--medusa-choices", "chain-2"],
        "tree_too_deep": base + ["--medusa", str(two_heads), "--medusa-choices", "mc_sim_7b_63"],
        "empty_prompt": ["generate", "--model", str(model_dir), "--prompt", ""],
        "too_many_tokens": [
            "generate",
            "--model",
            str(model_dir),
            "--prompt",
            "x",
            "--max-seq-len",
            "256",
            "--max-new-tokens",
            "300",
        ],
        "no_heads_dir": base + ["--medusa", str(tmp_path / "missing_heads")],
    }[case]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], err


@pytest.fixture(scope="module")
def engine_with_heads(model_dir, heads_dir, tmp_path_factory):
    from medusa_forge.build.native import NativeBuildConfig, build_native

    engine = tmp_path_factory.mktemp("generate_engine") / "engine"
    build_native(
        NativeBuildConfig(
            model_dir=model_dir, out_dir=engine, dtype="float32", medusa_dir=heads_dir, tree="small", verify_tokens=4
        )
    )
    return engine


REPEATING = "zeros = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, "


def _generate_json(engine, extra, capsys) -> dict:
    code, out, err = run_cli(
        [
            "generate",
            "--model",
            str(engine),
            "--device",
            "cpu",
            "--prompt",
            REPEATING,
            "--max-new-tokens",
            "24",
            "--json",
            *extra,
        ],
        capsys,
    )
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_generate_on_an_engine_dir_uses_its_heads_unless_no_medusa(engine_with_heads, capsys):
    medusa = _generate_json(engine_with_heads, [], capsys)
    plain = _generate_json(engine_with_heads, ["--no-medusa"], capsys)
    assert max(medusa["accepted_per_step"]) > 1  # a step accepted draft tokens: the engine's own heads ran
    assert set(plain["accepted_per_step"]) == {1} and plain["steps"] == len(plain["tokens"]) - 1
    assert medusa["tokens"] == plain["tokens"]  # greedy Medusa is exact

"""`bench engine` on CPU: base and Medusa greedy decoding side by side per topic, printed and saved
(JSON + Markdown), with output identity on every prompt and the speedup from the measured rates."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli


def test_bench_engine_reports_every_topic_with_identical_outputs(model_dir, heads_dir, prompts_path, tmp_path, capsys):
    out = tmp_path / "engine.json"
    code, text, err = run_cli(
        [
            "bench",
            "engine",
            "--model",
            model_dir,
            "--medusa",
            heads_dir,
            "--medusa-choices",
            "small",
            "--prompts",
            prompts_path,
            "--per-topic",
            1,
            "--max-new-tokens",
            8,
            "--max-prompt-tokens",
            64,
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    result = json.loads(out.read_text())
    topics = {json.loads(line)["topic"] for line in prompts_path.read_text().splitlines() if line.strip()}
    assert set(result["per_topic"]) == topics and result["tree"] == "small"
    for name, row in result["per_topic"].items():
        assert row["identical"] == "1/1" and row["mean_accepted"] >= 1.0
        assert row["speedup"] == pytest.approx(row["medusa_tokens_per_s"] / row["base_tokens_per_s"], rel=1e-2)
        assert name in text
    assert result["overall"]["identical"] == f"{len(topics)}/{len(topics)}" and not result["mismatches"]
    assert out.with_suffix(".md").read_text().startswith("# Engine benchmark")


def test_bench_engine_without_heads_is_one_line(model_dir, prompts_path, capsys):
    code, _, err = run_cli(
        ["bench", "engine", "--model", model_dir, "--prompts", prompts_path, "--per-topic", 1], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "give --medusa heads" in err, err

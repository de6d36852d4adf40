"""`medusa-forge bench serve` with several --clients counts: the sweep, at toy sizes on CPU.

pycoder-26m + the random heads fixture, fp32, tree `small`, one tritonserver serving plain decoding
serially (`--max-batch-size 1`) and Medusa batched (`--max-batch-size 2`); 1 and 2 clients x 1
request x 2 tokens. What must hold: zero errors, every answer the mode's sequential one, the modes
agree, and the JSON, Markdown and PNG are written with a row per (mode, clients).
"""

from __future__ import annotations

import json

from conftest import run_cli


def test_a_sweep_of_two_client_counts_writes_json_markdown_and_a_plot(model_dir, heads_dir, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    code, stdout, err = run_cli(["bench", "serve", "--engine", model_dir, "--medusa", heads_dir,
                                 "--medusa-choices", "small", "--dtype", "float32", "--clients", "1,2",
                                 "--modes", "plain-serial,medusa-batched", "--max-batch-size", 2,
                                 "--requests", 1, "--max-tokens", 2, "--num-prompts", 2, "--timeout", 120,
                                 "--time-limit", 120, "--torch-threads", 1, "--out", out], capsys)
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["kind"] == "serve_sweep" and doc["passed"], doc["checks"]
    assert doc["checks"] == {"zero_errors": True, "answers_identical_to_sequential": True, "modes_agree": True}
    assert [(r["mode"], r["clients"], r["max_batch_size"]) for r in doc["rows"]] == [
        ("plain-serial", 1, 1), ("medusa-batched", 1, 2), ("plain-serial", 2, 1), ("medusa-batched", 2, 2)]
    for r in doc["rows"]:
        assert r["completed"] == r["identical_to_sequential"] == r["requests"] == r["clients"]
        assert r["tokens_per_s"] > 0 and 0 < r["ttft_ms"]["p50"] <= r["latency_ms"]["p50"] + 1e-3
    assert set(doc["ratios"]["medusa_vs_plain_batched"]) == set()  # no plain-batched mode was served
    assert set(doc["ratios"]["vs_one_client"]) == {"plain-serial", "medusa-batched"}
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# Serve sweep: clients x modes (PASSED)") and "| medusa-batched | 2 |" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plain-serial x1" in stdout

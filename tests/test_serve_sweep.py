"""`medusa-forge bench serve` with several --clients counts: the sweep, at toy sizes on CPU.

pycoder-26m + the random heads fixture, fp32, tree `small`, one tritonserver serving plain decoding
serially (`--max-batch-size 1`) and Medusa batched (`--max-batch-size 2`); 1 and 2 clients x 1
request x 2 tokens. What must hold: zero errors, every answer the mode's sequential one, the modes
agree, and the JSON, Markdown and PNG are written with a row per (mode, clients).
"""

from __future__ import annotations

import json

from conftest import run_cli

from medusa_forge.bench.serve_sweep import markdown


def test_a_sweep_of_two_client_counts_writes_json_markdown_and_a_plot(model_dir, heads_dir, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    code, stdout, err = run_cli(
        [
            "bench",
            "serve",
            "--engine",
            model_dir,
            "--medusa",
            heads_dir,
            "--medusa-choices",
            "small",
            "--dtype",
            "float32",
            "--clients",
            "1,2",
            "--modes",
            "plain-serial,medusa-batched",
            "--max-batch-size",
            2,
            "--requests",
            1,
            "--max-tokens",
            2,
            "--num-prompts",
            2,
            "--timeout",
            120,
            "--time-limit",
            120,
            "--torch-threads",
            1,
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["kind"] == "serve_sweep" and doc["passed"], doc["checks"]
    assert doc["config"]["stream"] is True  # a sweep streams unless --unary
    assert doc["checks"] == {"zero_errors": True, "answers_identical_to_sequential": True, "modes_agree": True}
    assert [(r["mode"], r["clients"], r["max_batch_size"]) for r in doc["rows"]] == [
        ("plain-serial", 1, 1),
        ("medusa-batched", 1, 2),
        ("plain-serial", 2, 1),
        ("medusa-batched", 2, 2),
    ]
    for r in doc["rows"]:
        assert r["completed"] == r["identical_to_sequential"] == r["requests"] == r["clients"]
        assert r["tokens_per_s"] > 0 and 0 < r["ttft_ms"]["p50"] <= r["latency_ms"]["p50"] + 1e-3
    assert set(doc["ratios"]["medusa_vs_plain_batched"]) == set()  # no plain-batched mode was served
    assert set(doc["ratios"]["vs_one_client"]) == {"plain-serial", "medusa-batched"}
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# Serve sweep: clients x modes (PASSED)") and "| medusa-batched | 2 |" in md
    assert "gRPC, streaming" in md
    doc["config"]["stream"] = False  # as `--unary` records it
    assert "unary requests (TTFT = the whole answer)" in markdown(doc)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plain-serial x1" in stdout


def test_the_soak_compares_batched_with_serial_in_one_run(model_dir, heads_dir, prompts_path, tmp_path):
    """`--compare-serial`: the same soak against `medusa-serial`/`base-serial` after the batched
    models, on one server; both phases pass and each phase's TTFT p50 is reported."""
    import subprocess
    import sys

    from medusa_forge.build.native import NativeBuildConfig, build_native

    engine = tmp_path / "engine"
    build_native(
        NativeBuildConfig(model_dir, engine, dtype="float32", medusa_dir=heads_dir, tree="small", verify_tokens=4)
    )
    out = tmp_path / "soak"
    cmd = [
        sys.executable,
        "-m",
        "medusa_forge.bench.soak",
        "--engine",
        str(engine),
        "--max-batch-size",
        "2",
        "--compare-serial",
        "--prompts",
        str(prompts_path),
        "--num-prompts",
        "2",
        "--max-tokens",
        "2",
        "--clients",
        "4",
        "--duration",
        "2",
        "--warmup",
        "1",
        "--disconnect-one-in",
        "0",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((out / "soak.json").read_text())
    assert doc["passed"] and doc["checks"]["serial_phase_passed"]
    assert doc["models"] == ["medusa", "base"] and doc["serial"]["models"] == ["medusa-serial", "base-serial"]
    assert doc["ttft_ms"]["p50"] > 0 and doc["serial"]["ttft_ms"]["p50"] > 0
    assert doc["ttft_p50_serial_over_batched"] == round(doc["serial"]["ttft_ms"]["p50"] / doc["ttft_ms"]["p50"], 3)
    assert "serial phase (medusa-serial, base-serial" in (out / "soak.md").read_text()

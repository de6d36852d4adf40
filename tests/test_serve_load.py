"""`medusa-forge bench serve`: 32 concurrent gRPC clients x 10 requests against a real tritonserver.

The command builds pycoder-26m + the demo's trained heads into a native engine (float32, tree `small`;
trained heads get drafts accepted, so each answer takes fewer steps than with random heads), writes a
Triton repository for it, starts its own tritonserver on 127.0.0.1 and loads the
same engine in process as the baseline. What must hold: zero errors, every answer under load equal
to the sequential answer for its prompt (and that equal to the in-process answer), and a result
file with the latency percentiles and the gRPC overhead figures. The overhead goal (p50 <= 2 ms) is
reported, not asserted: on a shared 2-core CI machine it is a measurement, not a property.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from medusa_forge.demo import shipped_heads

CLIENTS, REQUESTS, TOKENS = 32, 10, 4


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("serve_load") / "work"


def test_32_clients_get_the_sequential_answers_with_zero_errors(model_dir, workdir, tmp_path, capsys):
    out = tmp_path / "serve_load.json"
    code, stdout, err = run_cli(
        [
            "bench",
            "serve",
            "--engine",
            model_dir,
            "--medusa",
            shipped_heads(),
            "--medusa-choices",
            "small",
            "--dtype",
            "float32",
            "--clients",
            CLIENTS,
            "--requests",
            REQUESTS,
            "--max-tokens",
            TOKENS,
            "--overhead-trials",
            10,
            "--warmup",
            2,
            "--timeout",
            120,
            "--time-limit",
            240,
            "--workdir",
            workdir,
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 0, err
    doc = json.loads(out.read_text())
    assert doc["kind"] == "serve_load" and doc["passed"]
    assert doc["checks"] == {
        "zero_errors": True,
        "answers_identical_to_sequential": True,
        "sequential_equals_in_process": True,
    }
    load = doc["load"]
    assert (load["clients"], load["requests_per_client"], load["requests"]) == (CLIENTS, REQUESTS, CLIENTS * REQUESTS)
    assert load["completed"] == load["identical_to_sequential"] == CLIENTS * REQUESTS
    assert load["errors"] == 0 and load["mismatches"] == 0 and load["error_samples"] == []
    assert load["server"]["requests"] == CLIENTS * REQUESTS and load["server"]["failed"] == 0  # Triton's own count
    lat = load["latency_ms"]
    assert lat["count"] == CLIENTS * REQUESTS and 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert load["requests_per_s"] > 0 and load["tokens_per_s"] == pytest.approx(
        load["requests_per_s"] * TOKENS, rel=1e-2
    )
    assert doc["sequential"]["tokens_per_answer"] == [TOKENS] * doc["sequential"]["prompts"]  # EOS ignored

    o = doc["overhead"]
    assert o["tokens"] == TOKENS and o["trials"] == 10 and o["goal_p50_ms"] == 2.0
    assert o["in_process_ms"]["count"] == 10 and o["in_process_ms"]["p50"] > 0
    for side in ("per_request_stream", "kept_stream"):
        v = o[side]
        assert v["triton_ms"]["count"] == 10
        assert v["overhead_p50_ms"] == pytest.approx(v["triton_ms"]["p50"] - o["in_process_ms"]["p50"], abs=2e-3)
        assert v["meets_goal"] == (v["overhead_p50_ms"] <= 2.0)
        # paired per request: the caller's wall time minus Triton's own time for that request
        assert v["outside_triton_ms"]["count"] == 10 and v["outside_triton_ms"]["p50"] < v["triton_ms"]["p50"]
    assert o["overhead_p50_ms"] == o["kept_stream"]["overhead_p50_ms"] and isinstance(o["meets_goal"], bool)

    cfg = doc["config"]
    assert cfg["engine_built"] and cfg["use_medusa"] and cfg["tree_nodes"] == 7 and cfg["engine_dtype"] == "float32"
    assert doc["machine"]["usable_cores"] >= 1 and doc["server"]["grpc_url"].startswith("127.0.0.1:")
    assert doc["meta"]["commit"]
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# Serve load benchmark (PASSED)") and "gRPC overhead p50:" in md
    assert "time outside Triton per request" in md
    assert "320 completed, 0 errors, 320/320 identical" in stdout
    assert (workdir / "engine" / "medusa_forge.json").is_file()  # --workdir keeps the built engine


def test_requests_past_the_time_limit_are_errors_and_the_run_fails(model_dir, workdir, tmp_path, capsys):
    """A load phase that cannot finish is reported as failed (exit 1), with the reason, not as a pass."""
    engine = workdir / "engine"
    if not engine.is_dir():  # run alone: build what the first test's command builds
        from medusa_forge.build.native import NativeBuildConfig, build_native

        build_native(
            NativeBuildConfig(
                model_dir, engine, dtype="float32", medusa_dir=shipped_heads(), tree="small", verify_tokens=4
            )
        )
    out = tmp_path / "serve_load.json"
    code, _, err = run_cli(
        [
            "bench",
            "serve",
            "--engine",
            engine,
            "--clients",
            4,
            "--requests",
            2,
            "--max-tokens",
            2,
            "--overhead-trials",
            1,
            "--warmup",
            0,
            "--time-limit",
            1e-6,
            "--out",
            out,
        ],
        capsys,
    )
    assert code == 1
    doc = json.loads(out.read_text())
    assert not doc["passed"] and doc["checks"]["zero_errors"] is False
    assert doc["load"]["errors"] == 8 and doc["load"]["completed"] == 0
    assert doc["load"]["error_samples"] == ["not sent: the load phase passed its time limit of 1e-06 s"]
    assert "bench serve FAILED: zero_errors" in err
    assert out.with_suffix(".md").read_text().startswith("# Serve load benchmark (FAILED)")

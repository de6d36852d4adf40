"""The soak (medusa_forge/bench/soak.py, rss.py), short: 16 streaming clients for 8 s against the session's
tritonserver (native engine, `medusa` and `base`), 1 in 5 walking away mid-stream.

The full run (64 clients, 120 s, its own server) is in bench/results/*-cpu-soak/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from medusa_forge.bench.rss import RssProbe, _proc_children, rss_summary


def test_short_soak_has_no_errors_sequential_answers_and_bounded_memory(native_triton, prompts_path, tmp_path):
    out = tmp_path / "soak"
    cmd = [
        sys.executable,
        "-m",
        "medusa_forge.bench.soak",
        "--url",
        native_triton.grpc_url,
        "--server-pid",
        str(native_triton.server.proc.pid),
        "--models",
        f"{native_triton.medusa_model},{native_triton.base_model}",
        "--prompts",
        str(prompts_path),
        "--num-prompts",
        "6",
        "--max-tokens",
        "8",
        "--clients",
        "16",
        "--duration",
        "8",
        "--warmup",
        "3",
        "--rss-bound-mb",
        "64",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((out / "soak.json").read_text())
    assert doc["passed"] and all(doc["checks"].values()), doc["checks"]
    r = doc["requests"]
    assert r["errors"] == 0 and r["mismatches"] == 0
    assert r["completed_after_warmup"] > 0 and r["abandoned"] > 0  # load and walk-aways both happened
    assert set(r["per_model"]) == {"medusa", "base"} and all(m["completed"] > 0 for m in r["per_model"].values())
    rss = doc["rss"]
    assert rss["processes"] >= 3  # tritonserver and a stub per model
    assert rss["total"]["growth_mb"] <= 64 and rss["server"]["growth_mb"] <= 64
    assert rss["total"]["baseline_mb"] > rss["server"]["baseline_mb"] > 0
    assert "checks: zero_errors ok" in (out / "soak.md").read_text()


def test_memory_probe_sees_a_process_and_its_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while child.pid not in _proc_children(os.getpid()) or RssProbe(child.pid).sample()[0] < 64:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        own, total, n = RssProbe(os.getpid()).sample()
        assert n >= 2 and total >= own + 64  # the child's 64 MiB buffer counts in the total
    finally:
        child.kill()
        child.wait()


def test_growth_is_measured_from_the_end_of_the_warmup_to_the_peak():
    samples = [(0.0, 10.0, 100.0, 2), (1.0, 30.0, 300.0, 2), (2.0, 31.0, 350.0, 2), (3.0, 30.0, 320.0, 2)]
    rss = rss_summary(samples, warmup_s=1.0, bound_mb=20.0, source="test")
    assert rss["server"]["baseline_mb"] == 30.0 and rss["server"]["growth_mb"] == 1.0
    assert rss["total"]["growth_mb"] == 50.0 and rss["bounded"] is False  # the start-up climb is not counted

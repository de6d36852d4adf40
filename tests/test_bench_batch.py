"""`bench batch`: the serve sweep in process, against the engine's schedulers directly."""

import json

import pytest

from medusa_forge.bench.batch_sweep import BatchSweepConfig, run_batch_sweep
from medusa_forge.engine.load import load_engine
from medusa_forge.errors import ForgeError
from tests.conftest import run_cli

MODES = ["plain-serial", "plain-batched", "medusa-serial", "medusa-batched"]


@pytest.fixture(scope="module")
def engine(model_dir, heads_dir, one_thread):
    return load_engine(model_dir, heads_dir, tree="small", device="cpu", max_seq_len=128)


@pytest.fixture(scope="module")
def prompts(engine, held_out_prompts):
    return [engine.tokenizer.encode(p["prompt"])[-24:] for p in held_out_prompts[:3]]


def test_every_mode_and_client_count_gets_a_row_and_every_answer_is_the_sequential_one(engine, prompts):
    cfg = BatchSweepConfig([1, 3], list(MODES), requests=2, max_tokens=5, max_batch_size=3)
    doc = run_batch_sweep(engine, prompts, cfg, progress=lambda _m: None)
    assert doc["passed"], doc["checks"]
    assert [(r["mode"], r["clients"]) for r in doc["rows"]] == [(m, n) for n in (1, 3) for m in MODES]
    for r in doc["rows"]:
        assert r["completed"] == r["requests"] == 2 * r["clients"] and r["identical_to_sequential"] == r["completed"]
        assert r["tokens_per_s"] > 0 and 0 < r["ttft_ms"]["p50"] <= r["latency_ms"]["p50"]
    assert set(doc["ratios"]["batched_vs_serial"]) == {"plain", "medusa"}


def test_an_engine_without_heads_sweeps_plain_decoding_only(model_dir, prompts, one_thread):
    plain = load_engine(model_dir, None, device="cpu", max_seq_len=128)
    doc = run_batch_sweep(plain, prompts, BatchSweepConfig([2], list(MODES), requests=1, max_tokens=3), lambda _m: None)
    assert {r["mode"] for r in doc["rows"]} == {"plain-serial", "plain-batched"} and doc["passed"]


@pytest.mark.parametrize("clients", [[], [0, 2]])
def test_a_client_count_below_one_is_refused(engine, prompts, clients):
    with pytest.raises(ForgeError, match="--clients"):
        run_batch_sweep(engine, prompts, BatchSweepConfig(clients, ["plain-serial"]), lambda _m: None)


def test_the_cli_writes_json_markdown_and_a_plot(model_dir, heads_dir, prompts_path, tmp_path, capsys, one_thread):
    out = tmp_path / "sweep.json"
    args = [
        "bench",
        "batch",
        "--engine",
        str(model_dir),
        "--medusa",
        str(heads_dir),
        "--medusa-choices",
        "small",
        "--device",
        "cpu",
        "--max-seq-len",
        "128",
        "--prompts",
        str(prompts_path),
        "--num-prompts",
        "2",
        "--max-prompt-tokens",
        "24",
        "--clients",
        "1,2",
        "--modes",
        "plain-batched,medusa-batched",
        "--requests",
        "1",
        "--max-tokens",
        "3",
        "--out",
        str(out),
    ]
    code, stdout, stderr = run_cli(args, capsys)
    assert code == 0, stderr
    doc = json.loads(out.read_text())
    assert doc["kind"] == "batch_sweep" and len(doc["rows"]) == 4
    assert "in process" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0

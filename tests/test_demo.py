"""The demo's pipeline at toy sizes (issue 23): shipped heads and questions, a real tritonserver,
the candidate promoted, a degraded one rejected with the registry unchanged, the summary complete,
and the server stopped at the end, also when a stage fails."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from medusa_forge.demo import DemoConfig, run_demo, shipped_heads, shipped_mmlu
from medusa_forge.demo.pipeline import DemoRun, serve_and_evaluate
from medusa_forge.demo.summary import passed, render
from medusa_forge.errors import ForgeError


def toy_config(model_dir, prompts_path, out: Path, **kw) -> DemoConfig:
    sizes = {
        "shots": 1,
        "mmlu_limit": 1,
        "per_topic": 1,
        "max_tokens": 8,
        "warmup": 0,
        "min_speedup": 0.0,
        "max_prompt_chars": 300,
        "query_tokens": 8,
        "max_seq_len": 256,
    }
    return DemoConfig(model=model_dir, prompts=prompts_path, out=out, echo=lambda _: None, **(sizes | kw))


@pytest.fixture(scope="module")
def demo_run(model_dir, prompts_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    return out, run_demo(toy_config(model_dir, prompts_path, out))


def _listening(grpc_url: str) -> bool:
    host, port = grpc_url.rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def test_the_candidate_is_promoted_and_the_degraded_one_rejected_with_the_registry_unchanged(demo_run):
    out, summary = demo_run
    assert passed(summary)
    promo, degraded = summary["promotion"], summary["degraded"]
    assert promo["promoted"] and promo["version"] == "v0001" and not promo["failed_gates"]
    assert Path(promo["current"]) == (out / "registry" / "versions" / "v0001").resolve()
    assert degraded["rejected"] and degraded["registry_unchanged"] and "identical" in degraded["failed_gates"]
    history = [json.loads(line) for line in (out / "registry" / "history.jsonl").read_text().splitlines()]
    assert [h["action"] for h in history] == ["promote", "reject"]
    assert os.readlink(out / "registry" / "current") == "versions/v0001"
    assert sorted(p.name for p in (out / "registry" / "versions").iterdir()) == ["v0001"]


def test_the_summary_has_every_figure_the_table_shows(demo_run, held_out_prompts):
    out, summary = demo_run
    assert summary["tokens_per_step"] >= 1.0
    per_topic = summary["speed"]["per_topic"]
    assert sorted(per_topic) == sorted({p["topic"] for p in held_out_prompts})
    assert all(v["speedup"] > 0 and v["tokens_per_step"] >= 1.0 for v in per_topic.values())
    assert summary["outputs_identical"] == {"identical": 6, "prompts": 6, "all": True}
    mmlu = summary["mmlu"]
    assert mmlu["delta_points"] == 0 and mmlu["all_identical"] and mmlu["same_answers"] == mmlu["questions"] == 4
    assert summary["query"]["tokens"] == 8 and summary["query"]["responses"] >= 2  # streamed, step by step
    assert Path(summary["report"]).is_file() and len(summary["plots"]) == 3
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["engine"]["dtype"] == "float32" and summary["engine"]["heads"] == str(shipped_heads())


def test_the_table_names_what_a_user_came_for(demo_run):
    from rich.console import Console

    console = Console(record=True, width=160)
    render(demo_run[1], console)
    text = console.export_text()
    for row in (
        "tokens/step (Medusa)",
        "speedup, all topics",
        "same answer 4/4",
        "greedy outputs identical",
        "promoted v0001",
        "rejected (identical",
        "registry unchanged",
        "report.md (+ 3 PNG)",
        "sympy",
    ):
        assert row in text, row


def test_the_server_is_stopped_after_the_demo(demo_run):
    out, summary = demo_run
    assert "Started GRPCInferenceService" in (out / "tritonserver.log").read_text()
    assert not _listening(summary["server"]["grpc"])


def test_the_server_is_stopped_when_a_stage_fails(demo_run, model_dir, prompts_path, tmp_path):
    """An MMLU directory that is not MMLU fails after the server started; the server goes with it."""
    out, _ = demo_run
    cfg = toy_config(model_dir, prompts_path, out, mmlu=tmp_path)
    run = DemoRun(cfg, shipped_heads(), None, tmp_path)
    with pytest.raises(ForgeError, match="neither the original MMLU layout"):
        serve_and_evaluate(run)
    assert "grpc" in run.results["server"] and not _listening(run.results["server"]["grpc"])


def test_the_shipped_assets_are_small_and_complete():
    heads = shipped_heads()
    assert sum(p.stat().st_size for p in heads.iterdir()) <= 10 * 2**20
    config = json.loads((heads / "config.json").read_text())
    assert config["medusa_num_heads"] >= 3 and (heads / "tree.json").is_file()
    report = json.loads((heads / "train_report.json").read_text())
    tree = json.loads((heads / "tree.json").read_text())
    assert report["config"]["shared_lm_head"] and report["config"]["eval_tree"].endswith("tree.json")
    # the run judged the heads on the shipped tree (plus its root) over every held-out prompt
    assert report["acceptance"]["tree_nodes"] == len(tree) + 1 and report["acceptance"]["prompts"] == 158
    assert report["acceptance"]["mean_accepted"] >= 2.0
    assert {p.name.rsplit("_", 1)[0] for p in (shipped_mmlu() / "test").glob("*.csv")} == {
        p.name.rsplit("_", 1)[0] for p in (shipped_mmlu() / "dev").glob("*.csv")
    }

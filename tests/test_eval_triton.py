"""eval mmlu / speed / report and promote end to end through a real tritonserver (issue 8, point 1).

The session's ``native_triton`` server hosts one native engine (pycoder-26m, random heads, tree
`small`) twice: ``medusa`` (Medusa decoding) and ``base`` (plain decoding of the same weights). Every
measurement below goes over gRPC, as on the GPU box; only the CLI is called, as a user would.

What must hold on CPU with random heads (no speed goal, so the speed gate is 0 where a promotion must
pass): greedy Medusa gives the base's answer on every MMLU question and the base's output on every
prompt of every topic; the good candidate is promoted; a degraded one is rejected with exit status 1
and the registry left as it was. The degraded candidate is made the way a real regression would
show up, through the server: the Medusa model decodes with typical acceptance at a high temperature
(``eval speed --medusa-temperature``), which accepts drafts greedy decoding would not, so its outputs
differ from the base's.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import FIXTURE_MMLU, run_cli

from medusa_forge.cli import main
from medusa_forge.eval.promote import Registry

NEW_TOKENS = 4


def ok(args: list, capsys) -> str:
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def one_per_topic(tmp_path_factory, prompts_path):
    lines = [ln for ln in prompts_path.read_text().splitlines() if ln.strip()]
    first: dict[str, str] = {}
    for ln in lines:
        first.setdefault(json.loads(ln)["topic"], ln)
    path = tmp_path_factory.mktemp("eval_triton_prompts") / "one_per_topic.jsonl"
    path.write_text("".join(v + "\n" for v in first.values()))
    return path, sorted(first)


@pytest.fixture(scope="module")
def results(native_triton, one_per_topic, tmp_path_factory, capsys_module):
    """MMLU of both models (1 question per subject, 2-shot), speed on one prompt per topic, the
    candidate's and the baseline's reports, and a degraded candidate's speed run and report."""
    work = tmp_path_factory.mktemp("eval_triton")
    url = native_triton.grpc_url
    prompts, _ = one_per_topic
    for model in ("base", "medusa"):
        capsys_module(
            [
                "eval",
                "mmlu",
                "--url",
                url,
                "--model",
                model,
                "--data",
                FIXTURE_MMLU,
                "--limit",
                "1",
                "--shots",
                "2",
                "--out",
                work / f"mmlu_{model}.json",
                "--no-progress",
            ]
        )
    speed = [
        "eval",
        "speed",
        "--url",
        url,
        "--base-model",
        "base",
        "--medusa-model",
        "medusa",
        "--prompts",
        prompts,
        "--max-tokens",
        NEW_TOKENS,
        "--trials",
        "1",
        "--warmup",
        "1",
        "--max-prompt-chars",
        "300",
        "--no-progress",
    ]
    capsys_module(speed + ["--out", work / "speed.json"])
    capsys_module(speed + ["--medusa-temperature", "5", "--out", work / "speed_degraded.json"])
    engine = native_triton.engine_dir
    report = [
        "eval",
        "report",
        "--mmlu",
        work / "mmlu_medusa.json",
        "--baseline-mmlu",
        work / "mmlu_base.json",
        "--engine",
        engine,
    ]
    capsys_module(report + ["--speed", work / "speed.json", "--out", work / "report"])
    capsys_module(report + ["--speed", work / "speed_degraded.json", "--out", work / "report_degraded"])
    capsys_module(["eval", "report", "--mmlu", work / "mmlu_base.json", "--out", work / "baseline_report"])
    return work


@pytest.fixture(scope="module")
def capsys_module():
    """main() for module-scoped setup: a failure is an assertion with the command line in it."""

    def call(args: list) -> None:
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            assert not e.code, f"{' '.join(map(str, args))} exited {e.code}"

    return call


def test_medusa_and_base_give_the_same_answer_on_every_mmlu_question(results, native_triton):
    base = json.loads((results / "mmlu_base.json").read_text())
    med = json.loads((results / "mmlu_medusa.json").read_text())
    for doc, model in ((base, "base"), (med, "medusa")):
        assert doc["complete"] and doc["backend"] == "triton" and doc["model"] == model
        assert doc["url"] == native_triton.grpc_url and doc["shots"] == 2
        assert doc["num_questions"] == 4 and len(doc["subjects"]) == 4  # 1 question x 4 subjects
    assert [q["id"] for q in base["questions"]] == [q["id"] for q in med["questions"]]
    assert [q["predicted"] for q in base["questions"]] == [q["predicted"] for q in med["questions"]]
    assert [q["reply"] for q in base["questions"]] == [q["reply"] for q in med["questions"]]


def test_triton_mmlu_answers_are_the_engines_in_process(results, native_triton, tmp_path, capsys):
    """The server adds nothing: the same engine in this process picks the same letters."""
    out = tmp_path / "mmlu_inprocess.json"
    ok(
        [
            "eval",
            "mmlu",
            "--in-process",
            "--model",
            native_triton.engine_dir,
            "--no-medusa",
            "--data",
            FIXTURE_MMLU,
            "--limit",
            "1",
            "--shots",
            "2",
            "--out",
            out,
            "--no-progress",
        ],
        capsys,
    )
    local = json.loads(out.read_text())
    served = json.loads((results / "mmlu_base.json").read_text())
    assert {q["id"]: q["predicted"] for q in local["questions"]} == {
        q["id"]: q["predicted"] for q in served["questions"]
    }


def test_speed_reports_every_topic_with_identical_outputs(results, one_per_topic, native_triton):
    _, topics = one_per_topic
    doc = json.loads((results / "speed.json").read_text())
    assert doc["complete"] and doc["backend"] == "triton" and doc["url"] == native_triton.grpc_url
    assert (doc["base_model"], doc["medusa_model"]) == ("base", "medusa")
    assert doc["config"]["stream"] is True  # both models are decoupled, so TTFT is a real first-token time
    assert sorted(doc["per_topic"]) == topics and len(topics) == 6
    assert len(doc["requests"]) == len(topics) * 2  # one prompt per topic x 1 trial x 2 models
    assert all(r["tokens"] == NEW_TOKENS for r in doc["requests"])  # end_id=-1: EOS ignored, equal lengths
    for topic, v in doc["per_topic"].items():
        assert v["prompts"] == v["identical"] == 1, topic
        assert v["base"]["mean_acceptance_length"] == 1.0  # from the server's accepted_per_step
        assert v["medusa"]["mean_acceptance_length"] >= 1.0
        assert v["medusa"]["acceptance_rate"] is not None  # tensorrtllm_backend-style draft counters came back
        for side in ("base", "medusa"):
            assert 0 < v[side]["ttft_ms"]["p50"] <= v[side]["latency_ms"]["p50"]
    assert doc["overall"]["all_identical"] and not doc["mismatches"]


def test_report_joins_mmlu_and_speed_for_the_served_engine(results, native_triton):
    rep = json.loads((results / "report" / "report.json").read_text())
    assert rep["complete"] and rep["speed"]["backend"] == "triton"
    assert rep["mmlu_comparison"]["all_answers_identical"] and rep["mmlu_comparison"]["micro_delta_points"] == 0
    assert rep["speed"]["all_identical"] and len(rep["speed"]["per_topic"]) == 6
    assert rep["engine"]["path"] == str(native_triton.engine_dir.resolve())
    for plot in rep["plots"]:
        assert (results / "report" / plot).read_bytes()[:4] == b"\x89PNG"
    assert "| **all** |" in (results / "report" / "report.md").read_text()


def _promote(results, native_triton, report: str, registry, *extra) -> list:
    return [
        "promote",
        "--candidate",
        native_triton.engine_dir,
        "--report",
        results / report,
        "--baseline",
        results / "baseline_report",
        "--to",
        registry,
        "--min-speedup",
        "0",
        *extra,
    ]


def test_the_good_candidate_is_promoted(results, native_triton, tmp_path, capsys):
    reg = tmp_path / "registry"
    out = ok(_promote(results, native_triton, "report", reg, "--require-identical"), capsys)
    assert "[pass] identical" in out and "[pass] mmlu" in out and "[pass] engine" in out and "promoted" in out
    assert os.readlink(reg / "current") == "versions/v0001"
    promo = json.loads((reg / "current" / "promotion.json").read_text())
    assert promo["action"] == "promote" and all(g["passed"] for g in promo["gates"])
    assert json.loads((reg / "current" / "eval" / "report.json").read_text())["speed"]["backend"] == "triton"


def test_a_degraded_candidate_is_rejected_and_the_registry_left_unchanged(results, native_triton, tmp_path, capsys):
    degraded = json.loads((results / "speed_degraded.json").read_text())
    assert degraded["mismatches"] and not degraded["overall"]["all_identical"]  # the degradation is real
    reg = tmp_path / "registry"
    ok(_promote(results, native_triton, "report", reg, "--require-identical"), capsys)  # v0001 is current
    before = (sorted(p.name for p in (reg / "versions").iterdir()), os.readlink(reg / "current"))
    code, out, err = run_cli(_promote(results, native_triton, "report_degraded", reg, "--require-identical"), capsys)
    assert code == 1, err
    assert (
        f"[FAIL] identical greedy outputs differ from the base in {len(degraded['mismatches'])} request pair(s)" in out
    )
    assert "[pass] mmlu" in out and f"rejected {native_triton.engine_dir}: registry unchanged" in err
    assert (sorted(p.name for p in (reg / "versions").iterdir()), os.readlink(reg / "current")) == before
    assert not (reg / "previous").exists()
    last = Registry(reg).read_history()[-1]
    assert last["action"] == "reject" and last["version"] is None and last["current_after"] == "v0001"


def test_a_model_the_server_does_not_serve_is_one_line_naming_what_it_serves(native_triton, tmp_path, capsys):
    """Issue 8, point 3: "model not ready" fails before the first request, with the models that are
    there, and writes no result (nor a partial cache: nothing was answered)."""
    out = tmp_path / "mmlu.json"
    code, _, err = run_cli(
        [
            "eval",
            "mmlu",
            "--url",
            native_triton.grpc_url,
            "--model",
            "medusa-v2",
            "--data",
            FIXTURE_MMLU,
            "--limit",
            "1",
            "--out",
            out,
            "--no-progress",
        ],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: model 'medusa-v2' is not ready on {native_triton.grpc_url} (models there: ")
    assert "base" in err and "medusa" in err and "check the model name" in err
    assert not out.exists() and not list(tmp_path.glob("*.partial.json"))

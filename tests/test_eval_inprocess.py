"""eval mmlu / speed / report and promote on a real native engine measured in process (no Triton).

The same commands the H100 run uses (`--in-process`), on pycoder-26m with random heads and the
`small` tree. Speed on CPU with random heads is no goal here, so the speed gate is set to 0 where a
promotion must pass; what must hold is exactness (identical answers and outputs) and the gates' and
registry's behaviour.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURE_MMLU, run_cli

from medusa_forge.cli import main
from medusa_forge.eval.promote import Gates, Registry, check_gates, load_baseline_mmlu, load_report, promote
from medusa_forge.eval.report import engine_fingerprint

PNG = b"\x89PNG\r\n\x1a\n"


def build_eval_engine(tmp_path_factory, model_dir, heads_dir) -> Path:
    """pycoder-26m + random heads, tree `small`, built once per test session (shared with the e2e test)."""
    from filelock import FileLock

    from medusa_forge.build.native import NativeBuildConfig, build_native

    engine = tmp_path_factory.getbasetemp() / "eval_engine"
    with FileLock(str(engine) + ".lock"):
        if not engine.is_dir():
            build_native(
                NativeBuildConfig(
                    model_dir,
                    engine,
                    dtype="bfloat16",
                    medusa_dir=heads_dir,
                    tree="small",
                    max_seq_len=1024,
                    device="cpu",
                    verify_tokens=4,
                )
            )
    return engine


@pytest.fixture(scope="module")
def work(tmp_path_factory, model_dir, heads_dir) -> Path:
    root = tmp_path_factory.mktemp("eval_inprocess")
    (root / "engine").symlink_to(build_eval_engine(tmp_path_factory, model_dir, heads_dir))
    return root


@pytest.fixture(scope="module")
def results(work, prompts_path) -> Path:
    """base and Medusa MMLU (1 question per subject, 2-shot), speed (1 prompt per topic), both reports."""
    eng = work / "engine"
    common = ["--in-process", "--dtype", "float32", "--no-progress"]
    for name, extra in (("base", ["--no-medusa"]), ("medusa", [])):
        main(
            [
                "eval",
                "mmlu",
                "--model",
                str(eng),
                "--data",
                str(FIXTURE_MMLU),
                "--limit",
                "1",
                "--shots",
                "2",
                "--out",
                str(work / f"mmlu_{name}.json"),
                *common,
                *extra,
            ]
        )
    two_topics = work / "prompts.jsonl"  # the e2e test covers every topic; two keep this one quick
    lines = prompts_path.read_text().splitlines()
    two_topics.write_text(
        "".join(next(ln for ln in lines if json.loads(ln)["topic"] == t) + "\n" for t in ("torch", "pandas"))
    )
    main(
        [
            "eval",
            "speed",
            "--base-model",
            str(eng),
            "--medusa-model",
            str(eng),
            "--prompts",
            str(two_topics),
            "--max-tokens",
            "6",
            "--trials",
            "2",
            "--warmup",
            "1",
            "--max-prompt-chars",
            "300",
            "--out",
            str(work / "speed.json"),
            *common,
        ]
    )
    main(
        [
            "eval",
            "report",
            "--mmlu",
            str(work / "mmlu_medusa.json"),
            "--baseline-mmlu",
            str(work / "mmlu_base.json"),
            "--speed",
            str(work / "speed.json"),
            "--engine",
            str(eng),
            "--out",
            str(work / "report"),
        ]
    )
    main(["eval", "report", "--mmlu", str(work / "mmlu_base.json"), "--out", str(work / "baseline_report")])
    return work


def test_medusa_gives_the_base_answer_on_every_mmlu_question(results):
    base = json.loads((results / "mmlu_base.json").read_text())
    med = json.loads((results / "mmlu_medusa.json").read_text())
    assert base["complete"] and med["complete"] and base["num_questions"] == med["num_questions"] == 4
    assert [q["predicted"] for q in base["questions"]] == [q["predicted"] for q in med["questions"]]
    assert med["model"].endswith("engine") and base["model"].endswith("(base decoding)")


def test_speed_measures_every_topic_side_by_side(results):
    doc = json.loads((results / "speed.json").read_text())
    assert doc["kind"] == "speed" and doc["complete"] and doc["backend"] == "in-process"
    assert sorted(doc["per_topic"]) == ["pandas", "torch"]
    assert len(doc["requests"]) == 2 * 2 * 2  # prompts x trials x models
    assert all(r["tokens"] == 6 for r in doc["requests"])  # EOS ignored: equal lengths for both models
    for t, v in doc["per_topic"].items():
        assert v["identical"] == v["prompts"] == 1, t  # greedy Medusa is exact
        assert v["base"]["mean_acceptance_length"] == 1.0
        assert v["medusa"]["mean_acceptance_length"] >= 1.0
        assert v["speedup"] == pytest.approx(v["medusa"]["tokens_per_s"] / v["base"]["tokens_per_s"], rel=1e-3)
        lat = v["medusa"]["latency_ms"]
        assert 0 < v["medusa"]["ttft_ms"]["p50"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
    assert doc["overall"]["all_identical"] and not doc["mismatches"]
    # the two models alternate which goes first, so neither always runs on the warmer machine
    assert {r["model"] for r in doc["requests"] if r["sent"] == 0} == {"base", "medusa"}


def test_report_has_markdown_json_and_plots(results):
    rep_dir = results / "report"
    rep = json.loads((rep_dir / "report.json").read_text())
    assert rep["kind"] == "report" and rep["complete"]
    assert rep["plots"] == ["tokens_per_s.png", "latency_cdf.png", "mmlu_delta.png"]
    for p in rep["plots"]:
        assert (rep_dir / p).read_bytes()[:8] == PNG
    assert rep["mmlu_comparison"]["all_answers_identical"] and rep["mmlu_comparison"]["micro_delta_points"] == 0
    assert rep["engine"]["manifest_sha256"] == engine_fingerprint(results / "engine")["manifest_sha256"]
    md = (rep_dir / "report.md").read_text()
    assert "| **micro average** |" in md and "| **all** |" in md and "![tokens_per_s.png](tokens_per_s.png)" in md
    assert not list(results.glob(".report.tmp-*"))


def test_report_refuses_partial_results(results, tmp_path, capsys):
    partial = tmp_path / "speed.json.partial.json"
    partial.write_text(json.dumps({"kind": "partial", "complete": False, "fingerprint": {}, "results": {"t0/p0": {}}}))
    code, _, err = run_cli(
        ["eval", "report", "--mmlu", results / "mmlu_medusa.json", "--speed", partial, "--out", tmp_path / "rep"],
        capsys,
    )
    assert code == 2 and "partial results (1 items), not a finished run" in err
    assert not (tmp_path / "rep").exists()


def test_prompts_file_without_prompt_field_is_a_clear_error(results, tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"topic": "torch", "text": "import torch"}) + "\n")
    code, _, err = run_cli(
        [
            "eval",
            "speed",
            "--in-process",
            "--base-model",
            results / "engine",
            "--medusa-model",
            results / "engine",
            "--prompts",
            bad,
        ],
        capsys,
    )
    assert code == 2 and err.strip() == f"error: {bad}:1: each line needs a non-empty string field 'prompt'"


# ---------------------------------------------------------------- promote
def _promote_args(results, registry, *extra):
    return [
        "promote",
        "--candidate",
        results / "engine",
        "--report",
        results / "report",
        "--baseline",
        results / "baseline_report",
        "--to",
        registry,
        *extra,
    ]


def test_promote_then_rollback(results, tmp_path, capsys):
    reg = tmp_path / "registry"
    code, out, _ = run_cli(_promote_args(results, reg, "--min-speedup", "0", "--require-identical"), capsys)
    assert code == 0 and "promoted" in out and "[pass] identical" in out
    assert os.readlink(reg / "current") == "versions/v0001"
    assert (reg / "current" / "medusa_forge.json").is_file() and (reg / "current" / "model" / "config.json").is_file()
    promo = json.loads((reg / "current" / "promotion.json").read_text())
    assert promo["action"] == "promote" and all(g["passed"] for g in promo["gates"])
    code, _, _ = run_cli(_promote_args(results, reg, "--min-speedup", "0"), capsys)
    assert code == 0 and os.readlink(reg / "current") == "versions/v0002"
    assert os.readlink(reg / "previous") == "versions/v0001"
    code, out, _ = run_cli(["promote", "--rollback", "--to", reg], capsys)
    assert code == 0 and os.readlink(reg / "current") == "versions/v0001"
    assert os.readlink(reg / "previous") == "versions/v0002"
    assert [h["action"] for h in Registry(reg).read_history()] == ["promote", "promote", "rollback"]


def test_failed_gate_exits_1_and_leaves_the_registry_unchanged(results, tmp_path, capsys):
    reg = tmp_path / "registry"
    assert run_cli(_promote_args(results, reg, "--min-speedup", "0"), capsys)[0] == 0
    before = sorted(p.name for p in (reg / "versions").iterdir())
    code, out, err = run_cli(_promote_args(results, reg, "--min-speedup", "100"), capsys)
    assert code == 1 and "[FAIL] speedup" in out and "registry unchanged" in err
    assert sorted(p.name for p in (reg / "versions").iterdir()) == before
    assert os.readlink(reg / "current") == "versions/v0001" and not (reg / "previous").exists()
    last = Registry(reg).read_history()[-1]
    assert last["action"] == "reject" and last["version"] is None
    assert any(not g["passed"] and "slowest topic" in g["detail"] for g in last["gates"])


def test_report_made_for_another_engine_fails_the_engine_gate(results, tmp_path, capsys):
    other = tmp_path / "other_engine"
    shutil.copytree(results / "engine", other)
    manifest = json.loads((other / "medusa_forge.json").read_text())
    manifest["max_seq_len"] = 512
    (other / "medusa_forge.json").write_text(json.dumps(manifest))
    code, out, _ = run_cli(
        [
            "promote",
            "--candidate",
            other,
            "--report",
            results / "report",
            "--baseline",
            results / "baseline_report",
            "--to",
            tmp_path / "reg",
            "--min-speedup",
            "0",
        ],
        capsys,
    )
    assert code == 1 and "[FAIL] engine    report was made for another engine" in out
    assert not (tmp_path / "reg" / "current").exists()


def test_mmlu_gate_measures_the_drop_in_points(results):
    report = load_report(results / "report")
    baseline = load_baseline_mmlu(results / "mmlu_base.json")  # an `eval mmlu` file works as baseline too
    fp = engine_fingerprint(results / "engine")
    # a candidate that got one of the 4 questions wrong that the baseline had right: -25 points
    worse = json.loads(json.dumps(report))
    answers = worse["mmlu"]["answers"]
    qid = next(iter(answers))
    answers[qid] = "A" if answers[qid] != "A" else "B"
    base_better = {**baseline, "micro_accuracy": report["mmlu"]["micro_accuracy"] + 0.25}
    gates = {g.name: g for g in check_gates(worse, base_better, Gates(0.5, 0.0, True), fp)}
    assert not gates["mmlu"].passed and "drop +25.00 points (max 0.5)" in gates["mmlu"].detail
    assert (
        not gates["identical"].passed
        and "MMLU answers differ from the baseline on 1 question" in gates["identical"].detail
    )
    assert gates["speedup"].passed and gates["engine"].passed
    ok = {g.name: g for g in check_gates(worse, base_better, Gates(30.0, 0.0, False), fp)}
    assert ok["mmlu"].passed and "identical" not in ok


def _promote_in_child(args):
    candidate, report, baseline, reg = args
    return promote(candidate, report, baseline, reg, Gates(0.5, 0.0, False)).version


def test_concurrent_promotions_are_serialised_by_the_lock(results, tmp_path):
    reg = tmp_path / "registry"
    job = (results / "engine", results / "report", results / "baseline_report", reg)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        versions = pool.map(_promote_in_child, [job, job])
    assert sorted(versions) == ["v0001", "v0002"]
    history = Registry(reg).read_history()
    assert [h["version"] for h in history] == ["v0001", "v0002"]  # whole lines, in lock order
    assert history[1]["current_before"] == "v0001"
    assert os.readlink(reg / "current") == "versions/v0002"
    assert not [p for p in reg.rglob(".*tmp*")]  # no half-written version or link left behind

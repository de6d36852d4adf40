"""MMLU prompts, answer letters, scores, and the resumable cache on a real engine run."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from conftest import FIXTURE_MMLU

from medusa_forge.errors import ForgeError
from medusa_forge.eval.cache import ResultCache, cache_path_for, read_complete
from medusa_forge.eval.mmlu import build_prompt, extract_letter, fit_prompt, make_items, score
from medusa_forge.eval.mmlu_data import load_split


def test_prompt_is_the_original_k_shot_format():
    dev = load_split(FIXTURE_MMLU, "dev", ["high_school_computer_science"])["high_school_computer_science"]
    q = load_split(FIXTURE_MMLU, "test", ["high_school_computer_science"])["high_school_computer_science"][2]
    prompt = build_prompt("high_school_computer_science", dev[:2], q)
    assert prompt == (
        "The following are multiple choice questions (with answers) about high school computer science.\n\n"
        "What is the value of 7 // 2 in Python 3?\nA. 3.5\nB. 4\nC. 3\nD. 2\nAnswer: C\n\n"
        "How many bits are in a byte?\nA. 8\nB. 4\nC. 16\nD. 2\nAnswer: A\n\n"
        "What does print(2 ** 3) output in Python?\nA. 6\nB. 9\nC. 5\nD. 8\nAnswer:"
    )


def test_five_shot_items_and_shot_trimming_to_a_token_budget():
    test, dev = load_split(FIXTURE_MMLU, "test"), load_split(FIXTURE_MMLU, "dev")
    items = make_items(test, dev, shots=5, limit=2)
    assert len(items) == 8 and [i.id for i in items[:2]] == ["college_computer_science/0", "college_computer_science/1"]
    assert all(i.prompt.count("\nAnswer: ") == 5 and i.prompt.endswith("\nAnswer:") and i.shots == 5 for i in items)
    words = lambda s: len(s.split())  # noqa: E731 - a stand-in tokenizer that counts words
    q = test["machine_learning"][0]
    full, k = fit_prompt("machine_learning", dev["machine_learning"], q, words, 10_000)
    assert k == 5
    trimmed, k = fit_prompt("machine_learning", dev["machine_learning"], q, words, words(full) - 1)
    assert k == 4 and words(trimmed) < words(full)
    _, k = fit_prompt("machine_learning", dev["machine_learning"], q, words, 1)
    assert k == 0  # like the original, never fewer than zero shots: the test question is always sent
    with pytest.raises(ForgeError, match="6-shot needs 6 dev examples, found 5"):
        make_items(test, dev, shots=6)


@pytest.mark.parametrize(
    "reply,letter",
    [
        (" B", "B"),
        ("C", "C"),
        (" D.", "D"),
        ("(A)", "A"),
        ("\nA\n", "A"),
        (" Answer", None),
        (" AB", None),
        (" E", None),
        ("", None),
        (" b", None),
    ],
)
def test_letter_extraction(reply, letter):
    assert extract_letter(reply) == letter


def test_macro_and_micro_accuracy_differ_on_unequal_subjects():
    recs = (
        [{"subject": "a", "correct": True, "predicted": "A"}] * 3
        + [{"subject": "a", "correct": False, "predicted": None}]
        + [{"subject": "b", "correct": False, "predicted": "C"}]
    )
    s = score(recs)
    assert s["subjects"]["a"] == {"correct": 3, "total": 4, "invalid": 1, "accuracy": 0.75}
    assert s["macro_accuracy"] == pytest.approx((0.75 + 0.0) / 2)
    assert s["micro_accuracy"] == pytest.approx(3 / 5)
    assert s["invalid_answers"] == 1 and s["num_questions"] == 5


def test_cache_survives_reopen_and_refuses_to_be_read_as_complete(tmp_path):
    out = tmp_path / "r.json"
    with ResultCache(cache_path_for(out), {"k": 1}, flush_every_s=3600) as c:
        c.put("x", {"v": 1})
    assert ResultCache(cache_path_for(out), {"k": 1}).results == {"x": {"v": 1}}
    other = ResultCache(cache_path_for(out), {"k": 2})
    assert other.stale and other.results == {}
    with pytest.raises(ForgeError, match="partial results \\(1 items\\), not a finished run"):
        read_complete(cache_path_for(out), "mmlu")


def _long_question_data(tmp_path):
    """Two fixture subjects; the second computer_security question is far longer than a small KV cache."""
    root = tmp_path / "mmlu"
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
        for s in ("computer_security", "machine_learning"):
            shutil.copy(FIXTURE_MMLU / split / f"{s}_{split}.csv", root / split)
    path = root / "test" / "computer_security_test.csv"
    rows = list(csv.reader(path.open(newline="")))
    rows[1][0] = "Explain in detail why " * 80 + rows[1][0]
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    return root


def test_failed_run_keeps_answers_in_a_cache_and_the_rerun_resumes(tmp_path, model_dir):
    from medusa_forge.engine.load import load_engine
    from medusa_forge.eval.backends import EngineBackend
    from medusa_forge.eval.runs import run_mmlu

    data, out = _long_question_data(tmp_path), tmp_path / "mmlu.json"
    small = EngineBackend(load_engine(model_dir, max_seq_len=256), False, "pycoder-26m")
    with pytest.raises(
        ForgeError,
        match=r"exceeds the KV cache.*1 of 4 answers kept in .*mmlu\.json\.partial\.json; "
        r"rerun the same command to resume",
    ):
        run_mmlu(small, data, "test", [], 0, 2, 1, out, progress=False)
    assert not out.exists()  # nothing reported as complete
    partial = json.loads(cache_path_for(out).read_text())
    assert partial["complete"] is False and list(partial["results"]) == ["computer_security/0"]

    big = EngineBackend(load_engine(model_dir, max_seq_len=1024), False, "pycoder-26m")
    doc = run_mmlu(big, data, "test", [], 0, 2, 2, out, progress=False)
    assert doc["complete"] and doc["resumed_items"] == 1 and doc["num_questions"] == 4
    assert [q["id"] for q in doc["questions"]] == [
        "computer_security/0",
        "computer_security/1",
        "machine_learning/0",
        "machine_learning/1",
    ]
    assert all(q["predicted"] in {"A", "B", "C", "D", None} for q in doc["questions"])
    assert read_complete(out, "mmlu")["micro_accuracy"] == doc["micro_accuracy"]
    assert not cache_path_for(out).exists()

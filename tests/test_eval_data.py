"""MMLU on disk: the shipped fixture, the original CSV layout, cais/mmlu parquet/JSONL, and bad rows."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURE_MMLU

from medusa_forge.errors import ForgeError
from medusa_forge.eval.mmlu_data import LETTERS, detect_layout, load_split

SUBJECTS = ["college_computer_science", "computer_security", "high_school_computer_science", "machine_learning"]


def test_fixture_is_original_layout_with_5_dev_and_7_test_questions_per_subject():
    assert detect_layout(FIXTURE_MMLU) == "csv"
    dev, test = load_split(FIXTURE_MMLU, "dev"), load_split(FIXTURE_MMLU, "test")
    assert list(dev) == list(test) == SUBJECTS
    assert all(len(q) == 5 for q in dev.values()) and all(len(q) == 7 for q in test.values())
    answers = [q.answer for qs in test.values() for q in qs]
    assert set(answers) == set(LETTERS)  # no letter bias a constant guesser could exploit
    q = test["high_school_computer_science"][0]
    assert q.question == 'What does len("hello") return in Python?' and q.choices[q.answer_index] == "5"
    assert q.source.endswith("high_school_computer_science_test.csv:1")


def test_subject_selection_and_unknown_subject():
    data = load_split(FIXTURE_MMLU, "test", ["machine_learning"])
    assert list(data) == ["machine_learning"]
    with pytest.raises(ForgeError, match="no test file for subject.*astronomy"):
        load_split(FIXTURE_MMLU, "test", ["astronomy"])


def _copy_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "mmlu"
    shutil.copytree(FIXTURE_MMLU, root)
    return root


def _rewrite_row(path: Path, index: int, row: list[str]) -> None:
    rows = list(csv.reader(path.open(newline="")))
    rows[index] = row
    with path.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def test_malformed_csv_row_names_file_and_line(tmp_path):
    root = _copy_fixture(tmp_path)
    bad = root / "test" / "computer_security_test.csv"
    _rewrite_row(bad, 2, ["What is a nonce?", "A number used once", "A hash", "B"])  # 4 columns
    with pytest.raises(ForgeError, match=r"computer_security_test\.csv:3: expected 6 columns"):
        load_split(root, "test")


def test_bad_answer_letter_names_file_and_line(tmp_path):
    root = _copy_fixture(tmp_path)
    bad = root / "dev" / "machine_learning_dev.csv"
    _rewrite_row(bad, 4, ["Q?", "a", "b", "c", "d", "E"])
    with pytest.raises(ForgeError, match=r"machine_learning_dev\.csv:5: answer must be one of A, B, C, D"):
        load_split(root, "dev")


def test_line_numbers_count_physical_lines_of_multiline_questions(tmp_path):
    root = tmp_path / "mmlu"
    (root / "test").mkdir(parents=True)
    path = root / "test" / "x_test.csv"
    path.write_text('"first\nquestion",a,b,c,d,A\n"second\n\nquestion",a,b,c,d\n')
    with pytest.raises(ForgeError, match=r"x_test\.csv:3: expected 6 columns"):
        load_split(root, "test")


def _as_hf(test: dict, dev: dict, root: Path, fmt: str, all_only: bool = False) -> None:
    """Write questions in cais/mmlu's layout: {subject}/{split}-00000-of-00001.{fmt} (or all/ only)."""
    for split, data in (("test", test), ("dev", dev)):
        groups = {"all": [q for qs in data.values() for q in qs]} if all_only else data
        for folder, qs in groups.items():
            rows = [
                {"question": q.question, "subject": q.subject, "choices": list(q.choices), "answer": q.answer_index}
                for q in qs
            ]
            d = root / folder
            d.mkdir(parents=True, exist_ok=True)
            if fmt == "jsonl":
                (d / f"{split}-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            else:
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.Table.from_pylist(rows), d / f"{split}-00000-of-00001.parquet")


@pytest.mark.parametrize("fmt,all_only", [("parquet", False), ("jsonl", False), ("parquet", True)])
def test_hf_layout_reads_the_same_questions(tmp_path, fmt, all_only):
    test, dev = load_split(FIXTURE_MMLU, "test"), load_split(FIXTURE_MMLU, "dev")
    _as_hf(test, dev, tmp_path, fmt, all_only)
    assert detect_layout(tmp_path) == "hf"
    for split, ref in (("test", test), ("dev", dev)):
        got = load_split(tmp_path, split)
        assert list(got) == list(ref)
        for s in ref:
            assert [(q.question, q.choices, q.answer) for q in got[s]] == [
                (q.question, q.choices, q.answer) for q in ref[s]
            ]
    assert list(load_split(tmp_path, "test", ["machine_learning"])) == ["machine_learning"]


def test_hf_jsonl_bad_record_names_file_and_line(tmp_path):
    d = tmp_path / "anatomy"
    d.mkdir()
    good = {"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 1}
    bad = {**good, "choices": ["a", "b", "c"]}
    (d / "test-00000-of-00001.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ForgeError, match=r"test-00000-of-00001\.jsonl:2: 'choices' must be a list of 4 strings"):
        load_split(tmp_path, "test")
    (d / "test-00000-of-00001.jsonl").write_text(json.dumps({**good, "answer": 7}) + "\n")
    with pytest.raises(ForgeError, match=r"jsonl:1: 'answer' must be an integer 0-3"):
        load_split(tmp_path, "test")


def test_not_an_mmlu_directory(tmp_path):
    with pytest.raises(ForgeError, match="MMLU data directory not found"):
        load_split(tmp_path / "missing", "test")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ForgeError, match="neither the original MMLU layout"):
        load_split(tmp_path, "test")

"""MMLU on disk, in its two standard layouts, read into one list of questions.

* The original release (hendrycks/test, ``data.tar``; e.g. ``data/dev/machine_learning_dev.csv`` at
  commit e005575bcfcdd39c11867a203f4f67d81db05689): folders ``dev/``, ``val/``, ``test/`` holding
  ``{subject}_{split}.csv``, no header, rows ``question,A,B,C,D,answer`` with the answer a letter.
* Hugging Face ``cais/mmlu`` (after its "Convert dataset to Parquet" commit 7894270a): one folder per
  subject (plus ``all/`` and ``auxiliary_train/``) holding ``{split}-00000-of-00001.parquet`` with the
  fields ``question``, ``subject``, ``choices`` (4 strings) and ``answer`` (class label 0-3). Its splits
  are ``dev``, ``validation``, ``test``. JSONL files with the same fields are read the same way.

A malformed row is a :class:`ForgeError` naming the file and line (CSV/JSONL) or row (parquet), so a
broken download is caught before a single request is sent.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medusa_forge.errors import ForgeError

LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "val", "test")
_HF_SPLIT = {"dev": "dev", "val": "validation", "test": "test"}
_HF_SKIP_DIRS = {"all", "auxiliary_train"}


@dataclass(frozen=True)
class Question:
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"
    source: str  # "file:line" (or "file:row N"), for error messages and reports

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ForgeError(f"unknown MMLU split {split!r}; use one of {', '.join(SPLITS)}")


def detect_layout(root: Path) -> str:
    """``"csv"`` for the original folders, ``"hf"`` for cais/mmlu's per-subject parquet/JSONL."""
    if not root.is_dir():
        raise ForgeError(f"{root}: MMLU data directory not found")
    if any((root / s).is_dir() and any((root / s).glob(f"*_{s}.csv")) for s in SPLITS):
        return "csv"
    if any(root.rglob("*.parquet")) or any(root.rglob("*.jsonl")):
        return "hf"
    raise ForgeError(
        f"{root}: neither the original MMLU layout (dev/ val/ test/ with {{subject}}_{{split}}.csv) "
        "nor the cais/mmlu layout ({subject}/{split}-*.parquet or *.jsonl)"
    )


# ---------------------------------------------------------------- original CSV layout
def _csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(first physical line, fields) per record; quoted fields may span lines."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        start = 1
        try:
            for row in reader:
                yield start, row
                start = reader.line_num + 1
        except csv.Error as e:
            raise ForgeError(f"{path}:{start}: unreadable CSV ({e})") from None
        except UnicodeDecodeError:
            raise ForgeError(f"{path}:{start}: not UTF-8 text") from None


def read_csv_file(path: Path, subject: str) -> list[Question]:
    out = []
    for line, row in _csv_rows(path):
        if not row or all(not c.strip() for c in row):
            continue
        where = f"{path}:{line}"
        if len(row) != 6:
            raise ForgeError(f"{where}: expected 6 columns (question,A,B,C,D,answer), found {len(row)}")
        answer = row[5].strip()
        if answer not in LETTERS:
            raise ForgeError(f"{where}: answer must be one of A, B, C, D, found {row[5]!r}")
        if not row[0].strip():
            raise ForgeError(f"{where}: empty question")
        out.append(Question(subject, row[0], (row[1], row[2], row[3], row[4]), answer, where))
    return out


def _csv_subjects(root: Path, split: str) -> dict[str, Path]:
    folder = root / split
    suffix = f"_{split}.csv"
    files = sorted(folder.glob(f"*{suffix}")) if folder.is_dir() else []
    return {f.name[: -len(suffix)]: f for f in files}


# ---------------------------------------------------------------- Hugging Face layout
def _hf_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) for each row of a parquet or JSONL file."""
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ForgeError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ForgeError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - any arrow failure is a broken file
        raise ForgeError(f"{path}: unreadable parquet ({type(e).__name__}: {e})") from None
    for n, rec in enumerate(rows):
        yield f"{path}:row {n}", rec


def _hf_question(where: str, rec: Any, folder_subject: str) -> Question:
    if not isinstance(rec, dict):
        raise ForgeError(f"{where}: expected an object with question, choices, answer")
    q, choices, answer = rec.get("question"), rec.get("choices"), rec.get("answer")
    if not isinstance(q, str) or not q.strip():
        raise ForgeError(f"{where}: missing or empty 'question'")
    if not isinstance(choices, (list, tuple)) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
        raise ForgeError(f"{where}: 'choices' must be a list of 4 strings")
    if isinstance(answer, str) and answer.strip() in LETTERS:
        answer = LETTERS.index(answer.strip())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
        raise ForgeError(f"{where}: 'answer' must be an integer 0-3 (or a letter A-D), found {answer!r}")
    subject = rec.get("subject") or folder_subject
    return Question(str(subject), q, tuple(choices), LETTERS[answer], where)  # type: ignore[arg-type]


def _hf_files(root: Path, split: str) -> list[Path]:
    """Files of one split: per-subject folders if any, else ``all/``, else the root itself."""
    name = _HF_SPLIT[split]
    pattern = [f"{name}-*.parquet", f"{name}.parquet", f"{name}-*.jsonl", f"{name}.jsonl"]

    def in_dir(d: Path) -> list[Path]:
        return sorted(p for pat in pattern for p in d.glob(pat))

    subject_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name not in _HF_SKIP_DIRS]
    files = [f for d in subject_dirs for f in in_dir(d)]
    if not files and (root / "all").is_dir():
        files = in_dir(root / "all")
    return files or in_dir(root)


def _read_hf(root: Path, split: str) -> dict[str, list[Question]]:
    out: dict[str, list[Question]] = {}
    for f in _hf_files(root, split):
        folder_subject = f.parent.name if f.parent != root else ""
        for where, rec in _hf_records(f):
            q = _hf_question(where, rec, folder_subject)
            if not q.subject:
                raise ForgeError(f"{where}: no 'subject' field and the file is not in a per-subject folder")
            out.setdefault(q.subject, []).append(q)
    return out


# ---------------------------------------------------------------- entry point
def load_split(root: str | Path, split: str, subjects: list[str] | None = None) -> dict[str, list[Question]]:
    """Questions of one split per subject (sorted by subject), restricted to ``subjects`` when given."""
    _check_split(split)
    root = Path(root)
    if detect_layout(root) == "csv":
        files = _csv_subjects(root, split)
        wanted = subjects if subjects else sorted(files)
        missing = [s for s in wanted if s not in files]
        if missing:
            raise ForgeError(f"{root / split}: no {split} file for subject(s) {', '.join(missing)}")
        data = {s: read_csv_file(files[s], s) for s in wanted}
    else:
        data = _read_hf(root, split)
        if subjects:
            missing = [s for s in subjects if s not in data]
            if missing:
                raise ForgeError(f"{root}: no {split} questions for subject(s) {', '.join(missing)}")
            data = {s: data[s] for s in subjects}
    data = {s: qs for s, qs in sorted(data.items()) if qs}
    if not data:
        raise ForgeError(f"{root}: no {split} questions found")
    return data

"""Training data: record formats, target masking, the held-out split, and what is never trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medusa_forge.errors import ForgeError
from medusa_forge.model.tokenizer import Tokenizer
from medusa_forge.train.data import (
    IGNORE_INDEX,
    collate,
    examples_from_tensors,
    examples_to_tensors,
    load_examples,
    split_examples,
)
from medusa_forge.train.self_distill import check_no_overlap
from medusa_forge.train.source_prompts import HeldOut, list_source_files, source_prompts


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer(model_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_rows_are_cut_into_windows_with_every_token_a_target(tok, tmp_path):
    text = "def f(x):\n    return x + 1\n" * 20
    ids = tok.encode(text)
    exs = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"text": text}]), tok, max_seq_len=32)
    assert [len(e.ids) for e in exs[:-1]] == [32] * (len(exs) - 1)
    assert torch.cat([e.ids for e in exs]).tolist() == ids
    assert all(e.prompt_len == 0 for e in exs)


def test_prompt_completion_trains_on_the_completion_only(tok, tmp_path):
    row = {"prompt": "import os\n", "completion": "import sys\nprint(sys.argv)\n"}
    (ex,) = load_examples(write_jsonl(tmp_path / "d.jsonl", [row]), tok, max_seq_len=64)
    p = tok.encode(row["prompt"])
    assert ex.prompt_len == len(p) and ex.ids[: len(p)].tolist() == p
    _, labels = collate([ex, ex], pad_id=2)
    assert (labels[:, : len(p)] == IGNORE_INDEX).all()
    assert labels[0, len(p) :].tolist() == ex.ids[len(p) :].tolist()


def test_batches_are_right_padded_with_ignored_labels(tok, tmp_path):
    rows = [{"text": "x = 1\n"}, {"text": "def g(a, b):\n    return a * b\n"}]
    exs = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_seq_len=64)
    tokens, labels = collate(exs, pad_id=2)
    n0 = len(exs[0].ids)
    assert tokens.shape[1] == max(len(e.ids) for e in exs)
    assert (tokens[0, n0:] == 2).all() and (labels[0, n0:] == IGNORE_INDEX).all()


def test_messages_need_a_chat_template(tok, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    with pytest.raises(ForgeError, match="chat template"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_seq_len=64)


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"text": ""}, {"text": "   "}, {"prompt": "a", "completion": ""}], "no usable text"),
        ([{"text": "x"}], "no usable text"),  # too short to have a token two places ahead
        ([{"title": "no text field"}], "no usable field"),
        (["just a string"], "JSON object"),
    ],
)
def test_file_without_usable_text_is_one_clear_error(tok, tmp_path, rows, match):
    with pytest.raises(ForgeError, match=match):
        load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_seq_len=64)


def test_bad_json_names_the_line(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok ok ok"}\n{oops\n')
    with pytest.raises(ForgeError, match=r"d\.jsonl:2: not valid JSON"):
        load_examples(path, tok, max_seq_len=64)


def test_split_is_deterministic_disjoint_and_keeps_both_sides(tok, tmp_path):
    rows = [{"text": f"value_{i} = {i} * {i}\n"} for i in range(20)]
    exs = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_seq_len=64)
    train, val = split_examples(exs, 0.2, seed=3)
    again, _ = split_examples(exs, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert [e.ids.tolist() for e in train] == [e.ids.tolist() for e in again]
    assert not {tuple(e.ids.tolist()) for e in train} & {tuple(e.ids.tolist()) for e in val}
    assert split_examples(exs[:2], 0.01, seed=0)[1]  # at least one held out


def test_examples_survive_the_checkpoint_packing(tok, tmp_path):
    rows = [{"prompt": "a = 1\n", "completion": "b = 2\nc = 3\n"}, {"text": "import re\nre.compile('x')\n"}]
    exs = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_seq_len=64)
    back = examples_from_tensors(examples_to_tensors(exs))
    assert [(e.ids.tolist(), e.prompt_len) for e in back] == [(e.ids.tolist(), e.prompt_len) for e in exs]


def test_python_source_prompts_skip_held_out_files(tok, tmp_path):
    root = tmp_path / "site-packages"
    (root / "pkg" / "sub").mkdir(parents=True)
    body = "".join(f"def function_{i}(a, b):\n    return a + b * {i}\n\n" for i in range(40))
    (root / "pkg" / "sub" / "held.py").write_text("# held out by path\n" + body)
    (root / "pkg" / "copy.py").write_text("# vendored copy of a held-out file\n" + body)
    (root / "pkg" / "train_me.py").write_text("# fine to train on\n" + body)
    held = tmp_path / "held.jsonl"
    write_jsonl(
        held,
        [
            {"topic": "pkg", "source": "pkg/sub/held.py", "prompt": "# held out by path\n" + body[:200]},
            {"topic": "pkg", "source": "elsewhere/x.py", "prompt": "# vendored copy of a held-out file\n" + body[:150]},
        ],
    )
    held_out = HeldOut.from_file(held)
    files, excluded = list_source_files([root], held_out)
    assert excluded == 1 and [f.name for f in files] == ["copy.py", "train_me.py"]
    prompts, summary = source_prompts(12, tok, held_out, roots=[root], min_tokens=16, max_tokens=40, seed=0)
    assert summary["files_used"] == 1 and summary["excluded_by_content"] >= 1
    assert all(16 <= len(p) <= 40 and p[0] == tok.hf.bos_token_id for p in prompts)
    assert all(tok.decode(p).startswith("# fine to train on") or "function_" in tok.decode(p) for p in prompts)


def test_real_held_out_prompts_are_refused_as_distillation_prompts(prompts_path, held_out_prompts):
    held_out = HeldOut.from_file(prompts_path)
    with pytest.raises(ForgeError, match="overlap the held-out"):
        check_no_overlap([held_out_prompts[5]["prompt"]], held_out, "prompts.jsonl")
    check_no_overlap(["import numpy as np\n\nx = np.zeros(3)\n"], held_out, "prompts.jsonl")

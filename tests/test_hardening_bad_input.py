"""Bad input, one table: every command and the Triton request path answer with the exact one-line
error, exit 2, and leave every output path as it was (nothing created, nothing changed).

The inputs are real: pycoder-26m and variants of it (weights missing or truncated, another
architecture, a tokenizer with one token too many), heads that do not fit it, a pickle that runs
code when unpickled, trees that are not trees. Cases already pinned elsewhere through the Python
API or `generate` are covered here through the other commands that take the same input.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_input_cases import CASES, LONG_PROMPT, Ctx
from conftest import make_heads
from conftest import triton_inputs as _inputs

from medusa_forge.cli import main
from medusa_forge.errors import ForgeError
from medusa_forge.heads.checkpoint import save_heads
from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig
from medusa_forge.serve.client import TritonLLMClient


def state(root: Path) -> dict:
    """Every entry under ``root`` (type, size, mtime, inode): equal before and after = nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns, st.st_ino)
    return out


# ------------------------------------------------------------------------------------------ inputs
class Evil:
    """Unpickling this runs a shell command (it would create the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def bad(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")

    def variant(name: str, config: dict | None = None, drop: tuple[str, ...] = (), replace: dict | None = None) -> Path:
        d = root / name
        d.mkdir()
        for f in model_dir.iterdir():
            if f.name in drop or f.name == "README.md":
                continue
            if f.name == "config.json" and config is not None:
                (d / f.name).write_text(json.dumps(config))
            elif replace and f.name in replace:
                (d / f.name).write_bytes(replace[f.name])
            else:
                (d / f.name).symlink_to(f)
        return d

    cfg = json.loads((model_dir / "config.json").read_text())
    blob = (model_dir / "model.safetensors").read_bytes()
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok["added_tokens"].append(
        {
            "id": cfg["vocab_size"],
            "content": "<extra>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    out = {
        "no_weights": variant("no_weights", drop=("model.safetensors",)),
        "truncated": variant("truncated", replace={"model.safetensors": blob[: len(blob) // 3]}),
        "gpt2": variant("gpt2", config=cfg | {"architectures": ["GPT2LMHeadModel"]}),
        "big_tokenizer": variant("big_tokenizer", replace={"tokenizer.json": json.dumps(tok).encode()}),
        "heads2": make_heads(model_dir, root / "heads2", num_heads=2),
    }
    for name, hidden, vocab in (
        ("heads_hidden256", 256, cfg["vocab_size"]),
        ("heads_vocab4096", cfg["hidden_size"], 4096),
    ):
        out[name] = root / name
        out[name].mkdir()
        save_heads(MedusaHeads(MedusaHeadsConfig(1, 1, hidden, vocab)), out[name])
    out["pickle_heads"] = root / "pickle_heads"
    out["pickle_heads"].mkdir()
    (out["pickle_heads"] / "config.json").write_text(json.dumps({"medusa_num_heads": 1, "medusa_num_layers": 1}))
    out["marker"] = root / "PICKLE_RAN"
    torch.save({"0.0.linear.weight": Evil(out["marker"])}, out["pickle_heads"] / "medusa_lm_head.pt")
    out["tree65"] = root / "tree65.json"
    out["tree65"].write_text(json.dumps([[i] for i in range(10)] + [[i, j] for i in range(10) for j in range(6)][:55]))
    out["mmlu"] = root / "mmlu.json"
    out["mmlu"].write_text(
        json.dumps(
            {
                "kind": "mmlu",
                "complete": True,
                "model": "m",
                "shots": 0,
                "macro_accuracy": 0.5,
                "micro_accuracy": 0.5,
                "num_questions": 2,
                "subjects": {"cs": {"correct": 1, "total": 2, "accuracy": 0.5}},
                "questions": [{"id": "cs/0", "predicted": "A"}, {"id": "cs/1", "predicted": "B"}],
            }
        )
    )
    out["partial"] = root / "partial.json"
    out["partial"].write_text(
        json.dumps({"kind": "partial", "complete": False, "fingerprint": {}, "results": {"a": 1}})
    )
    out["data"] = root / "train.jsonl"
    out["data"].write_text(json.dumps({"text": "def f(x):\n    return x + 1\n"}) + "\n")
    return out


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_cli_input_is_one_error_line_exit_2_and_writes_nothing(
    argv, message, model_dir, heads_dir, native_triton, bad, prompts_path, tmp_path, capsys
):
    ctx = Ctx(model_dir, heads_dir, native_triton.engine_dir, bad, tmp_path, prompts_path)
    args = [str(a) for a in argv(ctx)]  # creates the case's pre-existing output, if it has one
    expected = message(ctx)
    watched = (tmp_path, bad["heads2"].parent, native_triton.engine_dir)
    before = [state(d) for d in watched]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
        raise SystemExit(0)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.strip().splitlines() == [f"error: {expected}"]
    assert [state(d) for d in watched] == before  # no output created or changed, inputs untouched
    assert not bad["marker"].exists()  # the pickle's code never ran


# ------------------------------------------------------------------------------------------ Triton requests


PROMPT = np.array([[b"def add(a, b):"]], dtype=np.object_)
FOUR = np.array([[4]], dtype=np.int32)
REQUESTS = [
    (
        "negative top_k",
        dict(text_input=PROMPT, max_tokens=FOUR, top_k=np.array([[-2]], np.int32)),
        "input 'top_k' must be >= 0, got -2",
    ),
    (
        "prompt not UTF-8",
        dict(text_input=np.array([[b"\xff\xfeab"]], np.object_), max_tokens=FOUR),
        "input 'text_input' is not valid UTF-8",
    ),
    (
        "stop word not UTF-8",
        dict(text_input=PROMPT, max_tokens=FOUR, stop_words=np.array([[b"\xc3"]], np.object_)),
        "input 'stop_words' is not valid UTF-8",
    ),
    (
        "temperature NaN",
        dict(text_input=PROMPT, max_tokens=FOUR, temperature=np.array([[np.nan]], np.float32)),
        "input 'temperature' must be a finite number >= 0, got nan",
    ),
    (
        "max_tokens without a value",
        dict(text_input=PROMPT, max_tokens=np.zeros((1, 0), np.int32)),
        "input 'max_tokens' is empty; give the number of tokens to generate",
    ),
    (
        "prompt past the engine's max input",
        dict(text_input=np.array([[LONG_PROMPT.encode()]], np.object_), max_tokens=np.array([[1]], np.int32)),
        "prompt of {n} tokens is longer than the engine's max input of 2045 tokens (it exceeds the KV cache of 2048 tokens "
        "less 2 for the tree and 1 to generate); shorten the prompt or use a larger --max-seq-len",
    ),
    (
        "batch of 2",
        dict(text_input=np.array([[b"a"], [b"b"]], np.object_), max_tokens=np.array([[1], [1]], np.int32)),
        "[request id: <id_unknown>] inference request batch-size must be <= 1 for 'base'",
    ),
    (
        "unknown input",
        dict(text_input=PROMPT, max_tokens=FOUR, beam_widths=np.array([[2]], np.int32)),
        "unexpected inference input 'beam_widths' for model 'base'",
    ),
]


@pytest.mark.parametrize("tensors, message", [r[1:] for r in REQUESTS], ids=[r[0] for r in REQUESTS])
def test_bad_triton_request_gets_the_exact_error_and_the_server_keeps_serving(tensors, message, native_triton):
    from medusa_forge.model.tokenizer import Tokenizer

    expected = message.format(n=len(Tokenizer(native_triton.engine_dir / "model").encode(LONG_PROMPT)))
    watched = (native_triton.engine_dir, native_triton.repo)
    before = [state(d) for d in watched]
    with TritonLLMClient(native_triton.grpc_url, native_triton.base_model, 60) as c:
        with pytest.raises(ForgeError) as err:
            c.send(_inputs(**tensors))
        assert str(err.value) == f"model '{native_triton.base_model}' on {native_triton.grpc_url}: {expected}"
        assert len(c.generate("def add(a, b):", 2, end_id=-1).output_tokens) == 2
    assert [state(d) for d in watched] == before

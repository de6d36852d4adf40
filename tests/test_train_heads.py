"""``medusa-forge train-heads`` end to end on CPU, on the real pycoder-26m checkpoint.

One short run (2 heads, 15 steps, a tiny slice of real Python code plus two self-distilled
continuations) is shared by the tests below: the loss falls, the heads on disk are the trained
ones, in FasterDecoding's layout, with a report; resuming continues the same run; bad input fails
with one line and writes nothing.

FasterDecoding layout pinned against FasterDecoding/Medusa ``medusa/model/medusa_model.py``
@ 11af0aa (``medusa_head = ModuleList([Sequential(*[ResBlock(H)] * L, Linear(H, V, bias=False))])``,
``ResBlock.linear = nn.Linear(H, H)``, ``MedusaConfig(medusa_num_heads, medusa_num_layers,
base_model_name_or_path)``) and ``medusa/train/train_legacy.py`` @ e2a5d20 (heads saved with
``save_file(state_dict, "medusa_lm_head.safetensors")``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medusa_forge.cli import main
from medusa_forge.heads.checkpoint import load_heads
from medusa_forge.model.checkpoint import expected_hf_shapes
from medusa_forge.model.config import ModelConfig

NUM_HEADS, EPOCHS, STEPS = 2, 5, 15


class FasterDecodingResBlock(nn.Module):
    """FasterDecoding's ResBlock: x + SiLU(linear(x)), the linear named ``linear``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


def fasterdecoding_medusa_head(K: int, L: int, H: int, V: int | None) -> nn.ModuleList:
    """The module whose ``state_dict()`` FasterDecoding saves (V=None: version-2 heads, no projection)."""

    def head() -> nn.Sequential:
        tail = [] if V is None else [nn.Linear(H, V, bias=False)]
        return nn.Sequential(*[FasterDecodingResBlock(H) for _ in range(L)], *tail)

    return nn.ModuleList([head() for _ in range(K)])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code)
    return 0


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, held_out_prompts) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("train_inputs")
    lines = inspect.getsource(textwrap).splitlines(keepends=True)
    rows = [{"text": "".join(lines[i : i + 5])} for i in range(40, 90, 5)]  # 10 snippets of real code
    write_jsonl(d / "data.jsonl", rows)
    write_jsonl(
        d / "prompts.jsonl",
        [
            {"prompt": "import os\nimport sys\n\n\ndef main():\n"},
            {"prompt": "class Point:\n    def __init__(self, x, y):\n"},
        ],
    )
    evals = [dict(r, prompt=r["prompt"][:160]) for r in held_out_prompts[:2]]
    write_jsonl(d / "eval.jsonl", evals)
    return {"dir": d, "data": d / "data.jsonl", "prompts": d / "prompts.jsonl", "eval": d / "eval.jsonl"}


def train_args(model_dir: Path, inputs: dict, out: Path, *extra: str) -> list[str]:
    return [
        "train-heads",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--data",
        str(inputs["data"]),
        "--self-distill",
        "--prompts",
        str(inputs["prompts"]),
        "--distill-new-tokens",
        "8",
        "--num-heads",
        str(NUM_HEADS),
        "--num-layers",
        "1",
        "--epochs",
        str(EPOCHS),
        "--max-steps",
        str(STEPS),
        "--lr",
        "1e-3",
        "--max-seq-len",
        "40",
        "--batch-size",
        "2",
        "--val-fraction",
        "0.2",
        "--log-every",
        "1",
        "--save-every",
        "100",
        "--eval-every",
        "1000",
        "--eval-prompts",
        str(inputs["eval"]),
        "--eval-new-tokens",
        "6",
        "--eval-acceptance",
        "1",
        "--eval-tree",
        "chain-2",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def run(model_dir, inputs) -> dict:
    out = inputs["dir"] / "heads"
    assert cli(*train_args(model_dir, inputs, out)) == 0
    return {
        "out": out,
        "ckpt": out.parent / "heads.ckpt",
        "report": json.loads((out / "train_report.json").read_text()),
    }


def test_training_loss_falls(run):
    losses = [r["loss"] for r in run["report"]["history"]]
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3
    head1 = [r["head_loss"][0] for r in run["report"]["history"]]
    assert min(head1[-3:]) < head1[0]


def test_saved_heads_are_the_trained_heads_and_load_back_identically(run, model_dir):
    state = torch.load(run["ckpt"] / "state.pt", weights_only=True)
    assert state["loop"]["step"] == STEPS
    loaded = load_heads(run["out"], 512, 8192, dtype=torch.bfloat16)
    assert loaded.config.num_heads == NUM_HEADS and loaded.config.num_layers == 1
    for name, trained in state["heads"].items():
        assert torch.equal(getattr(loaded, name), trained.to(torch.bfloat16)), name
    assert state["heads"]["res_weight"].abs().sum() > 0  # trained away from the zero init


def test_saved_heads_are_in_fasterdecodings_layout(run):
    conf = json.loads((run["out"] / "config.json").read_text())
    assert conf["medusa_num_heads"] == NUM_HEADS and conf["medusa_num_layers"] == 1
    assert conf["base_model_name_or_path"]
    tensors = load_file(run["out"] / "medusa_lm_head.safetensors")
    ref = fasterdecoding_medusa_head(NUM_HEADS, 1, 512, 8192)
    assert set(tensors) == set(ref.state_dict())  # {k}.0.linear.weight/.bias, {k}.1.weight
    ref.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    ours = load_heads(run["out"], 512, 8192, dtype=torch.float32)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect = torch.stack([head(x) for head in ref])
        assert torch.allclose(ours(x), expect, atol=1e-4)


@pytest.mark.parametrize("version2", [False, True])
def test_heads_saved_by_fasterdecoding_load_in_ours(tmp_path, version2):
    K, L, H, V = 3, 2, 16, 40
    torch.manual_seed(0)
    ref = fasterdecoding_medusa_head(K, L, H, None if version2 else V)
    for p in ref.parameters():
        nn.init.normal_(p, std=0.2)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "medusa_lm_head.safetensors"))
    conf = {"medusa_num_heads": K, "medusa_num_layers": L, "base_model_name_or_path": "base"}
    (tmp_path / "config.json").write_text(json.dumps(conf | ({"version": "2"} if version2 else {})))
    ours = load_heads(tmp_path, H, V)
    assert ours.config.shared_lm_head == version2
    lm_head = torch.randn(V, H)
    x = torch.randn(5, H)
    with torch.no_grad():
        expect = torch.stack([head(x) @ lm_head.t() if version2 else head(x) for head in ref])
        assert torch.allclose(ours(x, lm_head), expect, atol=1e-5)


def test_report_has_per_head_accuracy_curves_and_acceptance(run):
    rep, out = run["report"], run["out"]
    assert rep["summary"]["first_loss"] > rep["summary"]["final_loss"]
    for split in ("val", "eval_prompts"):
        m = rep[split]
        assert len(m["top1"]) == len(m["top5"]) == NUM_HEADS
        assert all(0 <= a <= b <= 1 for a, b in zip(m["top1"], m["top5"])) and m["positions"][0] > 0
    assert rep["data"]["sources"]["self_distill"]["prompts"] == 2
    assert rep["data"]["eval_prompts"]["prompts"] == 2
    assert rep["acceptance"]["tree"] == "chain-2" and rep["acceptance"]["mean_accepted"] >= 1.0
    assert rep["heads"]["saved_dtype"] == "bfloat16" and rep["run"]["device"] == "cpu"
    assert "| 1 | t+2 |" in (out / "train_report.md").read_text()
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".heads.tmp-*"))


def test_resume_continues_the_same_run(run, model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "heads"
    shutil.copytree(run["ckpt"], tmp_path / "heads.ckpt")
    extra = ["--resume", "--max-steps", str(STEPS + 2)]
    assert cli(*train_args(model_dir, inputs, out, *extra)) == 0
    assert "prepared data reused" in capsys.readouterr().err
    rep = json.loads((out / "train_report.json").read_text())
    assert [r["step"] for r in rep["history"]] == list(range(1, STEPS + 3))
    assert rep["history"][:STEPS] == run["report"]["history"]
    assert rep["data"]["sources"] == run["report"]["data"]["sources"]


def tiny_model(src: Path, dst: Path, hidden: int = 64) -> Path:
    """A real (random-weight) Llama checkpoint with another hidden size and pycoder's tokenizer."""
    dst.mkdir()
    conf = json.loads((src / "config.json").read_text())
    conf.update(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
    )
    (dst / "config.json").write_text(json.dumps(conf))
    g = torch.Generator().manual_seed(0)
    shapes = expected_hf_shapes(ModelConfig.from_hf_dict(conf))
    save_file({n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}, str(dst / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def test_resume_with_a_different_hidden_size_is_refused_and_changes_nothing(run, model_dir, inputs, tmp_path, capsys):
    out = tmp_path / "heads"
    ckpt = shutil.copytree(run["ckpt"], tmp_path / "heads.ckpt")
    before = sha(ckpt / "state.pt")
    other = tiny_model(model_dir, tmp_path / "tiny")
    assert cli(*train_args(other, inputs, out, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot resume" in err[0] and "hidden_size=512" in err[0] and "64" in err[0]
    assert not out.exists() and sha(ckpt / "state.pt") == before
    assert sorted(p.name for p in ckpt.iterdir()) == ["data.pt", "state.pt"]


@pytest.mark.parametrize("heads", ["0", "17", "-1"])
def test_out_of_range_head_count_is_refused_before_any_work(model_dir, inputs, tmp_path, capsys, heads):
    out = tmp_path / "heads"
    args = train_args(model_dir, inputs, out)
    args[args.index("--num-heads") + 1] = heads
    assert cli(*args) == 2
    assert "out of range (1..16)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_data_without_usable_text_is_refused_and_writes_nothing(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"prompt": "x = 1", "completion": "  "}])
    out = tmp_path / "heads"
    assert (
        cli(
            "train-heads",
            "--model",
            str(model_dir),
            "--out",
            str(out),
            "--data",
            str(data),
            "--device",
            "cpu",
            "--no-progress",
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable text" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_old_checkpoint_or_output_needs_resume_or_overwrite(run, model_dir, inputs, tmp_path, capsys):
    shutil.copytree(run["ckpt"], tmp_path / "heads.ckpt")
    assert cli(*train_args(model_dir, inputs, tmp_path / "heads")) == 2
    assert "--resume to continue it or --overwrite" in capsys.readouterr().err
    assert cli(*train_args(model_dir, inputs, run["out"], "--resume")) == 2  # finished output already there
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_run_uses_bf16_base_and_fused_adamw(model_dir, inputs, tmp_path):
    out = tmp_path / "heads"
    args = train_args(model_dir, inputs, out)
    args[args.index("--device") + 1] = "cuda"
    assert cli(*args) == 0
    rep = json.loads((out / "train_report.json").read_text())
    assert rep["run"]["device"].startswith("cuda") and rep["run"]["base_dtype"] == "bfloat16"
    assert rep["summary"]["final_loss"] < rep["summary"]["first_loss"]

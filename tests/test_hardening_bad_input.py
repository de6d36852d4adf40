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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE_MMLU, make_heads
from conftest import triton_inputs as _inputs

from medusa_forge.cli import main
from medusa_forge.errors import ForgeError
from medusa_forge.heads.checkpoint import save_heads
from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig
from medusa_forge.serve.client import TritonLLMClient

LONG_PROMPT = "x = 1 " * 1500  # ~4500 tokens: past any engine's max input here


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
    tok["added_tokens"].append({"id": cfg["vocab_size"], "content": "<extra>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    out = {
        "no_weights": variant("no_weights", drop=("model.safetensors",)),
        "truncated": variant("truncated", replace={"model.safetensors": blob[: len(blob) // 3]}),
        "gpt2": variant("gpt2", config=cfg | {"architectures": ["GPT2LMHeadModel"]}),
        "big_tokenizer": variant("big_tokenizer", replace={"tokenizer.json": json.dumps(tok).encode()}),
        "heads2": make_heads(model_dir, root / "heads2", num_heads=2),
    }
    for name, hidden, vocab in (("heads_hidden256", 256, cfg["vocab_size"]), ("heads_vocab4096", cfg["hidden_size"], 4096)):
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
    out["mmlu"].write_text(json.dumps({
        "kind": "mmlu", "complete": True, "model": "m", "shots": 0, "macro_accuracy": 0.5, "micro_accuracy": 0.5,
        "num_questions": 2, "subjects": {"cs": {"correct": 1, "total": 2, "accuracy": 0.5}},
        "questions": [{"id": "cs/0", "predicted": "A"}, {"id": "cs/1", "predicted": "B"}]}))
    out["partial"] = root / "partial.json"
    out["partial"].write_text(json.dumps({"kind": "partial", "complete": False, "fingerprint": {}, "results": {"a": 1}}))
    out["data"] = root / "train.jsonl"
    out["data"].write_text(json.dumps({"text": "def f(x):\n    return x + 1\n"}) + "\n")
    return out


@dataclass
class Ctx:
    model: Path  # pycoder-26m
    heads4: Path  # the session's 4-head heads
    engine: Path  # a native engine (4 heads, tree `small`, max_seq_len 2048)
    bad: dict[str, Path]
    out: Path  # this case's output directory (empty)
    prompts: Path

    def existing(self, name: str = "existing") -> Path:
        """A non-empty output directory from an earlier run."""
        d = self.out / name
        d.mkdir(exist_ok=True)
        (d / "keep.txt").write_text("earlier output\n")
        return d


def tokens(ctx: Ctx, text: str) -> int:
    from medusa_forge.model.tokenizer import Tokenizer

    return len(Tokenizer(ctx.engine / "model").encode(text))


HEADS_NOT_BASE = "(base model hidden size 512, vocab 8192): heads do not match the base"
PICKLE = "cannot be loaded with weights_only=True (UnpicklingError: Trying to load unsupported GLOBAL posix.system " \
         "whose module posix is blocked.)"
NOT_EMPTY = "is not empty; pass --overwrite to replace it"
Case = tuple[str, Callable[[Ctx], list], Callable[[Ctx], str]]
CASES: list[Case] = [
    # ---- weights
    ("build: no safetensors", lambda c: ["build", "native", "--model", c.bad["no_weights"], "--out", c.out / "e"],
     lambda c: f"{c.bad['no_weights']}: no *.safetensors weights found"),
    ("build: truncated safetensors", lambda c: ["build", "native", "--model", c.bad["truncated"], "--out", c.out / "e"],
     lambda c: f"{c.bad['truncated']}/model.safetensors: not a readable safetensors file (Error while deserializing "
               "header: incomplete metadata, file not fully covered)"),
    ("train-heads: truncated safetensors", lambda c: ["train-heads", "--model", c.bad["truncated"], "--out", c.out / "h",
                                                      "--data", c.bad["data"]],
     lambda c: f"{c.bad['truncated']}/model.safetensors: not a readable safetensors file (Error while deserializing "
               "header: incomplete metadata, file not fully covered)"),
    # ---- heads that do not fit the base
    ("build: heads hidden 256", lambda c: ["build", "native", "--model", c.model, "--medusa", c.bad["heads_hidden256"],
                                           "--medusa-choices", "chain-1", "--out", c.out / "e"],
     lambda c: f"{c.bad['heads_hidden256']}/medusa_lm_head.safetensors: tensor 0.0.linear.weight has shape [256, 256], "
               f"expected [512, 512] {HEADS_NOT_BASE}"),
    ("heads export: heads hidden 256", lambda c: ["heads", "export", "--from", c.bad["heads_hidden256"], "--to", "tgi",
                                                  "--base-model", c.model, "--out", c.out / "x"],
     lambda c: f"{c.bad['heads_hidden256']}/medusa_lm_head.safetensors: tensor 0.0.linear.weight has shape [256, 256], "
               f"expected [512, 512] {HEADS_NOT_BASE}"),
    ("convert: heads vocab 4096", lambda c: ["convert", "trtllm", "--model", c.model, "--medusa", c.bad["heads_vocab4096"],
                                             "--out", c.out / "ckpt"],
     lambda c: f"{c.bad['heads_vocab4096']}/medusa_lm_head.safetensors: tensor 0.1.weight has shape [4096, 512], "
               f"expected [8192, 512] {HEADS_NOT_BASE}"),
    ("build: pickle heads", lambda c: ["build", "native", "--model", c.model, "--medusa", c.bad["pickle_heads"],
                                       "--medusa-choices", "chain-1", "--out", c.out / "e"],
     lambda c: f"{c.bad['pickle_heads']}/medusa_lm_head.pt: {PICKLE}"),
    ("heads export: pickle heads", lambda c: ["heads", "export", "--from", c.bad["pickle_heads"], "--to", "vllm",
                                              "--out", c.out / "x"],
     lambda c: f"{c.bad['pickle_heads']}/medusa_lm_head.pt: {PICKLE}"),
    # ---- choice trees
    ("build: tree deeper than heads", lambda c: ["build", "native", "--model", c.model, "--medusa", c.bad["heads2"],
                                                 "--out", c.out / "e"],
     lambda c: "choice tree 'mc_sim_7b_63' has depth 4 but the model has only 2 Medusa heads; use a tree of depth <= 2"),
    ("generate: engine tree deeper than heads", lambda c: ["generate", "--model", c.engine, "--medusa-choices", "chain-5",
                                                           "--prompt", "x"],
     lambda c: "choice tree 'chain-5' has depth 5 but the model has only 4 Medusa heads; use a tree of depth <= 4"),
    ("train-heads: eval tree deeper than heads", lambda c: [
        "train-heads", "--model", c.model, "--out", c.out / "h", "--num-heads", "2", "--self-distill", "--prompts",
        c.prompts, "--eval-prompts", c.prompts, "--eval-acceptance", "1", "--medusa-choices", "chain-3"],
     lambda c: "choice tree 'chain-3' has depth 3 but the model has only 2 Medusa heads; use a tree of depth <= 2"),
    ("generate: tree not prefix-closed", lambda c: ["generate", "--model", c.model, "--medusa", c.bad["heads2"],
                                                    "--medusa-choices", "[[0], [1, 0]]", "--prompt", "x"],
     lambda c: "choice tree 'custom': path [1, 0] has no parent [1] (trees must be prefix-closed)"),
    ("build: tree of 65 nodes", lambda c: ["build", "native", "--model", c.model, "--medusa", c.heads4,
                                           "--medusa-choices", c.bad["tree65"], "--out", c.out / "e"],
     lambda c: "choice tree 'tree65': 65 nodes exceed the limit of 64 (root excluded)"),
    ("generate: tree not JSON", lambda c: ["generate", "--model", c.model, "--medusa", c.heads4,
                                           "--medusa-choices", "[[0],", "--prompt", "x"],
     lambda c: "choice tree: not valid JSON (Expecting value: line 1 column 6 (char 5))"),
    # ---- prompts and lengths
    ("query: empty prompt", lambda c: ["query", "--url", "127.0.0.1:1", "--model", "base", "--prompt", ""],
     lambda c: "empty prompt: give at least one token of input"),
    ("generate: max-new-tokens past the engine's cache", lambda c: ["generate", "--model", c.engine, "--prompt", "x",
                                                                   "--max-new-tokens", "2100"],
     lambda c: "prompt (2 tokens) + max_new_tokens (2100) + tree (16) = 2118 exceeds the KV cache of 2048 tokens"),
    ("generate: prompt past the engine's max input", lambda c: ["generate", "--model", c.engine, "--prompt", LONG_PROMPT,
                                                               "--max-new-tokens", "2"],
     lambda c: f"prompt of {tokens(c, LONG_PROMPT)} tokens is longer than the engine's max input of 2031 tokens (it "
               "exceeds the KV cache of 2048 tokens less 16 for the tree and 1 to generate); shorten the prompt or use a "
               "larger --max-seq-len"),
    ("build: max-seq-len 8", lambda c: ["build", "native", "--model", c.model, "--max-seq-len", "8", "--out", c.out / "e"],
     lambda c: "--max-seq-len 8 is too small (need >= 16)"),
    # ---- model config and tokenizer
    ("build: unknown architecture", lambda c: ["build", "native", "--model", c.bad["gpt2"], "--out", c.out / "e"],
     lambda c: f"{c.bad['gpt2']}/config.json: unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM, "
               "MistralForCausalLM, Qwen2ForCausalLM"),
    ("train-heads: unknown architecture", lambda c: ["train-heads", "--model", c.bad["gpt2"], "--out", c.out / "h",
                                                     "--data", c.bad["data"]],
     lambda c: f"{c.bad['gpt2']}/config.json: unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM, "
               "MistralForCausalLM, Qwen2ForCausalLM"),
    ("generate: tokenizer bigger than the vocab", lambda c: ["generate", "--model", c.bad["big_tokenizer"], "--prompt", "x"],
     lambda c: f"{c.bad['big_tokenizer']}: tokenizer has 8193 tokens but the model's vocab_size is 8192 (config.json); "
               "use the tokenizer the model was trained with"),
    ("build: tokenizer bigger than the vocab", lambda c: ["build", "native", "--model", c.bad["big_tokenizer"], "--dtype",
                                                          "float32", "--verify-tokens", "1", "--out", c.out / "e"],
     lambda c: f"{c.bad['big_tokenizer']}: tokenizer has 8193 tokens but the model's vocab_size is 8192 (config.json); "
               "use the tokenizer the model was trained with"),
    ("train-heads: tokenizer bigger than the vocab", lambda c: ["train-heads", "--model", c.bad["big_tokenizer"], "--out",
                                                                c.out / "h", "--data", c.bad["data"]],
     lambda c: f"{c.bad['big_tokenizer']}: tokenizer has 8193 tokens but the model's vocab_size is 8192 (config.json); "
               "use the tokenizer the model was trained with"),
    # ---- outputs that exist
    ("build: existing output", lambda c: ["build", "native", "--model", c.model, "--out", c.existing()],
     lambda c: f"output directory {c.out / 'existing'} {NOT_EMPTY}"),
    ("heads export: existing output", lambda c: ["heads", "export", "--from", c.bad["heads2"], "--to", "vllm",
                                                 "--out", c.existing()],
     lambda c: f"output directory {c.out / 'existing'} {NOT_EMPTY}"),
    ("triton-repo: existing output", lambda c: ["triton-repo", "--model", c.engine, "--out", c.existing()],
     lambda c: f"output directory {c.out / 'existing'} {NOT_EMPTY}"),
    ("eval report: existing output", lambda c: ["eval", "report", "--mmlu", c.bad["mmlu"], "--out", c.existing()],
     lambda c: f"output directory {c.out / 'existing'} {NOT_EMPTY}"),
    ("convert: output is a file", lambda c: ["convert", "trtllm", "--model", c.model, "--medusa", c.heads4, "--out",
                                             c.existing() / "keep.txt"],
     lambda c: f"output directory {c.out / 'existing' / 'keep.txt'} is not a directory"),
    # ---- parallelism and serving settings
    ("convert: tp 3 does not divide 8 heads", lambda c: ["convert", "trtllm", "--model", c.model, "--medusa", c.heads4,
                                                         "--tp-size", "3", "--out", c.out / "ckpt"],
     lambda c: f"{c.model} with --tp-size 3: tp_size 3 does not divide num_attention_heads 8"),
    ("triton-repo: 0 instances", lambda c: ["triton-repo", "--model", c.engine, "--instances", "0", "--out", c.out / "r"],
     lambda c: "--instances must be >= 1, got 0"),
    ("triton-repo: tree deeper than the heads", lambda c: ["triton-repo", "--model", c.model, "--medusa", c.heads4,
                                                           "--medusa-choices", "chain-5", "--out", c.out / "r"],
     lambda c: "choice tree 'chain-5' has depth 5 but the model has only 4 Medusa heads; use a tree of depth <= 4"),
    ("triton-repo: heads vocab 4096", lambda c: ["triton-repo", "--model", c.model, "--medusa",
                                                 c.bad["heads_vocab4096"], "--medusa-choices", "chain-1",
                                                 "--out", c.out / "r"],
     lambda c: f"{c.bad['heads_vocab4096']}/medusa_lm_head.safetensors: tensor 0.1.weight has shape [4096, 512], "
               f"expected [8192, 512] {HEADS_NOT_BASE}"),
    # ---- eval and promote
    ("eval mmlu: no server", lambda c: ["eval", "mmlu", "--model", "base", "--data", FIXTURE_MMLU, "--out",
                                        c.out / "m.json"],
     lambda c: "give --url HOST:PORT of the Triton gRPC endpoint (or --in-process)"),
    ("eval speed: 0 trials", lambda c: ["eval", "speed", "--in-process", "--base-model", c.engine, "--medusa-model",
                                        c.engine, "--prompts", c.prompts, "--trials", "0", "--out", c.out / "s.json"],
     lambda c: "--trials and --max-tokens must be >= 1, --warmup and --medusa-temperature >= 0"),
    ("promote: candidate is not an engine", lambda c: ["promote", "--candidate", c.bad["heads2"], "--report",
                                                       c.bad["mmlu"], "--baseline", c.bad["mmlu"], "--to", c.out / "reg"],
     lambda c: f"{c.bad['heads2']}: not an engine directory (no medusa_forge.json); run `medusa-forge build` first"),
    ("promote: partial report", lambda c: ["promote", "--candidate", c.engine, "--report", c.bad["partial"], "--baseline",
                                           c.bad["mmlu"], "--to", c.out / "reg"],
     lambda c: f"{c.bad['partial']}: partial results (1 items), not a finished run; rerun the same `medusa-forge eval` "
               "command to resume and complete it"),
    ("promote: no report or baseline", lambda c: ["promote", "--candidate", c.engine, "--to", c.out / "reg"],
     lambda c: "promote needs --report, --baseline (or --rollback)"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_cli_input_is_one_error_line_exit_2_and_writes_nothing(argv, message, model_dir, heads_dir, native_triton,
                                                                    bad, prompts_path, tmp_path, capsys):
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
    ("negative top_k", dict(text_input=PROMPT, max_tokens=FOUR, top_k=np.array([[-2]], np.int32)),
     "input 'top_k' must be >= 0, got -2"),
    ("prompt not UTF-8", dict(text_input=np.array([[b"\xff\xfeab"]], np.object_), max_tokens=FOUR),
     "input 'text_input' is not valid UTF-8"),
    ("stop word not UTF-8", dict(text_input=PROMPT, max_tokens=FOUR, stop_words=np.array([[b"\xc3"]], np.object_)),
     "input 'stop_words' is not valid UTF-8"),
    ("temperature NaN", dict(text_input=PROMPT, max_tokens=FOUR, temperature=np.array([[np.nan]], np.float32)),
     "input 'temperature' must be a finite number >= 0, got nan"),
    ("max_tokens without a value", dict(text_input=PROMPT, max_tokens=np.zeros((1, 0), np.int32)),
     "input 'max_tokens' is empty; give the number of tokens to generate"),
    ("prompt past the engine's max input", dict(text_input=np.array([[LONG_PROMPT.encode()]], np.object_),
                                               max_tokens=np.array([[1]], np.int32)),
     "prompt of {n} tokens is longer than the engine's max input of 2045 tokens (it exceeds the KV cache of 2048 tokens "
     "less 2 for the tree and 1 to generate); shorten the prompt or use a larger --max-seq-len"),
    ("batch of 2", dict(text_input=np.array([[b"a"], [b"b"]], np.object_), max_tokens=np.array([[1], [1]], np.int32)),
     "[request id: <id_unknown>] inference request batch-size must be <= 1 for 'base'"),
    ("unknown input", dict(text_input=PROMPT, max_tokens=FOUR, beam_widths=np.array([[2]], np.int32)),
     "unexpected inference input 'beam_widths' for model 'base'"),
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

"""tests/test_hardening_bad_input.py's command table: each case's argv and the exact one-line error
it must get, both built from the case's context (inputs, engine, a fresh output directory)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conftest import FIXTURE_MMLU

LONG_PROMPT = "x = 1 " * 1500  # ~4500 tokens: past any engine's max input here


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
PICKLE = (
    "cannot be loaded with weights_only=True (UnpicklingError: Trying to load unsupported GLOBAL posix.system "
    "whose module posix is blocked.)"
)
NOT_EMPTY = "is not empty; pass --overwrite to replace it"


def truncated_weights(c: Ctx) -> str:
    return (
        f"{c.bad['truncated']}/model.safetensors: not a readable safetensors file (Error while deserializing "
        "header: incomplete metadata, file not fully covered)"
    )


def heads_hidden_256(c: Ctx) -> str:
    return (
        f"{c.bad['heads_hidden256']}/medusa_lm_head.safetensors: tensor 0.0.linear.weight has shape [256, 256], "
        f"expected [512, 512] {HEADS_NOT_BASE}"
    )


def heads_vocab_4096(c: Ctx) -> str:
    return (
        f"{c.bad['heads_vocab4096']}/medusa_lm_head.safetensors: tensor 0.1.weight has shape [4096, 512], "
        f"expected [8192, 512] {HEADS_NOT_BASE}"
    )


def unknown_architecture(c: Ctx) -> str:
    return (
        f"{c.bad['gpt2']}/config.json: unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM, "
        "MistralForCausalLM, Qwen2ForCausalLM"
    )


def tokenizer_too_big(c: Ctx) -> str:
    return (
        f"{c.bad['big_tokenizer']}: tokenizer has 8193 tokens but the model's vocab_size is 8192 (config.json); "
        "use the tokenizer the model was trained with"
    )


Case = tuple[str, Callable[[Ctx], list], Callable[[Ctx], str]]
CASES: list[Case] = [
    # ---- weights
    (
        "build: no safetensors",
        lambda c: ["build", "native", "--model", c.bad["no_weights"], "--out", c.out / "e"],
        lambda c: f"{c.bad['no_weights']}: no *.safetensors weights found",
    ),
    (
        "build: truncated safetensors",
        lambda c: ["build", "native", "--model", c.bad["truncated"], "--out", c.out / "e"],
        truncated_weights,
    ),
    (
        "train-heads: truncated safetensors",
        lambda c: ["train-heads", "--model", c.bad["truncated"], "--out", c.out / "h", "--data", c.bad["data"]],
        truncated_weights,
    ),
    # ---- heads that do not fit the base
    (
        "build: heads hidden 256",
        lambda c: [
            "build",
            "native",
            "--model",
            c.model,
            "--medusa",
            c.bad["heads_hidden256"],
            "--medusa-choices",
            "chain-1",
            "--out",
            c.out / "e",
        ],
        heads_hidden_256,
    ),
    (
        "heads export: heads hidden 256",
        lambda c: [
            "heads",
            "export",
            "--from",
            c.bad["heads_hidden256"],
            "--to",
            "tgi",
            "--base-model",
            c.model,
            "--out",
            c.out / "x",
        ],
        heads_hidden_256,
    ),
    (
        "convert: heads vocab 4096",
        lambda c: [
            "convert",
            "trtllm",
            "--model",
            c.model,
            "--medusa",
            c.bad["heads_vocab4096"],
            "--out",
            c.out / "ckpt",
        ],
        heads_vocab_4096,
    ),
    (
        "build: pickle heads",
        lambda c: [
            "build",
            "native",
            "--model",
            c.model,
            "--medusa",
            c.bad["pickle_heads"],
            "--medusa-choices",
            "chain-1",
            "--out",
            c.out / "e",
        ],
        lambda c: f"{c.bad['pickle_heads']}/medusa_lm_head.pt: {PICKLE}",
    ),
    (
        "heads export: pickle heads",
        lambda c: ["heads", "export", "--from", c.bad["pickle_heads"], "--to", "vllm", "--out", c.out / "x"],
        lambda c: f"{c.bad['pickle_heads']}/medusa_lm_head.pt: {PICKLE}",
    ),
    # ---- choice trees
    (
        "build: tree deeper than heads",
        lambda c: ["build", "native", "--model", c.model, "--medusa", c.bad["heads2"], "--out", c.out / "e"],
        lambda c: (
            "choice tree 'mc_sim_7b_63' has depth 4 but the model has only 2 Medusa heads; use a tree of depth <= 2"
        ),
    ),
    (
        "generate: engine tree deeper than heads",
        lambda c: ["generate", "--model", c.engine, "--medusa-choices", "chain-5", "--prompt", "x"],
        lambda c: "choice tree 'chain-5' has depth 5 but the model has only 4 Medusa heads; use a tree of depth <= 4",
    ),
    (
        "train-heads: eval tree deeper than heads",
        lambda c: [
            "train-heads",
            "--model",
            c.model,
            "--out",
            c.out / "h",
            "--num-heads",
            "2",
            "--self-distill",
            "--prompts",
            c.prompts,
            "--eval-prompts",
            c.prompts,
            "--eval-acceptance",
            "1",
            "--medusa-choices",
            "chain-3",
        ],
        lambda c: "choice tree 'chain-3' has depth 3 but the model has only 2 Medusa heads; use a tree of depth <= 2",
    ),
    (
        "generate: tree not prefix-closed",
        lambda c: [
            "generate",
            "--model",
            c.model,
            "--medusa",
            c.bad["heads2"],
            "--medusa-choices",
            "[[0], [1, 0]]",
            "--prompt",
            "x",
        ],
        lambda c: "choice tree 'custom': path [1, 0] has no parent [1] (trees must be prefix-closed)",
    ),
    (
        "build: tree of 65 nodes",
        lambda c: [
            "build",
            "native",
            "--model",
            c.model,
            "--medusa",
            c.heads4,
            "--medusa-choices",
            c.bad["tree65"],
            "--out",
            c.out / "e",
        ],
        lambda c: "choice tree 'tree65': 65 nodes exceed the limit of 64 (root excluded)",
    ),
    (
        "generate: tree not JSON",
        lambda c: ["generate", "--model", c.model, "--medusa", c.heads4, "--medusa-choices", "[[0],", "--prompt", "x"],
        lambda c: "choice tree: not valid JSON (Expecting value: line 1 column 6 (char 5))",
    ),
    # ---- prompts and lengths
    (
        "query: empty prompt",
        lambda c: ["query", "--url", "127.0.0.1:1", "--model", "base", "--prompt", ""],
        lambda c: "empty prompt: give at least one token of input",
    ),
    (
        "generate: max-new-tokens past the engine's cache",
        lambda c: ["generate", "--model", c.engine, "--prompt", "x", "--max-new-tokens", "2100"],
        lambda c: "prompt (2 tokens) + max_new_tokens (2100) + tree (16) = 2118 exceeds the KV cache of 2048 tokens",
    ),
    (
        "generate: prompt past the engine's max input",
        lambda c: ["generate", "--model", c.engine, "--prompt", LONG_PROMPT, "--max-new-tokens", "2"],
        lambda c: (
            f"prompt of {tokens(c, LONG_PROMPT)} tokens is longer than the engine's max input of 2031 tokens (it "
            "exceeds the KV cache of 2048 tokens less 16 for the tree and 1 to generate); shorten the prompt or use a "
            "larger --max-seq-len"
        ),
    ),
    (
        "build: max-seq-len 8",
        lambda c: ["build", "native", "--model", c.model, "--max-seq-len", "8", "--out", c.out / "e"],
        lambda c: "--max-seq-len 8 is too small (need >= 16)",
    ),
    # ---- model config and tokenizer
    (
        "build: unknown architecture",
        lambda c: ["build", "native", "--model", c.bad["gpt2"], "--out", c.out / "e"],
        unknown_architecture,
    ),
    (
        "train-heads: unknown architecture",
        lambda c: ["train-heads", "--model", c.bad["gpt2"], "--out", c.out / "h", "--data", c.bad["data"]],
        unknown_architecture,
    ),
    (
        "generate: tokenizer bigger than the vocab",
        lambda c: ["generate", "--model", c.bad["big_tokenizer"], "--prompt", "x"],
        tokenizer_too_big,
    ),
    (
        "build: tokenizer bigger than the vocab",
        lambda c: [
            "build",
            "native",
            "--model",
            c.bad["big_tokenizer"],
            "--dtype",
            "float32",
            "--verify-tokens",
            "1",
            "--out",
            c.out / "e",
        ],
        tokenizer_too_big,
    ),
    (
        "train-heads: tokenizer bigger than the vocab",
        lambda c: ["train-heads", "--model", c.bad["big_tokenizer"], "--out", c.out / "h", "--data", c.bad["data"]],
        tokenizer_too_big,
    ),
    # ---- outputs that exist
    (
        "build: existing output",
        lambda c: ["build", "native", "--model", c.model, "--out", c.existing()],
        lambda c: f"output directory {c.out / 'existing'} {NOT_EMPTY}",
    ),
    (
        "heads export: existing output",
        lambda c: ["heads", "export", "--from", c.bad["heads2"], "--to", "vllm", "--out", c.existing()],
        lambda c: f"output directory {c.out / 'existing'} {NOT_EMPTY}",
    ),
    (
        "triton-repo: existing output",
        lambda c: ["triton-repo", "--model", c.engine, "--out", c.existing()],
        lambda c: f"output directory {c.out / 'existing'} {NOT_EMPTY}",
    ),
    (
        "eval report: existing output",
        lambda c: ["eval", "report", "--mmlu", c.bad["mmlu"], "--out", c.existing()],
        lambda c: f"output directory {c.out / 'existing'} {NOT_EMPTY}",
    ),
    (
        "convert: output is a file",
        lambda c: ["convert", "trtllm", "--model", c.model, "--medusa", c.heads4, "--out", c.existing() / "keep.txt"],
        lambda c: f"output directory {c.out / 'existing' / 'keep.txt'} is not a directory",
    ),
    # ---- parallelism and serving settings
    (
        "convert: tp 3 does not divide 8 heads",
        lambda c: [
            "convert",
            "trtllm",
            "--model",
            c.model,
            "--medusa",
            c.heads4,
            "--tp-size",
            "3",
            "--out",
            c.out / "ckpt",
        ],
        lambda c: f"{c.model} with --tp-size 3: tp_size 3 does not divide num_attention_heads 8",
    ),
    (
        "triton-repo: 0 instances",
        lambda c: ["triton-repo", "--model", c.engine, "--instances", "0", "--out", c.out / "r"],
        lambda c: "--instances must be >= 1, got 0",
    ),
    (
        "triton-repo: tree deeper than the heads",
        lambda c: [
            "triton-repo",
            "--model",
            c.model,
            "--medusa",
            c.heads4,
            "--medusa-choices",
            "chain-5",
            "--out",
            c.out / "r",
        ],
        lambda c: "choice tree 'chain-5' has depth 5 but the model has only 4 Medusa heads; use a tree of depth <= 4",
    ),
    (
        "triton-repo: heads vocab 4096",
        lambda c: [
            "triton-repo",
            "--model",
            c.model,
            "--medusa",
            c.bad["heads_vocab4096"],
            "--medusa-choices",
            "chain-1",
            "--out",
            c.out / "r",
        ],
        heads_vocab_4096,
    ),
    # ---- eval and promote
    (
        "eval mmlu: no server",
        lambda c: ["eval", "mmlu", "--model", "base", "--data", FIXTURE_MMLU, "--out", c.out / "m.json"],
        lambda c: "give --url HOST:PORT of the Triton gRPC endpoint (or --in-process)",
    ),
    (
        "eval speed: 0 trials",
        lambda c: [
            "eval",
            "speed",
            "--in-process",
            "--base-model",
            c.engine,
            "--medusa-model",
            c.engine,
            "--prompts",
            c.prompts,
            "--trials",
            "0",
            "--out",
            c.out / "s.json",
        ],
        lambda c: "--trials and --max-tokens must be >= 1, --warmup and --medusa-temperature >= 0",
    ),
    (
        "promote: candidate is not an engine",
        lambda c: [
            "promote",
            "--candidate",
            c.bad["heads2"],
            "--report",
            c.bad["mmlu"],
            "--baseline",
            c.bad["mmlu"],
            "--to",
            c.out / "reg",
        ],
        lambda c: f"{c.bad['heads2']}: not an engine directory (no medusa_forge.json); run `medusa-forge build` first",
    ),
    (
        "promote: partial report",
        lambda c: [
            "promote",
            "--candidate",
            c.engine,
            "--report",
            c.bad["partial"],
            "--baseline",
            c.bad["mmlu"],
            "--to",
            c.out / "reg",
        ],
        lambda c: (
            f"{c.bad['partial']}: partial results (1 items), not a finished run; rerun the same `medusa-forge eval` "
            "command to resume and complete it"
        ),
    ),
    (
        "promote: no report or baseline",
        lambda c: ["promote", "--candidate", c.engine, "--to", c.out / "reg"],
        lambda c: "promote needs --report, --baseline (or --rollback)",
    ),
]

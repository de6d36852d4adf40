"""The engine options every command that opens or builds an engine shares, declared once.

Each option keeps its names (TensorRT-LLM's spellings as aliases) and parameter name here; a
command may word its help for its own use. ``engine_options`` is the set ``generate``, ``bench``,
``triton-repo`` and ``eval --in-process`` take, in the order ``build.open.open_engine`` takes them.

One rule for Medusa everywhere: an engine's heads are used unless ``--no-medusa``.
"""

from __future__ import annotations

import click

from medusa_forge.cli_options import with_options

MODEL_HELP = "Native engine dir (from `build`) or HF checkpoint dir (TensorRT-LLM's --model_dir)."
MEDUSA_HELP = "Medusa heads directory (FasterDecoding layout; an engine dir brings its own)."
TREE_HELP = "Choice tree: preset name, JSON file, or JSON list (default: the engine's, else mc_sim_7b_63)."
DEVICE_HELP = "cuda or cpu (default: cuda when available)."
DTYPE_HELP = "float32|bfloat16|float16 (default: the engine's, else bf16 on CUDA, fp32 on CPU)."
MAX_SEQ_LEN_HELP = "KV cache length: prompt + new tokens + tree (default: the engine's, else 2048)."
COMPILE_HELP = "torch.compile the decoding steps (CUDA) before graph capture."
NO_MEDUSA_HELP = "Plain decoding with the base model of the same engine (default: Medusa when it has heads)."


def model_option(help: str = MODEL_HELP, required: bool = True, aliases: tuple[str, ...] = ("--model_dir",)):
    return click.option("--model", *aliases, "model", required=required, type=click.Path(), help=help)


def medusa_option(help: str = MEDUSA_HELP, required: bool = False):
    return click.option(
        "--medusa", "--medusa_model_dir", "medusa", required=required, type=click.Path(), default=None, help=help
    )


def tree_option(help: str = TREE_HELP):
    return click.option("--medusa-choices", "--medusa_choices", "tree", default=None, help=help)


def device_option(help: str = DEVICE_HELP):
    return click.option("--device", default=None, help=help)


def dtype_option(help: str = DTYPE_HELP, default: str | None = None, show_default: bool = False, type=None):
    return click.option("--dtype", default=default, show_default=show_default, type=type, help=help)


def max_seq_len_option(help: str | None = MAX_SEQ_LEN_HELP, alias: str = "--max_seq_len", default: int | None = None):
    """``alias``: TensorRT-LLM's name, or FasterDecoding's --model_max_length for training."""
    return click.option(
        "--max-seq-len", alias, "max_seq_len", default=default, show_default=default is not None, type=int, help=help
    )


def compile_option(help: str = COMPILE_HELP):
    return click.option("--compile/--no-compile", "compile_", default=False, show_default=True, help=help)


def no_medusa_option(help: str = NO_MEDUSA_HELP):
    return click.option("--no-medusa", is_flag=True, help=help)


def opening_options(note: str = "") -> list:
    """--medusa .. --compile (no --model), each help prefixed by ``note`` (e.g. ``--in-process: ``)."""
    return [
        medusa_option(note + MEDUSA_HELP),
        tree_option(note + TREE_HELP),
        device_option(note + DEVICE_HELP),
        dtype_option(note + DTYPE_HELP),
        max_seq_len_option(note + MAX_SEQ_LEN_HELP),
        compile_option(note + COMPILE_HELP),
    ]


def engine_options(fn):
    """--model/--medusa/--medusa-choices/--device/--dtype/--max-seq-len/--compile, as open_engine takes them."""
    return with_options([model_option(aliases=("--model_dir", "--engine")), *opening_options()])(fn)


def uses_heads(engine, no_medusa: bool) -> bool:
    """Medusa decoding when the engine has heads (and a tree) and --no-medusa was not given."""
    return engine.tree is not None and not no_medusa

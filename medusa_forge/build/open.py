"""Open any artifact the native engine runs: a native engine directory, a HF model directory (plus
heads), or a TensorRT-LLM Medusa checkpoint (``medusa-forge convert trtllm`` output)."""

from __future__ import annotations

from pathlib import Path

from medusa_forge.convert.trtllm_reader import is_trtllm_checkpoint, load_trtllm_checkpoint
from medusa_forge.engine.load import load_engine, start_engine
from medusa_forge.engine.medusa_engine import MedusaEngine
from medusa_forge.heads.checkpoint import load_heads
from medusa_forge.model.dtypes import resolve_device_dtype
from medusa_forge.tree.choice_tree import ChoiceTree


def open_engine(
    path: str | Path,
    medusa_dir: str | Path | None = None,
    tree: str | ChoiceTree | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_seq_len: int | None = None,
    compile: bool = False,
    cuda_graphs: bool | None = None,
    fp8_emulate: bool | None = None,
    with_heads: bool = True,
) -> MedusaEngine:
    """``load_engine`` for engine and HF directories; a TensorRT-LLM checkpoint brings its base model
    and heads in its rank files (``medusa_dir`` replaces those heads). The first seven arguments are
    the shared engine CLI options in their order (``medusa_forge.engine.options``)."""
    if not is_trtllm_checkpoint(path):
        return load_engine(
            path,
            medusa_dir,
            tree,
            device=device,
            dtype=dtype,
            max_seq_len=max_seq_len,
            cuda_graphs=cuda_graphs,
            compile=compile,
            fp8_emulate=fp8_emulate,
            with_heads=with_heads,
        )
    ckpt = load_trtllm_checkpoint(path, device, dtype, fp8_emulate)
    heads = ckpt.heads if with_heads else None
    if medusa_dir is not None and with_heads:
        dev, dt = resolve_device_dtype(device, ckpt.dtype)
        heads = load_heads(
            medusa_dir, ckpt.model.config.hidden_size, ckpt.model.config.vocab_size, dtype=dt, device=dev
        )
    return start_engine(ckpt.model, heads, tree, path, max_seq_len, cuda_graphs, compile)


def open_with_options(path: str | Path, options: dict, with_heads: bool = True) -> MedusaEngine:
    """``open_engine`` with the engine options as a command receives them (``engine.options.opening_options``:
    medusa, tree, device, dtype, max_seq_len, compile_)."""
    o = options
    return open_engine(
        path, o["medusa"], o["tree"], o["device"], o["dtype"], o["max_seq_len"], o["compile_"], with_heads=with_heads
    )

"""Assemble an engine from a HF model directory and optional Medusa heads."""

from __future__ import annotations

from pathlib import Path

import torch

from medusa_forge.engine.medusa_engine import MedusaEngine
from medusa_forge.engine.tokenizer import Tokenizer
from medusa_forge.errors import ForgeError
from medusa_forge.heads.checkpoint import load_heads
from medusa_forge.model.checkpoint import load_hf_model, parse_dtype
from medusa_forge.tree.choice_tree import ChoiceTree


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """bf16 on CUDA, fp32 on CPU unless asked otherwise."""
    dev = torch.device(device) if device else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ForgeError("--device cuda requested but no CUDA device is available")
    dt = parse_dtype(dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return dev, dt


def load_engine(model_dir: str | Path, medusa_dir: str | Path | None = None, tree: str | ChoiceTree = "mc_sim_7b_63",
                device: str | None = None, dtype: str | None = None, max_seq_len: int = 2048,
                cuda_graphs: bool | None = None, compile: bool = False) -> MedusaEngine:
    dev, dt = resolve_device_dtype(device, dtype)
    model = load_hf_model(model_dir, dtype=dt, device=dev)
    heads = None
    if medusa_dir is not None:
        heads = load_heads(medusa_dir, model.config.hidden_size, model.config.vocab_size, dtype=dt, device=dev)
    choice_tree = tree if isinstance(tree, ChoiceTree) else ChoiceTree.parse(tree)
    tokenizer = Tokenizer(model_dir)
    return MedusaEngine(model, heads, choice_tree, tokenizer, max_seq_len=max_seq_len,
                        cuda_graphs=cuda_graphs, compile=compile)

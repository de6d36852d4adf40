"""Resumable training state in ``<out>.ckpt/``: the prepared data once, the heads and optimizer per save.

``data.pt`` holds the tokenised (and, with self-distillation, generated) examples, so a resumed run
trains on exactly the same data without regenerating it; ``state.pt`` holds step, heads, AdamW
moments and the loss history. Each file is written to a temporary sibling and renamed into place,
so a crash mid-save leaves the previous checkpoint intact. Files are read with
``torch.load(weights_only=True)``: plain tensors and containers only, never arbitrary pickles.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from medusa_forge.errors import ForgeError
from medusa_forge.heads.medusa_head import MedusaHeadsConfig
from medusa_forge.train.data import Example, examples_from_tensors, examples_to_tensors

STATE_FILE = "state.pt"
DATA_FILE = "data.pt"
FORMAT_VERSION = 1


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _load(path: Path) -> dict:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is one user-facing line
        raise ForgeError(
            f"{path}: unreadable training checkpoint ({type(e).__name__}: {e}); start over with --overwrite"
        ) from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_VERSION:
        raise ForgeError(
            f"{path}: not a train-heads checkpoint of format {FORMAT_VERSION}; start over with --overwrite"
        )
    return obj


def save_data(ckpt: Path, train: list[Example], val: list[Example], evals: list[Example], meta: dict) -> None:
    """The prepared examples: training, held-out split, and eval-prompt continuations."""
    _atomic_save(
        {
            "format": FORMAT_VERSION,
            "train": examples_to_tensors(train),
            "val": examples_to_tensors(val),
            "eval": examples_to_tensors(evals),
            "meta": meta,
        },
        ckpt / DATA_FILE,
    )


def load_data(ckpt: Path) -> tuple[list[Example], list[Example], list[Example], dict] | None:
    path = ckpt / DATA_FILE
    if not path.is_file():
        return None
    d = _load(path)
    return (
        examples_from_tensors(d["train"]),
        examples_from_tensors(d["val"]),
        examples_from_tensors(d["eval"]),
        d["meta"],
    )


def save_state(ckpt: Path, state: dict) -> None:
    _atomic_save({"format": FORMAT_VERSION, **state}, ckpt / STATE_FILE)


def load_state(ckpt: Path) -> dict | None:
    path = ckpt / STATE_FILE
    return _load(path) if path.is_file() else None


def check_resumable(state: dict, cfg: MedusaHeadsConfig, where: Path) -> None:
    """The checkpoint's heads must fit the base model and the requested head shape exactly."""
    saved = state["heads_config"]
    for key, flag in (
        ("hidden_size", "base model hidden size"),
        ("vocab_size", "base model vocab size"),
        ("num_heads", "--num-heads"),
        ("num_layers", "--num-layers"),
        ("shared_lm_head", "--shared-lm-head"),
    ):
        if saved[key] != getattr(cfg, key):
            raise ForgeError(
                f"{where}: cannot resume: checkpoint has {key}={saved[key]} but this run has "
                f"{getattr(cfg, key)} ({flag}); resume with the original --model and head flags, "
                "or start over with --overwrite"
            )

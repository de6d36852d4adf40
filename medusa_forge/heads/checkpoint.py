"""Medusa heads on disk, in the FasterDecoding layout that TGI also loads.

Directory: ``config.json`` (``medusa_num_heads``, ``medusa_num_layers``,
``base_model_name_or_path``, optional ``version``) and ``medusa_lm_head.safetensors`` (or the
older ``medusa_lm_head.pt``, read with ``torch.load(weights_only=True)`` only). Keys are bare: for
head k and block j < L: ``{k}.{j}.linear.weight`` [H, H] and ``{k}.{j}.linear.bias`` [H]; the
head's vocab projection is ``{k}.{L}.weight`` [V, H]. "Version 2" heads have no ``{k}.{L}.weight``
and use the base ``lm_head`` (as in TGI's fallback).

FasterDecoding's reference model builds ``[ResBlock(h)] * L``, one module repeated, so with L > 1
its checkpoints store L copies of the same tensors; we read each ``{k}.{j}`` independently, which
loads such files exactly and also loads heads whose blocks really differ.
Matched against FasterDecoding/Medusa ``medusa/model/medusa_model.py`` (MedusaModelABC,
``medusa_head`` = ModuleList of Sequential(*[ResBlock]*L, Linear(H, V, bias=False))).

``load_heads`` accepts every layout ``heads/layouts`` reads (FasterDecoding, axolotl full model, vLLM),
detected from the directory; ``save_heads`` writes this FasterDecoding layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from medusa_forge.heads.layouts import HeadsCheckpoint, collect, detect
from medusa_forge.heads.layouts.collect import MAX_HEADS, named_tensors
from medusa_forge.heads.layouts.fasterdecoding import HEADS_PT, HEADS_SAFETENSORS, heads_config
from medusa_forge.heads.layouts.keys import FASTERDECODING
from medusa_forge.heads.layouts.store import write_safetensors
from medusa_forge.heads.medusa_head import MedusaHeads

__all__ = [
    "HEADS_SAFETENSORS",
    "HEADS_PT",
    "MAX_HEADS",
    "heads_to_fasterdecoding",
    "read_heads_config",
    "load_heads",
    "save_heads",
]


def heads_to_fasterdecoding(heads: MedusaHeads) -> dict[str, Tensor]:
    """Our stacked tensors -> FasterDecoding's per-head key names."""
    sd = named_tensors(HeadsCheckpoint.from_module(heads), FASTERDECODING)
    return {name: t.detach().contiguous().cpu() for name, t in sd.items()}


def read_heads_config(heads_dir: Path) -> dict:
    """The heads' config.json with ``medusa_num_heads``/``medusa_num_layers`` filled in and validated, whichever
    layout declares them (vLLM's ``num_heads``/``num_hidden_layers``, TensorRT-LLM's ``num_medusa_heads``), so
    callers that only need the counts (``build``'s tree check) accept every layout ``load_heads`` does."""
    src = detect(heads_dir)
    return {**src.config, "medusa_num_heads": src.num_heads, "medusa_num_layers": src.num_layers}


def load_heads(
    heads_dir: str | Path, hidden_size: int, vocab_size: int, dtype: torch.dtype = torch.float32, device="cpu"
) -> MedusaHeads:
    """Load heads in any supported layout and check them against the base model's sizes."""
    src = detect(heads_dir)
    return collect(src, hidden_size, vocab_size).to_module(hidden_size, vocab_size, dtype, device)


def save_heads(heads: MedusaHeads, out_dir: str | Path, extra_config: dict | None = None) -> None:
    """Write FasterDecoding-layout files into ``out_dir`` (callers wrap this in atomic_output_dir).

    ``medusa_lm_head.safetensors`` (what TGI and FasterDecoding's trainers use) and the config fields every
    FasterDecoding-style loader reads (``fasterdecoding.heads_config``), plus ``extra_config``.
    """
    out_dir = Path(out_dir)
    ckpt = HeadsCheckpoint.from_module(heads)
    write_safetensors(named_tensors(ckpt, FASTERDECODING), out_dir / HEADS_SAFETENSORS)
    conf = heads_config(ckpt, heads.config.base_model_name_or_path) | (extra_config or {})
    (out_dir / "config.json").write_text(json.dumps(conf, indent=2) + "\n")

"""Shared fixtures: the real pycoder-26m checkpoint from ../shared and heads made from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MEDUSA_FORGE_SHARED", REPO.parent / "shared"))
MODEL_DIR = SHARED / "models" / "pycoder-26m"
PROMPTS = SHARED / "data" / "code_prompts.jsonl"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "config.json").is_file():
        pytest.fail(f"reference checkpoint missing: {MODEL_DIR} (../shared must sit beside the repo)")
    return MODEL_DIR


@pytest.fixture(scope="session")
def prompts_path() -> Path:
    return PROMPTS


@pytest.fixture(scope="session")
def held_out_prompts() -> list[dict]:
    return [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]


def make_heads(model_dir: Path, out_dir: Path, num_heads: int = 4, num_layers: int = 1, seed: int = 0,
               noise: float = 0.02) -> Path:
    """Medusa-1 initialisation (projections from lm_head) plus random ResBlock weights: "random heads"."""
    from medusa_forge.heads.checkpoint import save_heads
    from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig
    from medusa_forge.model.checkpoint import load_hf_model

    model = load_hf_model(model_dir)
    cfg = model.config
    heads = MedusaHeads.from_lm_head(
        MedusaHeadsConfig(num_heads, num_layers, cfg.hidden_size, cfg.vocab_size, base_model_name_or_path=str(model_dir)),
        model.lm_head.weight)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        heads.res_weight.normal_(0, noise, generator=g)
        heads.res_bias.normal_(0, noise, generator=g)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_heads(heads, out_dir)
    return out_dir


@pytest.fixture(scope="session")
def heads_dir(model_dir, tmp_path_factory) -> Path:
    """Random 4-head, 1-layer heads for pycoder-26m in the FasterDecoding layout."""
    return make_heads(model_dir, tmp_path_factory.mktemp("heads"))

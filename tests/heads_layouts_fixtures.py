"""Fixtures shared by the heads-layout tests: the ``heads_dir`` heads as v1 and as bfloat16 "version 2"
heads, and every variant exported to every target layout (pycoder-26m sizes)."""

from __future__ import annotations

import pytest
import torch

from medusa_forge.heads.checkpoint import load_heads, save_heads
from medusa_forge.heads.layouts import TARGETS, export_heads, read
from medusa_forge.heads.layouts.base import BaseModel
from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig

H, V, K, L = 512, 8192, 4, 1
TARGET_LAYOUT = {
    "fasterdecoding": "fasterdecoding",
    "tgi": "fasterdecoding",
    "trtllm-medusa-dir": "fasterdecoding",
    "vllm": "vllm",
    "axolotl": "axolotl",
}


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lm_head(model_dir):
    return BaseModel.open(model_dir).lm_head()


@pytest.fixture(scope="module")
def v2_dir(heads_dir, tmp_path_factory):
    """The fixture heads' ResBlocks as "version 2" heads (no projections, the base lm_head instead), stored in
    bfloat16 like pycoder-26m itself, so every layout must also keep the stored dtype."""
    v1 = load_heads(heads_dir, H, V)
    v2 = MedusaHeads(
        MedusaHeadsConfig(K, L, H, V, shared_lm_head=True, base_model_name_or_path=v1.config.base_model_name_or_path)
    )
    with torch.no_grad():
        v2.res_weight.copy_(v1.res_weight)
        v2.res_bias.copy_(v1.res_bias)
    out = tmp_path_factory.mktemp("heads_v2")
    save_heads(v2.to(torch.bfloat16), out)
    return out


@pytest.fixture(scope="module")
def sources(heads_dir, v2_dir):
    return {"v1": heads_dir, "v2": v2_dir}


@pytest.fixture(scope="module")
def exported(sources, model_dir, tmp_path_factory):
    """Every variant in every target layout, written by ``heads export`` with the base model."""
    root = tmp_path_factory.mktemp("exported")
    return {
        (variant, target): export_heads(src, target, root / f"{variant}-{target}", base_model=model_dir)
        and root / f"{variant}-{target}"
        for variant, src in sources.items()
        for target in TARGETS
    }


def tensors_of(directory):
    _, ckpt = read(directory)
    return ckpt

"""The native FP8 checkpoint written by ``build native --dtype fp8``: static activation scales
calibrated on prompts, and the HF-named tensors and ``quantization_config`` of the layout that
``model/fp8_linear.py`` opens."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from medusa_forge.errors import ForgeError
from medusa_forge.model.forward import full_pass
from medusa_forge.model.fp8_linear import FP8_MAX, FP8Linear, linear_names, native_sources
from medusa_forge.model.llama import Transformer


@torch.inference_mode()
def calibrate_input_scales(model: Transformer, token_lists: Iterable[list[int]]) -> dict[str, float]:
    """Static activation scales: amax of each GEMM's input over full passes on calibration text / 448."""
    amax: dict[str, float] = {}
    hooks = []
    for name in linear_names(model):

        def record(module, args, name=name):
            amax[name] = max(amax.get(name, 0.0), float(args[0].detach().abs().amax()))

        hooks.append(model.get_submodule(name).register_forward_pre_hook(record))
    try:
        for ids in token_lists:
            full_pass(model, ids)
    finally:
        for h in hooks:
            h.remove()
    if not amax:
        raise ForgeError("FP8 calibration saw no tokens; give calibration prompts (--calib-prompts)")
    return {k: max(v, 1e-8) / FP8_MAX for k, v in amax.items()}


def quantization_config(activation: str) -> dict:
    return {"quant_method": "fp8", "activation_scheme": activation, "ignored_layers": ["lm_head"]}


def fp8_hf_tensors(model: Transformer, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """HF-named tensors (weight, weight_scale, input_scale) for every FP8Linear of ``model``."""
    sources = native_sources(model.config, shapes)
    out: dict[str, Tensor] = {}
    for name in linear_names(model):
        module = model.get_submodule(name)
        if not isinstance(module, FP8Linear):
            continue
        row = 0
        for hf_name, rows in sources[name + ".weight"]:
            stem = hf_name.removesuffix(".weight")
            out[hf_name] = module.weight[row : row + rows].cpu().clone()
            out[stem + ".weight_scale"] = module.weight_scale.reshape(()).cpu().clone()
            if module.input_scale is not None:
                out[stem + ".input_scale"] = module.input_scale.reshape(()).cpu().clone()
            row += rows
    return out

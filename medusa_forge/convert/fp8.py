"""FP8 scales for a TensorRT-LLM checkpoint, calibrated by running prompts through our own decoder.

What TensorRT-LLM v0.11's FP8 recipe computes (``examples/quantization/quantize.py --qformat fp8``: ModelOpt
``FP8_DEFAULT_CFG``, "max" calibration) and what we reproduce:

- per-tensor weight scale ``weights_scaling_factor = amax(|W|) / 448`` of the *unsplit* weight, the weight
  stored as ``float8_e4m3fn(W / scale)`` (``model.fp8_linear.quantize_tensor``, the same rounding our native FP8
  engine uses);
- per-tensor static activation scale ``activation_scaling_factor = amax(|x|) / 448``, x the linear's input,
  maxed over the calibration prompts (``convert.fp8_native.calibrate_input_scales``: forward pre-hooks on the block
  GEMMs while each prompt runs through the native ``Transformer``). Upstream takes ``--calib_size 512``
  samples of ``--calib_max_seq_length 512`` tokens; we take the first ``--calib-size`` prompts of a JSONL file;
- optional FP8 KV cache: ``kv_cache_scaling_factor = max(amax|k|, amax|v|) / 448`` of the k/v projection
  outputs (ModelOpt's ``k_proj``/``v_proj`` output quantizers, before RoPE).

q/k/v share an input and one TensorRT-LLM ``qkv`` module; its weight gets one scale over the fused rows
(ModelOpt's export fuses q/k/v with the max of their scales, which is the amax of the fused weight).
``fc`` and ``gate`` share an input too but are separate modules, each with its own weight scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from medusa_forge.convert.fp8_native import calibrate_input_scales
from medusa_forge.errors import ForgeError
from medusa_forge.model.fp8_linear import FP8_MAX, quantize_tensor
from medusa_forge.model.llama import Transformer


@dataclass
class Calibration:
    """Static activation scales per native GEMM (``layers.0.attn.wqkv`` ...) and KV-cache scales per layer."""

    input_scales: dict[str, float]
    kv_scales: dict[int, float] = field(default_factory=dict)
    sequences: int = 0
    tokens: int = 0

    def summary(self) -> dict:
        scales = list(self.input_scales.values())
        return {
            "sequences": self.sequences,
            "tokens": self.tokens,
            "activation_scale_min": min(scales),
            "activation_scale_max": max(scales),
        }


def calibration_tokens(tokenizer, prompts_path: str | Path, calib_size: int, max_len: int) -> list[list[int]]:
    """The first ``calib_size`` prompts of a JSONL file, tokenized, each cut to its first ``max_len`` tokens."""
    from medusa_forge.prompts import read_prompts

    if calib_size < 1 or max_len < 2:
        raise ForgeError(f"--calib-size must be >= 1 and --calib-max-seq-len >= 2 (got {calib_size}, {max_len})")
    prompts = read_prompts(prompts_path, limit=calib_size)
    if not prompts:
        raise ForgeError(f"{prompts_path}: no calibration prompts")
    return [tokenizer.encode(p.prompt)[:max_len] for p in prompts]


def _amax(t: Tensor) -> float:
    return float(t.detach().abs().amax().float()) if t.numel() else 0.0


@torch.inference_mode()
def calibrate(model: Transformer, token_lists: list[list[int]], kv_cache: bool = False) -> Calibration:
    """Run the prompts once through ``model`` and record every scale an FP8 checkpoint needs."""
    cfg = model.config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    kv_amax: dict[int, float] = {}
    hooks = []
    if kv_cache:
        for i, layer in enumerate(model.layers):

            def kv_hook(module, args, out, i=i):
                kv_amax[i] = max(kv_amax.get(i, 0.0), _amax(out[..., q : q + kv]), _amax(out[..., q + kv :]))

            hooks.append(layer.attn.wqkv.register_forward_hook(kv_hook))
    try:
        scales = calibrate_input_scales(model, token_lists)
    finally:
        for h in hooks:
            h.remove()
    return Calibration(
        scales,
        {i: max(a, 1e-8) / FP8_MAX for i, a in kv_amax.items()},
        sequences=len(token_lists),
        tokens=sum(map(len, token_lists)),
    )


def quantize_weight(w: Tensor, dtype: torch.dtype) -> tuple[Tensor, float]:
    """(float8 weight, scale) of ``w`` as the checkpoint dtype holds it (ModelOpt quantizes the loaded model)."""
    w8, scale = quantize_tensor(w.detach().to(dtype).float())
    return w8, float(scale)

"""FP8 (e4m3) linear layers for the native engine, and opening the FP8 checkpoint layout they load from.

Calibrating static scales and writing this layout: ``convert/fp8_native.py``.

What is quantized: the four GEMMs of every decoder block (``attn.wqkv``, ``attn.wo``,
``ffn.w_gate_up``, ``ffn.w_down``), which hold nearly all of a Llama's weight bytes. The embedding,
the final ``lm_head`` and the Medusa heads stay in the compute dtype (TensorRT-LLM's Medusa FP8 recipe
keeps the heads unquantized too: ``quantization.exclude_modules`` lists ``*medusa_heads*``).

Numerics: one scale per weight tensor (``amax / 448``); activations are scaled either
``dynamic`` — one scale per token row, computed on the fly, so a token's result does not depend on
which other tokens share its batch (tree verification stays exact w.r.t. plain decoding) — or
``static`` — one calibrated scale per tensor (faster: no amax reduction per GEMM).

Backends: ``scaled_mm`` runs ``torch._scaled_mm`` on FP8 tensor cores (H100; per-token scaling needs
compute capability 9.0, per-tensor 8.9). ``emulate`` reproduces the same rounding in software
(quantize to e4m3, dequantize, fp32 GEMM) and is used only when asked for (``--fp8-emulate``),
never as a silent fallback.

On disk (``model/`` of an fp8 engine) we use the per-tensor FP8 layout vLLM loads
(vllm/model_executor/layers/quantization/fp8.py, ``Fp8Config``/``Fp8LinearMethod``): HF tensor names,
``*.weight`` as float8_e4m3fn, ``*.weight_scale`` (fp32 scalar per shard), ``*.input_scale`` for
static activations, and ``quantization_config = {"quant_method": "fp8", "activation_scheme": ..,
"ignored_layers": ["lm_head"]}`` in config.json. Shards that we fuse (q/k/v, gate/up) are written with
one shared scale so fusing them at load is exact.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medusa_forge import kernels
from medusa_forge.errors import ForgeError
from medusa_forge.model.checkpoint import (
    checkpoint_files,
    expected_hf_shapes,
    hf_to_native,
    read_tensor_headers,
    tensor_getter,
)
from medusa_forge.model.config import ModelConfig
from medusa_forge.model.dtypes import resolve_device_dtype
from medusa_forge.model.llama import Transformer

E4M3 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(E4M3).max)  # 448
QUANTIZED_LINEARS = ("attn.wqkv", "attn.wo", "ffn.w_gate_up", "ffn.w_down")
ACTIVATION_SCHEMES = ("dynamic", "static")
BACKENDS = ("scaled_mm", "emulate")


# ---------------------------------------------------------------------------------------------- device
def fp8_backend(device: torch.device | str, emulate: bool, activation: str = "dynamic") -> str:
    """Pick the FP8 backend for ``device``; refuse (one line) when real FP8 GEMMs are impossible."""
    if activation not in ACTIVATION_SCHEMES:
        raise ForgeError(f"unknown FP8 activation scheme {activation!r}; choose one of {', '.join(ACTIVATION_SCHEMES)}")
    if emulate:
        return "emulate"
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ForgeError(
            "fp8 needs a CUDA GPU with FP8 tensor cores (H100 or newer); this machine has none "
            "- pass --fp8-emulate to emulate FP8 numerics in software (slow; for checks only)"
        )
    need = (9, 0) if activation == "dynamic" else (8, 9)
    cap = torch.cuda.get_device_capability(device)
    if cap < need:
        raise ForgeError(
            f"fp8 with {activation} activation scales needs compute capability "
            f"{need[0]}.{need[1]}+, this GPU has {cap[0]}.{cap[1]}; "
            "use --fp8-activation static (8.9+) or --fp8-emulate"
        )
    return "scaled_mm"


# ---------------------------------------------------------------------------------------------- layer
def quantize_tensor(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tensor e4m3 quantization: (w_fp8, scale) with w ~= w_fp8 * scale and amax -> 448."""
    scale = (w.detach().abs().amax().float() / FP8_MAX).clamp_min(1e-12)
    return (w.detach().float() / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3), scale


def gemm_shape_ok(out_features: int, in_features: int) -> bool:
    """``torch._scaled_mm`` needs both GEMM dims of the weight divisible by 16."""
    return out_features % 16 == 0 and in_features % 16 == 0


@dataclass(frozen=True)
class FP8Activation:
    """A GEMM input already quantized by the launch that produced it (see ``FP8Linear.normed_input``):
    e4m3 rows ``q`` [M, K], their scale (the static 0-d one or dynamic [M, 1]), the input's shape."""

    q: Tensor
    scale: Tensor
    shape: tuple[int, ...]


class FP8Linear(nn.Module):
    """y = x W^T + b with W in e4m3 (one scale) and x quantized per token (dynamic) or per tensor (static).

    A bias (Qwen2's q/k/v) stays in the compute dtype and is added after the scaled GEMM, as TensorRT-LLM's
    FP8 linear adds its bias to the dequantized output: quantizing it would gain nothing (it is a vector)."""

    def __init__(
        self,
        weight_fp8: Tensor,
        weight_scale: Tensor,
        input_scale: Tensor | None,
        out_dtype: torch.dtype,
        backend: str,
        bias: Tensor | None = None,
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown FP8 backend {backend!r}")
        if weight_fp8.dtype != E4M3:
            raise ValueError(f"FP8Linear expects a float8_e4m3fn weight, got {weight_fp8.dtype}")
        self.out_features, self.in_features = weight_fp8.shape
        self.out_dtype, self.backend = out_dtype, backend
        dev = weight_fp8.device
        self.register_buffer("weight", weight_fp8.contiguous())
        self.register_buffer("weight_scale", weight_scale.detach().float().reshape(()).to(dev))
        self.register_buffer(
            "input_scale", None if input_scale is None else input_scale.detach().float().reshape(()).to(dev)
        )
        # Row-wise _scaled_mm (per-token activations) takes the weight scale as a [1, N] vector.
        self.register_buffer("weight_scale_row", self.weight_scale.expand(1, self.out_features).contiguous())
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"FP8Linear bias has shape {list(bias.shape)}, expected [{self.out_features}]")
        self.register_buffer("bias", None if bias is None else bias.detach().to(device=dev, dtype=out_dtype))
        self._dequantized: Tensor | None = None  # emulate: e4m3 weight * scale in fp32, made once

    def dequantized_weight(self) -> Tensor:
        """The weight exactly as the FP8 GEMM sees it (e4m3 value x scale), in fp32; cached for emulation."""
        if self._dequantized is None or self._dequantized.device != self.weight.device:
            self._dequantized = self.weight.float() * self.weight_scale
        return self._dequantized

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: str, input_scale: Tensor | None = None) -> FP8Linear:
        w_fp8, scale = quantize_tensor(linear.weight)
        return cls(w_fp8, scale, input_scale, linear.weight.dtype, backend, linear.bias)

    @property
    def activation(self) -> str:
        return "dynamic" if self.input_scale is None else "static"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"activation={self.activation}, backend={self.backend}, out_dtype={self.out_dtype}, "
            f"bias={self.bias is not None}"
        )

    def normed_input(self, norm: nn.Module, x: Tensor, delta: Tensor | None) -> tuple[FP8Activation, Tensor] | None:
        """(norm(x [+ delta]) quantized for this GEMM, x [+ delta]) in one launch on CUDA (the norm
        writes e4m3 rows instead of bf16 ones for a separate quantize launch to read), or None where
        that path does not apply. The bits are those of the unfused norm + quantize."""
        if self.backend != "scaled_mm" or not kernels.use_triton(x) or (delta is not None and delta.requires_grad):
            return None
        q, scale, res = kernels.rms_norm_fp8_triton(x, norm.weight, norm.eps, self.input_scale, delta)
        return FP8Activation(q, scale, tuple(x.shape)), (x if res is None else res)

    def activated_input(self, gate_up: Tensor) -> FP8Activation | None:
        """silu(gate) * up of the fused [gate | up] projection, quantized for this GEMM in one launch
        on CUDA (the bits of silu_mul then quantize), or None where that path does not apply."""
        if self.backend != "scaled_mm" or not kernels.use_triton(gate_up) or gate_up.stride(-1) != 1:
            return None
        q, scale = kernels.silu_mul_fp8_triton(gate_up, self.input_scale)
        return FP8Activation(q, scale, (*gate_up.shape[:-1], gate_up.shape[-1] // 2))

    def forward(self, x: Tensor | FP8Activation) -> Tensor:
        y = self._gemm(x)
        return y if self.bias is None else y + self.bias

    def _gemm(self, x: Tensor | FP8Activation) -> Tensor:
        if (
            not isinstance(x, FP8Activation)
            and self.backend == "scaled_mm"
            and kernels.use_triton(x)
            and x.stride(-1) == 1
        ):
            # one fused launch for the activation quantization (the ops below are four)
            x = FP8Activation(
                *kernels.quantize_fp8_triton(x.reshape(-1, self.in_features), self.input_scale), tuple(x.shape)
            )
        if isinstance(x, FP8Activation):
            scale_b = self.weight_scale_row if self.input_scale is None else self.weight_scale
            y = torch._scaled_mm(x.q, self.weight.t(), scale_a=x.scale, scale_b=scale_b, out_dtype=self.out_dtype)
            return y.reshape(*x.shape[:-1], self.out_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if self.input_scale is None:
            # times the reciprocal, as torch's CUDA division by a scalar computes it (the CPU one
            # divides): one rounding rule on every device, which the fused Triton launch also uses
            sx = (x2.abs().amax(dim=-1, keepdim=True) * (1.0 / FP8_MAX)).clamp_min(1e-12)  # [M, 1]
        else:
            sx = self.input_scale
        xq = (x2 / sx).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
        if self.backend == "emulate":
            # Row by row: a GEMM's row may change with M (MKL's M=1 path is not its M=64 one), and
            # e4m3 rounding turns that last-bit difference into a different greedy token, so a
            # tree step would not reproduce plain decoding. One-row GEMMs make every token's bits
            # independent of its batch; emulation is for tests and CPUs, never the fast path.
            xd, w = xq.float() * sx, self.dequantized_weight()
            y = torch.cat([F.linear(xd[i : i + 1], w) for i in range(xd.shape[0])]).to(self.out_dtype)
        elif self.input_scale is None:
            y = torch._scaled_mm(
                xq, self.weight.t(), scale_a=sx, scale_b=self.weight_scale_row, out_dtype=self.out_dtype
            )
        else:
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.weight_scale, out_dtype=self.out_dtype)
        return y.reshape(*lead, self.out_features)


# ---------------------------------------------------------------------------------------------- model
def linear_names(model: Transformer) -> list[str]:
    """Module paths of the quantizable GEMMs, e.g. ``layers.0.attn.wqkv``."""
    return [f"layers.{i}.{name}" for i in range(len(model.layers)) for name in QUANTIZED_LINEARS]


def swap_linears(
    model: Transformer, backend: str, input_scales: dict[str, float] | None = None, keep: Iterable[str] = ()
) -> list[str]:
    """Replace the block GEMMs by FP8Linear in place; returns the names swapped.

    ``input_scales`` (module path -> scale) selects static activation scaling; None is dynamic.
    ``keep`` lists GEMM kinds (e.g. ``attn.wqkv``) left in the compute dtype, a quality knob.
    GEMMs whose dims are not multiples of 16 stay in the compute dtype (``_scaled_mm`` cannot run them).
    lm_head, the embedding and the Medusa heads are never touched.
    """
    keep = tuple(keep)
    unknown = [k for k in keep if k not in QUANTIZED_LINEARS]
    if unknown:
        raise ForgeError(f"--fp8-keep {unknown[0]!r}: choose among {', '.join(QUANTIZED_LINEARS)}")
    swapped = []
    for name in linear_names(model):
        if name.endswith(keep) and keep:
            continue
        parent_name, attr = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if not isinstance(linear, nn.Linear) or not gemm_shape_ok(linear.out_features, linear.in_features):
            continue
        scale = None
        if input_scales is not None:
            scale = torch.tensor(input_scales[name], dtype=torch.float32)
        setattr(parent, attr, FP8Linear.from_linear(linear, backend, scale))
        swapped.append(name)
    return swapped


# ---------------------------------------------------------------------------------------------- layout
def native_sources(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, list[tuple[str, int]]]:
    """native tensor -> [(HF tensor, rows)], derived from the one name map by tagging rows with ids.

    Running ``hf_to_native`` on row tags tells which HF shards (and how many rows of each) a fused
    native tensor is made of, without restating the q/k/v and gate/up fusion here.
    """
    names = list(shapes)
    tagged = hf_to_native(cfg, lambda n: torch.full((shapes[n][0],), names.index(n)))
    out = {}
    for native, tags in tagged.items():
        ids, counts = torch.unique_consecutive(tags, return_counts=True)
        out[native] = [(names[i], int(c)) for i, c in zip(ids.tolist(), counts.tolist())]
    return out


def read_quantization_config(model_dir: Path) -> dict:
    config = json.loads((model_dir / "config.json").read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "fp8" or qc.get("activation_scheme") not in ACTIVATION_SCHEMES:
        raise ForgeError(
            f"{model_dir}/config.json: no FP8 quantization_config (quant_method fp8, activation_scheme "
            "dynamic|static); was this engine built with `medusa-forge build native --dtype fp8`?"
        )
    return qc


def load_fp8_model(model_dir: str | Path, compute_dtype: torch.dtype, device, backend: str) -> Transformer:
    """Load an FP8 checkpoint (the layout above) into our decoder with FP8Linear block GEMMs."""
    model_dir = Path(model_dir)
    qc = read_quantization_config(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    headers = read_tensor_headers(checkpoint_files(model_dir))
    if "lm_head.weight" not in headers and not cfg.tie_word_embeddings:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "tie_word_embeddings": True})
    shapes = expected_hf_shapes(cfg)
    for name, shape in shapes.items():
        if name not in headers:
            raise ForgeError(f"{model_dir}: tensor {name} missing from the FP8 checkpoint")
        if headers[name][1] != shape:
            raise ForgeError(
                f"{headers[name][0]}: tensor {name} has shape {list(headers[name][1])}, expected {list(shape)}"
            )
    get = tensor_getter(headers, "FP8 checkpoint")
    raw = hf_to_native(cfg, get)
    sources = native_sources(cfg, shapes)
    with torch.device("meta"):
        model = Transformer(cfg)
    linears: dict[str, FP8Linear] = {}
    for name in linear_names(model):
        weight = raw.pop(name + ".weight")
        if weight.dtype == E4M3:
            linears[name] = _fp8_linear_from_shards(
                name,
                weight,
                sources[name + ".weight"],
                get,
                headers,
                qc["activation_scheme"],
                compute_dtype,
                device,
                backend,
                raw.pop(name + ".bias", None),  # Qwen2's q/k/v bias, kept in the compute dtype
            )
        else:
            raw[name + ".weight"] = weight  # a GEMM left unquantized (dims not multiples of 16)
    model.load_state_dict(
        {k: v.to(device=device, dtype=compute_dtype) for k, v in raw.items()}, strict=False, assign=True
    )
    for name, module in linears.items():
        parent_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, module)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta and n != "rope"]
    if missing:
        raise ForgeError(f"{model_dir}: FP8 checkpoint left {missing[0]} unset")
    return model.eval().requires_grad_(False)


def _fp8_linear_from_shards(name, weight, shards, get, headers, activation, compute_dtype, device, backend, bias):
    """One FP8Linear from its fused shards; shards with different scales are requantized to the max."""
    scales = [get(hf.removesuffix(".weight") + ".weight_scale").float().reshape(()) for hf, _ in shards]
    scale = torch.stack(scales).max()
    if any(s != scale for s in scales):  # foreign checkpoint: vLLM's requantize_with_max_scale
        rows = torch.tensor([r for _, r in shards])
        per_row = torch.repeat_interleave(torch.stack(scales), rows)[:, None]
        weight = (weight.float() * per_row / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
    input_scale = None
    if activation == "static":
        keys = [hf.removesuffix(".weight") + ".input_scale" for hf, _ in shards]
        if any(k not in headers for k in keys):
            raise ForgeError(f"FP8 checkpoint: static activation scheme but {keys[0]} is missing")
        input_scale = torch.stack([get(k).float().reshape(()) for k in keys]).max()
    return FP8Linear(weight.to(device), scale, input_scale, compute_dtype, backend, bias)


def emulation_requested(emulate: bool | None) -> bool:
    """Explicit flag, else the MEDUSA_FORGE_FP8_EMULATE environment variable (for generate/serve/bench)."""
    if emulate is not None:
        return emulate
    import os

    return os.environ.get("MEDUSA_FORGE_FP8_EMULATE", "").lower() in ("1", "true", "yes")


def open_fp8_model(
    model_dir: str | Path, manifest_extra: dict, device: str | None, dtype: str | None, emulate: bool | None
) -> tuple[Transformer, str]:
    """Load an fp8 engine's ``model/`` for ``load_engine``; returns (model, compute dtype name).

    Compute dtype: an explicit non-fp8 ``dtype``, else fp32 when emulating on CPU, else the dtype the
    engine was built for (``extra.fp8.compute_dtype``, bf16 by default).
    """
    activation = read_quantization_config(Path(model_dir))["activation_scheme"]
    dev, _ = resolve_device_dtype(device, None)
    backend = fp8_backend(dev, emulation_requested(emulate), activation)
    if dtype and dtype != "fp8":
        compute = dtype
    elif dev.type == "cpu":
        compute = "float32"
    else:
        compute = (manifest_extra.get("fp8") or {}).get("compute_dtype", "bfloat16")
    _, dt = resolve_device_dtype(str(dev), compute)
    return load_fp8_model(model_dir, dt, dev, backend), compute

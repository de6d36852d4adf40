"""Dtype names and device choice: the one table every command's ``--dtype`` goes through."""

from __future__ import annotations

import torch

from medusa_forge.errors import ForgeError

# accepted spelling -> canonical name (fp8 is an engine dtype: FP8 GEMMs, compute in a torch dtype)
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "fp8": "fp8",
    "float8": "fp8",
}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def canonical_dtype(name: str) -> str:
    """The canonical name of a dtype spelling (``bf16`` -> ``bfloat16``), fp8 included."""
    try:
        return DTYPE_NAMES[name.lower()]
    except KeyError:
        raise ForgeError(f"unknown dtype {name!r}; choose one of bfloat16, float16, float32, fp8") from None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a compute dtype spelling (fp8 is not one)."""
    if isinstance(name, torch.dtype):
        return name
    canonical = DTYPE_NAMES.get(name.lower())
    if canonical not in TORCH_DTYPES:
        raise ForgeError(
            f"unknown dtype {name!r}; choose one of {', '.join(k for k, v in DTYPE_NAMES.items() if v != 'fp8')}"
        )
    return TORCH_DTYPES[canonical]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """bf16 on CUDA, fp32 on CPU unless asked otherwise."""
    dev = torch.device(device) if device else default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ForgeError("--device cuda requested but no CUDA device is available")
    dt = parse_dtype(dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return dev, dt

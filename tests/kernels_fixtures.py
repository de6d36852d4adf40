"""Helpers shared by the kernel tests (tests/test_kernels_*.py): the Triton backend, inputs, tolerances.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, jitted afresh for each
test module that imports ``triton_backend``); on a GPU machine the same tests run the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

from medusa_forge import kernels as K
from medusa_forge.kernels import _triton, attention, fp8, medusa_step, mlp, norms, rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# Small attention tiles so a 128-slot cache spans several splits and blocks (fixed for every T).
SMALL = K.AttentionConfig(split=32, block_m=16, block_n=16)
ROWS4 = K.AttentionConfig(split=32, block_m=16, block_n=16, combine_rows=4)  # combine tiles span 2 tokens here
H, KV, D, S = 4, 2, 32, 128  # 2 query heads per KV head (GQA)


@pytest.fixture(scope="module", autouse=True)
def triton_backend():
    """Compiled kernels on CUDA; otherwise Triton's interpreter, chosen when the kernels are jitted."""
    if DEVICE == "cuda":
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.setattr(_triton, "_jitted", False)
        yield
    _triton._jitted = False  # whoever launches next re-jits in the mode then active


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(actual.float(), expected.float(), **tol)


def force_triton(monkeypatch) -> None:
    """Every op takes its Triton path, CPU tensors included (the interpreter runs them): use_triton is
    replaced where each caller finds it, the package (the model's call sites) and every op module."""
    for module in (K, _triton, attention, fp8, medusa_step, mlp, norms, rope):
        if hasattr(module, "use_triton"):
            monkeypatch.setattr(module, "use_triton", lambda t: True)

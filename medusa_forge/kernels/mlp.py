"""SiLU(gate) * up of the fused gate/up projection (optionally quantized to FP8 in the same launch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medusa_forge.kernels._triton import (
    HAVE_TRITON,
    _kernel,
    _rows,
    _source,
    use_triton,
)
from medusa_forge.kernels.fp8 import _fp8_outputs, _quant_warps

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from medusa_forge.kernels._triton import _round
    from medusa_forge.kernels.fp8 import _quantize_row


def silu_mul_ref(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.split(gate_up.shape[-1] // 2, dim=-1)
    return F.silu(gate) * up


if HAVE_TRITON:

    @_source()
    def _silu_mul_kernel(GU, OUT, I, stride_gu, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < I
        tl.store(
            OUT + row * stride_o + cols, _silu_times(GU + row * stride_gu, cols, ok, I, OUT.dtype.element_ty), mask=ok
        )

    @_source()
    def _silu_times(GU_ROW, cols, ok, I, DT: tl.constexpr):
        """silu(gate) * up at ``cols`` of one fused [gate | up] row, rounded where torch rounds (SiLU's
        output, then the product)."""
        g = tl.load(GU_ROW + cols, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(GU_ROW + I + cols, mask=ok, other=0.0).to(tl.float32)
        s = _round(g / (1.0 + tl.exp(-g)), DT).to(tl.float32)
        return _round(s * u, DT)

    @_source()
    def _silu_mul_fp8_kernel(
        GU, ROUND, Q, SCALE, SOUT, I, stride_gu, stride_q, DYNAMIC: tl.constexpr, BLOCK: tl.constexpr
    ):
        """silu(gate) * up written as the down projection's e4m3 input (FP8Linear's quantization fused
        in, same bits): static SCALE, or (DYNAMIC, BLOCK covering the row) amax * (1/448) to SOUT."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < I
        h = _silu_times(GU + row * stride_gu, cols, ok, I, ROUND.dtype.element_ty).to(tl.float32)
        _quantize_row(h, Q + row * stride_q, SCALE, SOUT + row, cols, ok, DYNAMIC)


def silu_mul_triton(gate_up: Tensor) -> Tensor:
    g2 = _rows(gate_up)
    inter = g2.shape[1] // 2
    out = torch.empty(g2.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    _kernel("_silu_mul_kernel")[(g2.shape[0], triton.cdiv(inter, block))](
        g2, out, inter, g2.stride(0), out.stride(0), BLOCK=block, num_warps=4
    )
    return out.view(*gate_up.shape[:-1], inter)


def silu_mul_fp8_triton(gate_up: Tensor, input_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """(e4m3 q [M, I], scale) of silu_mul(gate_up) as ``quantize_fp8_triton`` would quantize it, in
    one launch (per-row dynamic scales need the whole row in one program; a static scale does not)."""
    g2 = _rows(gate_up)
    M, inter = g2.shape[0], g2.shape[1] // 2
    q, scale = _fp8_outputs(M, inter, input_scale, gate_up.device)
    dynamic = input_scale is None
    block = triton.next_power_of_2(inter) if dynamic else min(1024, triton.next_power_of_2(inter))
    rounding = torch.empty(1, dtype=gate_up.dtype, device=gate_up.device)  # silu_mul's output dtype
    _kernel("_silu_mul_fp8_kernel")[(M, triton.cdiv(inter, block))](
        g2,
        rounding,
        q,
        scale,
        scale,
        inter,
        g2.stride(0),
        q.stride(0),
        DYNAMIC=dynamic,
        BLOCK=block,
        num_warps=_quant_warps(block),
    )
    return q, scale


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up, gate being the first half of the last dim."""
    return silu_mul_triton(gate_up) if use_triton(gate_up) else silu_mul_ref(gate_up)

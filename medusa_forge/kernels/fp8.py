"""FP8 activation quantization: FP8Linear's clamp(x / scale, +-448) -> e4m3 in one launch.

``_quantize_row`` is the shared tail of every launch that hands an FP8 GEMM its input (the norms'
and SiLU*mul's fused variants use it too), so all of them produce the same bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from medusa_forge.kernels._triton import HAVE_TRITON, _kernel, _source

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from medusa_forge.kernels._triton import _e4m3, _max

    @_source()
    def _quantize_row(x, Q_ROW, SCALE, SOUT_ROW, cols, ok, DYNAMIC: tl.constexpr):
        """Store x (fp32 values of one activation row, at ``cols``) as e4m3 at Q_ROW, scaled by the
        static SCALE or (DYNAMIC) amax(|x|) * (1/448), which goes to SOUT_ROW."""
        if DYNAMIC:
            scale = tl.maximum(tl.reduce(tl.abs(x), 0, _max) * (1.0 / 448.0), 1e-12)
            tl.store(SOUT_ROW + tl.arange(0, 1), tl.full([1], 0.0, tl.float32) + scale)
        else:
            scale = tl.load(SCALE)
        tl.store(Q_ROW + cols, _e4m3(x, scale).to(Q_ROW.dtype.element_ty), mask=ok)

    @_source(do_not_specialize=["N"])
    def _quantize_fp8_kernel(X, SCALE, Q, SOUT, N, stride_x, stride_q, DYNAMIC: tl.constexpr, BLOCK: tl.constexpr):
        """One row of FP8Linear's activation quantization, clamp(x / s, +-448) -> e4m3 with s the
        static input scale or (DYNAMIC) amax(|x|) * (1 / 448) per row: one launch instead of four, and
        the same bits as the PyTorch ops (an IEEE division by the scale, max is order free, round to nearest even
        done by hand in fp32 so the final cast is exact; the interpreter's own e4m3 cast is not)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        _quantize_row(x, Q + row * stride_q, SCALE, SOUT + row, cols, ok, DYNAMIC)


def _fp8_outputs(M: int, N: int, input_scale: Tensor | None, device) -> tuple[Tensor, Tensor]:
    """(e4m3 rows [M, N], scale) buffers of a launch that quantizes activations: the static 0-d
    ``input_scale`` itself, or per-row dynamic scales [M, 1] that the launch writes."""
    q = torch.empty(M, N, dtype=torch.float8_e4m3fn, device=device)
    scale = torch.empty(M, 1, dtype=torch.float32, device=device) if input_scale is None else input_scale
    return q, scale


def _quant_warps(block: int) -> int:
    return 4 if block <= 2048 else (8 if block <= 8192 else 16)


def quantize_fp8_triton(x: Tensor, input_scale: Tensor | None) -> tuple[Tensor, Tensor]:
    """(e4m3 x, scale) of x [M, K] for ``torch._scaled_mm``: the static 0-d ``input_scale``, or
    per-row dynamic scales [M, 1] when it is None. Bit-equal to FP8Linear's PyTorch ops."""
    M, N = x.shape
    q, scale = _fp8_outputs(M, N, input_scale, x.device)
    block = triton.next_power_of_2(N)
    _kernel("_quantize_fp8_kernel")[(M,)](
        x,
        scale,
        q,
        scale,
        N,
        x.stride(0),
        q.stride(0),
        DYNAMIC=input_scale is None,
        BLOCK=block,
        num_warps=_quant_warps(block),
    )
    return q, scale

"""RMSNorm and add+RMSNorm (optionally quantized to FP8 in the same launch), with exact references."""

from __future__ import annotations

import torch
from torch import Tensor

from medusa_forge.kernels._triton import (
    HAVE_TRITON,
    _kernel,
    _rows,
    _source,
    use_triton,
)
from medusa_forge.kernels.fp8 import _fp8_outputs

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from medusa_forge.kernels._triton import _add, _round
    from medusa_forge.kernels.fp8 import _quantize_row


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm: normalise in fp32, cast to x's dtype, then multiply by weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    residual = x + delta
    return rms_norm_ref(residual, weight, eps), residual


if HAVE_TRITON:

    @_source()
    def _rms_norm_kernel(
        X,
        DELTA,
        W,
        OUT,
        RES,
        Q,
        SCALE,
        SOUT,
        stride_x,
        stride_d,
        stride_o,
        stride_r,
        stride_q,
        N,
        eps,
        HAS_DELTA: tl.constexpr,
        QUANT: tl.constexpr,
        DYNAMIC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One row of (add +) RMSNorm. QUANT: the normalised row (rounded to OUT's dtype, as an
        unfused norm stores it) goes out as the next FP8 GEMM's e4m3 input Q instead, scaled by
        the static SCALE or (DYNAMIC) amax(|row|) * (1/448) stored to SOUT: FP8Linear's
        quantization fused into the norm's launch, with the same bits."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_DELTA:
            d = tl.load(DELTA + row * stride_d + cols, mask=ok, other=0.0).to(tl.float32)
            r = _round(x + d, RES.dtype.element_ty)
            tl.store(RES + row * stride_r + cols, r, mask=ok)
            x = r.to(tl.float32)
        rstd = tl.rsqrt(tl.reduce(x * x, 0, _add) / N + eps)
        y = _round(x * rstd, X.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
        out = _round(y * w, OUT.dtype.element_ty)
        if QUANT:
            _quantize_row(out.to(tl.float32), Q + row * stride_q, SCALE, SOUT + row, cols, ok, DYNAMIC)
        else:
            tl.store(OUT + row * stride_o + cols, out, mask=ok)


def _norm_warps(block: int) -> int:
    return 4 if block <= 2048 else 8


def _rms_norm_launch(
    x: Tensor, weight: Tensor, eps: float, delta: Tensor | None, fp8: bool, input_scale: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The one launcher of ``_rms_norm_kernel``: (normalised rows [M, N], or their e4m3 bytes when
    ``fp8``; the fp8 scale or None; the residual x + delta or None)."""
    x2 = _rows(x)
    M, N = x2.shape
    res_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
    out = torch.empty(1 if fp8 else M, N, dtype=torch.promote_types(res_dtype, weight.dtype), device=x.device)
    q, scale = _fp8_outputs(M, N, input_scale, x.device) if fp8 else (out, out)
    src, d2, res = x2, x2, x2
    if delta is not None:
        d2 = _rows(delta)
        res = torch.empty(x2.shape, dtype=res_dtype, device=x.device)
        # The normalised row is rounded to the residual's dtype (X's element type in the kernel).
        src = x2 if x2.dtype == res_dtype else x2.to(res_dtype)
    block = triton.next_power_of_2(N)
    _kernel("_rms_norm_kernel")[(M,)](
        src,
        d2,
        weight,
        out,
        res,
        q,
        scale,
        scale,
        src.stride(0),
        d2.stride(0),
        0 if fp8 else out.stride(0),
        res.stride(0),
        q.stride(0) if fp8 else 0,
        N,
        eps,
        HAS_DELTA=delta is not None,
        QUANT=fp8,
        DYNAMIC=fp8 and input_scale is None,
        BLOCK=block,
        num_warps=_norm_warps(block),
    )
    shape = (*x.shape[:-1], N)
    return (q if fp8 else out.view(shape)), (scale if fp8 else None), (None if delta is None else res.view(shape))


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _rms_norm_launch(x, weight, eps, None, fp8=False)[0]


def add_rms_norm_triton(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    out, _, res = _rms_norm_launch(x, weight, eps, delta, fp8=False)
    return out, res


def rms_norm_fp8_triton(
    x: Tensor, weight: Tensor, eps: float, input_scale: Tensor | None, delta: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(e4m3 q [M, N], scale, residual x + delta or None): rms_norm(x [+ delta]) quantized as
    ``quantize_fp8_triton`` would quantize it (static ``input_scale``, or per-row dynamic scales
    [M, 1] when None), in one launch: the norm's output never reaches memory in bf16 (the kernel
    reads only the dtype of its 1-row ``out``, the rounding the unfused norm would store)."""
    return _rms_norm_launch(x, weight, eps, delta, fp8=True, input_scale=input_scale)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm_triton(x, weight, eps) if use_triton(x) else rms_norm_ref(x, weight, eps)


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + delta), x + delta): the residual add fused into the next norm."""
    if use_triton(x) and not delta.requires_grad:
        return add_rms_norm_triton(x, delta, weight, eps)
    return add_rms_norm_ref(x, delta, weight, eps)

"""Shared machinery of the Triton kernels: the dispatch rule, the lazy jit, and the jitted helpers.

Each op dispatches with :func:`use_triton`: Triton for CUDA tensors (no autograd: a tensor that
needs grad takes the reference path), the ``*_ref`` PyTorch implementation otherwise. Set
``MEDUSA_FORGE_TRITON=0`` (or use :func:`reference_kernels`) to force the references on CUDA.

Kernel bodies are registered with :func:`_source` in the op module that launches them and wrapped
with ``triton.jit`` on first launch, not at import, so that ``TRITON_INTERPRET=1`` set after the
import (the CPU test suite does this) still selects Triton's interpreter. Triton resolves a function
a kernel calls through the kernel's ``fn.__globals__``, i.e. its own op module, so the jit installs
every jitted source under its name in each op module that holds that name (its defining module, and
the modules that imported a shared helper such as ``_add`` or ``_round``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the kernels are optional: every op has its reference
    HAVE_TRITON = False

_enabled = os.environ.get("MEDUSA_FORGE_TRITON", "1") != "0"


def use_triton(t: Tensor) -> bool:
    """True when ``t``'s op should run as a Triton kernel: CUDA, Triton importable, no autograd."""
    return _enabled and HAVE_TRITON and t.is_cuda and not (t.requires_grad and torch.is_grad_enabled())


@contextmanager
def reference_kernels() -> Iterator[None]:
    """Run every op on its PyTorch reference inside the block (A/B checks and timings)."""
    global _enabled
    saved, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = saved


_SOURCES: dict[str, tuple[object, dict]] = {}  # name -> (kernel body, triton.jit kwargs); module: fn.__globals__
_JITTED: dict[str, object] = {}
_jitted = False
_interpreted = False  # Triton's CPU interpreter (TRITON_INTERPRET=1) was active when the kernels were jitted


def _source(**jit_kwargs):
    """Register a kernel body; :func:`_kernel` wraps it with ``triton.jit`` on first launch."""

    def register(fn):
        _SOURCES[fn.__name__] = (fn, jit_kwargs)
        return fn

    return register


def _kernel(name: str):
    """The jitted kernel ``name``. The first call jits them all and installs each jitted source in
    every op module whose globals hold its name, so kernels find their jitted helpers by name (the
    interpreter is picked at that moment)."""
    global _jitted, _interpreted
    if not _jitted:
        _JITTED.clear()
        _JITTED.update({n: triton.jit(fn, **kw) for n, (fn, kw) in _SOURCES.items()})
        _interpreted = type(_JITTED[name]).__name__ == "InterpretedFunction"
        if _interpreted:  # the interpreter reduces with numpy when it recognises these combiners
            _JITTED["_add"] = getattr(tl.standard, "_sum_combine", _JITTED["_add"])
            _JITTED["_max"] = getattr(tl.standard, "_elementwise_max", _JITTED["_max"])
        modules = {id(fn.__globals__): fn.__globals__ for fn, _ in _SOURCES.values()}
        for module in modules.values():
            module.update({n: jitted for n, jitted in _JITTED.items() if n in module})
        _jitted = True
    return _JITTED[name]


if HAVE_TRITON:
    # Reductions go through tl.reduce with our own combine functions rather than tl.sum / tl.max,
    # and no tl.cdiv / tl.zeros: those library helpers are jitted when triton is imported, which pins them to
    # compiled mode; ours are jitted on first launch, so the interpreter can still be chosen then.
    @_source()
    def _add(a, b):
        return a + b

    @_source()
    def _max(a, b):
        return tl.maximum(a, b)

    @_source()
    def _round(x, DTYPE: tl.constexpr):
        """fp32 -> DTYPE, round to nearest even; bf16 by hand because the interpreter truncates."""
        if DTYPE == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            x = u.to(tl.float32, bitcast=True)
        return x.to(DTYPE)

    @_source()
    def _e4m3(x, scale):
        """clamp(x / scale, +-448) rounded to the nearest e4m3 value (ties to even), as fp32 whose
        cast to e4m3 is exact: IEEE division, then the rounding by hand (the interpreter's own e4m3
        cast is not round-to-nearest-even)."""
        u = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0).to(tl.uint32, bitcast=True)
        sign = u & 0x80000000
        a = u & 0x7FFFFFFF
        normal = (a + 0x7FFFF + ((a >> 20) & 1)) & 0xFFF00000  # keep 3 mantissa bits
        af = a.to(tl.float32, bitcast=True)
        tiny = ((af + 24576.0) - 24576.0).to(tl.uint32, bitcast=True)  # subnormals: steps of 2^-9
        return (tl.where(af < 0.015625, tiny, normal) | sign).to(tl.float32, bitcast=True)


def _rows(x: Tensor) -> Tensor:
    """x as [rows, last] with a unit last stride (a view when possible)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    return x.reshape(-1, x.shape[-1])

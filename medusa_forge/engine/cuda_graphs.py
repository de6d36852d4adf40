"""Capturing a step as a CUDA graph, one way for the engine and for the benchmarks that time it."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch


def capture(fn: Callable[[], object], warmup: int = 3, reps: int = 1) -> torch.cuda.CUDAGraph:
    """Run ``fn`` ``warmup`` times on a side stream (the allocator, cuBLAS and Triton settle their
    workspaces and autotuning there, outside the graph), then record ``reps`` calls of it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # A graph destroyed while another is being captured invalidates that capture; unreachable
    # engines (their graphs sit in reference cycles) are freed now, and no collection runs inside.
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph):
            for _ in range(reps):
                fn()
    finally:
        if enabled:
            gc.enable()
    torch.cuda.synchronize()
    return graph

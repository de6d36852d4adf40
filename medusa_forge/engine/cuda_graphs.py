"""Capturing a step as a CUDA graph, one way for the engine and for the benchmarks that time it."""

from __future__ import annotations

from typing import Callable

import torch


def capture(fn: Callable[[], object], warmup: int = 3, reps: int = 1) -> "torch.cuda.CUDAGraph":
    """Run ``fn`` ``warmup`` times on a side stream (the allocator, cuBLAS and Triton settle their
    workspaces and autotuning there, outside the graph), then record ``reps`` calls of it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    torch.cuda.synchronize()
    return graph

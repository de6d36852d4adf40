"""Per-kernel GPU time of one captured decode step: where a step's microseconds go.

A batch-1 step of a small model is launch bound, so the useful question is not "which op is
slow" but "how many kernels, and which ones cost more than a launch". We replay the step's CUDA
graph under ``torch.profiler`` (CUPTI reports the kernels inside graph replays) and sum GPU time
per kernel name, divided by the number of replays.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from medusa_forge.bench.step_latency import time_graph


def kernel_table(replay: Callable[[], None], reset: Callable[[], None] = lambda: None, iters: int = 50) -> dict:
    """{"step_us": wall GPU time per replay, "kernels": [{name, count, us}] per replay, costliest first}."""
    for _ in range(3):
        reset()
        replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            reset()
            replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = getattr(e, "cuda_time_total", 0.0)
        if us <= 0 or e.key.startswith(("cudaGraph", "cudaStream", "cudaEvent")):
            continue
        rows.append({"name": e.key[:120], "count": round(e.count / iters, 2), "us": round(us / iters, 2)})
    rows.sort(key=lambda r: -r["us"])
    step_us = time_graph(replay, reset, iters) * 1e3
    return {
        "step_us": round(step_us, 2),
        "kernel_us": round(sum(r["us"] for r in rows), 2),
        "kernels_per_step": round(sum(r["count"] for r in rows), 1),
        "kernels": rows,
    }


def format_table(name: str, table: dict, top: int = 20) -> str:
    lines = [
        f"## {name}: {table['step_us']} us per replay, {table['kernels_per_step']} kernels, "
        f"{table['kernel_us']} us inside kernels",
        "",
        "| us | count | kernel |",
        "|---:|---:|---|",
    ]
    lines += [f"| {r['us']} | {r['count']} | `{r['name']}` |" for r in table["kernels"][:top]]
    return "\n".join(lines)

"""Decode-shape GEMMs on this GPU: bandwidth efficiency and row invariance between M=1 and M=T.

    python -m medusa_forge.bench.gemm_check [--rows 64] [--json FILE]

Why: at batch 1 the step is the GEMMs (≈90% of its time at the Llama-3-8B shape), and greedy
Medusa is exact only if the tree step's row for a token equals the single-token step's row. Both
depend on which kernel the BLAS library picks for M=1 versus M=64. For each linear of the 8B block
(and lm_head) this times a CUDA-graph replay of ``F.linear`` at M=1 and M=rows, against the
bytes it must read, and reports whether row 0 is bit-identical in both launches, for two weight
layouts: ``[N, K]`` (nn.Linear, x @ W^T) and ``[K, N]`` (pre-transposed, x @ W).
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from medusa_forge.bench.shapes import LLAMA3_8B
from medusa_forge.bench.step_latency import copy_bandwidth_gb_s, time_graph
from medusa_forge.model.gemm_layout import rows_invariant


def linear_shapes(cfg=LLAMA3_8B) -> dict[str, tuple[int, int]]:
    """(out_features N, in_features K) of each GEMM a decode step runs."""
    h, d = cfg.hidden_size, cfg.head_dim
    return {
        "wqkv": ((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h),
        "wo": (h, cfg.num_heads * d),
        "w_gate_up": (2 * cfg.intermediate_size, h),
        "w_down": (h, cfg.intermediate_size),
        "lm_head": (cfg.vocab_size, h),
    }


def graph_of(fn) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def check_linear(n: int, k: int, rows: int, layout: str, bw_gb_s: float) -> dict:
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    wt = w.t().contiguous() if layout == "KN" else None
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    outs = {}

    def run(m: int):
        xm = x[:m]
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        outs[m] = out
        if layout == "NK":
            return lambda: torch.mm(xm, w.t(), out=out)
        return lambda: torch.mm(xm, wt, out=out)

    times = {}
    for m in (1, rows):
        g = graph_of(run(m))
        times[m] = time_graph(g.replay, lambda: None, iters=100)
    floor_ms = n * k * 2 / (bw_gb_s * 1e9) * 1e3
    return {
        "layout": layout,
        "N": n,
        "K": k,
        "ms_m1": round(times[1], 4),
        f"ms_m{rows}": round(times[rows], 4),
        "bw_eff_m1": round(floor_ms / times[1], 3),
        f"bw_eff_m{rows}": round(floor_ms / times[rows], 3),
        "row0_invariant": bool(torch.equal(outs[1][0], outs[rows][0])),
        # what the engine falls back to when neither layout is invariant (gemm_layout.RowPaddedLinear)
        "row_padded_invariant": rows_invariant(w, (rows,), layout, padded=True),
    }


@click.command()
@click.option("--rows", default=64, show_default=True, help="M of the tree step (number of tree nodes).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(rows: int, json_path: Path | None) -> None:
    bw = copy_bandwidth_gb_s()
    results = []
    for name, (n, k) in linear_shapes().items():
        for layout in ("NK", "KN"):
            r = {"linear": name, **check_linear(n, k, rows, layout, bw)}
            results.append(r)
            click.echo(json.dumps(r))
    out = {"device": torch.cuda.get_device_name(), "copy_gb_s": round(bw, 1), "rows": rows, "linears": results}
    if json_path:
        json_path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

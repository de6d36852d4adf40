"""GPU check of the decoder's Triton kernels at the Llama-3-8B shape: accuracy, batch invariance, speed.

    python -m medusa_forge.bench.kernels_check [--context 1024] [--tree mc_sim_7b_63] [--sweep] [--json FILE]

1. accuracy: every kernel against its PyTorch reference (max abs error; "exact" when bit-identical),
   at T=1 (decode) and T=64 (tree), attention also for a 1024-token prefill, against an fp32 reference;
2. batch invariance (bit-identical rows): each row of a T=64 launch against the same row launched
   alone (norms, rope, silu) or with the tree cut to its first i+1 nodes (attention, all 64 rows),
   the causal T=1 decode against the tree's root, a chunked prefill against an unchunked one;
   also whether a cuBLAS GEMM row is the same at M=1 and M=64 (not ours to fix: reported);
3. speed: median us per call of each kernel and of the PyTorch ops it replaces, replayed from a
   CUDA graph (as the engine runs them), with a per-step estimate for 32 layers;
4. ``--sweep``: attention time for a few ``AttentionConfig`` tile choices.
Exits 1 when an accuracy bound or an invariance check fails.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import click
import torch
import torch.nn.functional as F

from medusa_forge import kernels as K
from medusa_forge.bench.shapes import LLAMA3_8B
from medusa_forge.engine.cuda_graphs import capture
from medusa_forge.model.config import ModelConfig
from medusa_forge.model.llama import rope_cache
from medusa_forge.tree import ChoiceTree, tree_buffers

LAYERS = 32


CACHE = 2048  # KV-cache slots every check allocates


def time_us(fn: Callable[[], object], reps: int = 20, iters: int = 25) -> float:
    """Median us per call of ``fn`` replayed ``reps`` times from one CUDA graph."""
    graph = capture(fn, reps=reps)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    times.sort()
    return times[len(times) // 2]


def max_err(a: torch.Tensor, b: torch.Tensor) -> str:
    return "exact" if torch.equal(a, b) else f"{(a.float() - b.float()).abs().max().item():.2e}"


class Check:
    """Collects the report's rows and whether every required check passed."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.ok = True

    def accuracy(
        self, name: str, T: int, got: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float, required: bool = True
    ) -> None:
        """Passes when |got - ref| <= atol + rtol * |ref| everywhere (rtol 2**-7 is one bf16 ulp)."""
        diff, bound = (got.float() - ref.float()).abs(), atol + rtol * ref.float().abs()
        passed = bool(torch.isfinite(got.float()).all()) and bool((diff <= bound).all())
        if required:
            self.ok &= passed
        self.rows.append(
            dict(
                section="accuracy",
                name=name,
                T=T,
                error=max_err(got, ref),
                rtol=rtol,
                atol=atol,
                ok=passed,
                required=required,
            )
        )

    def invariant(self, name: str, same: bool, detail: str = "", required: bool = True) -> None:
        if required:
            self.ok &= same
        self.rows.append(dict(section="invariance", name=name, ok=same, detail=detail, required=required))

    def timing(self, name: str, T: int, triton_us: float, torch_us: float) -> None:
        self.rows.append(
            dict(
                section="timing",
                name=name,
                T=T,
                triton_us=round(triton_us, 2),
                torch_us=round(torch_us, 2),
                speedup=round(torch_us / triton_us, 2),
            )
        )


def inputs(sh: ModelConfig, T: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    return dict(
        x=rnd(T, sh.hidden_size),
        delta=rnd(T, sh.hidden_size),
        w=1 + rnd(sh.hidden_size, scale=0.1),
        qkv=rnd(1, T, (sh.num_heads + 2 * sh.num_kv_heads) * sh.head_dim),
        gate_up=rnd(T, 2 * sh.intermediate_size, scale=2.0),
        q=rnd(T, sh.num_heads, sh.head_dim),
    )


def check_elementwise(chk: Check, sh: ModelConfig, context: int) -> None:
    table = rope_cache(sh, CACHE).cuda()
    caches = [
        torch.zeros(1, sh.num_kv_heads, CACHE, sh.head_dim, dtype=torch.bfloat16, device="cuda") for _ in range(4)
    ]
    for T in (1, 64):
        a = inputs(sh, T, seed=T)
        slots = torch.arange(context, context + T, device="cuda")
        cos, sin = table[:, slots].to(torch.bfloat16)
        ops = {
            "rms_norm": (
                lambda: K.rms_norm_triton(a["x"], a["w"], sh.rms_norm_eps),
                lambda: K.rms_norm_ref(a["x"], a["w"], sh.rms_norm_eps),
            ),
            "add_rms_norm": (
                lambda: K.add_rms_norm_triton(a["x"], a["delta"], a["w"], sh.rms_norm_eps),
                lambda: K.add_rms_norm_ref(a["x"], a["delta"], a["w"], sh.rms_norm_eps),
            ),
            "rope_qkv_to_cache": (
                lambda: K.rope_qkv_to_cache_triton(
                    a["qkv"], cos, sin, caches[0], caches[1], slots, sh.num_heads, sh.num_kv_heads, sh.head_dim
                ),
                lambda: K.rope_qkv_to_cache_ref(
                    a["qkv"], cos, sin, caches[2], caches[3], slots, sh.num_heads, sh.num_kv_heads, sh.head_dim
                ),
            ),
            "silu_mul": (lambda: K.silu_mul_triton(a["gate_up"]), lambda: K.silu_mul_ref(a["gate_up"])),
        }
        for name, (tri, ref) in ops.items():
            got, want = tri(), ref()
            if name == "add_rms_norm":
                chk.accuracy("add_rms_norm residual", T, got[1], want[1], 0.0, 0.0)
                got, want = got[0], want[0]
            exact = name == "rope_qkv_to_cache"  # same rounding points, no reduction: bit-identical
            chk.accuracy(name, T, got, want, 0.0 if exact else 2**-6, 0.0 if exact else 1e-6)
            if exact:
                chk.accuracy("rope k/v cache", T, torch.cat(caches[:2]), torch.cat(caches[2:]), 0.0, 0.0)
            chk.timing(name, T, time_us(tri), time_us(ref))
        if T == 64:  # every row alone vs inside the 64-row launch
            for name, (tri, _) in ops.items():
                full = tri()
                full = full[0] if isinstance(full, tuple) else full
                rows = []
                for i in range(T):
                    one = {
                        k: (v[:, i : i + 1] if k == "qkv" else v[i : i + 1]) if k != "w" else v for k, v in a.items()
                    }
                    if name == "rms_norm":
                        r = K.rms_norm_triton(one["x"], a["w"], sh.rms_norm_eps)[0]
                    elif name == "add_rms_norm":
                        r = K.add_rms_norm_triton(one["x"], one["delta"], a["w"], sh.rms_norm_eps)[0][0]
                    elif name == "silu_mul":
                        r = K.silu_mul_triton(one["gate_up"])[0]
                    else:
                        r = K.rope_qkv_to_cache_triton(
                            one["qkv"],
                            cos[i : i + 1],
                            sin[i : i + 1],
                            caches[0],
                            caches[1],
                            slots[i : i + 1],
                            sh.num_heads,
                            sh.num_kv_heads,
                            sh.head_dim,
                        )[0, 0]
                    rows.append(torch.equal(r, full[0, i] if name == "rope_qkv_to_cache" else full[i]))
                chk.invariant(f"{name}: row alone == row in T=64", all(rows), f"{sum(rows)}/{T} rows")


def check_attention(chk: Check, sh: ModelConfig, context: int, tree: str) -> None:
    g = torch.Generator(device="cuda").manual_seed(7)
    k, v = (
        torch.randn(sh.num_kv_heads, CACHE, sh.head_dim, generator=g, device="cuda").to(torch.bfloat16) for _ in "kv"
    )
    prefix = torch.tensor(context, device="cuda")
    mask = tree_buffers(ChoiceTree.parse(tree)).attn_mask.cuda()
    n = mask.shape[0]
    for name, T, pre, tm in (
        ("decode", 1, prefix, None),
        (f"tree {tree}", n, prefix, mask),
        ("prefill", context, torch.tensor(0, device="cuda"), None),
    ):
        q = torch.randn(T, sh.num_heads, sh.head_dim, generator=g, device="cuda").to(torch.bfloat16)
        got = K.cache_attention_triton(q, k, v, pre, tm)
        full_mask = K.cache_mask(pre, tm, T, CACHE)
        want32 = K.masked_attention(q[None].float(), k[None].float(), v[None].float(), full_mask)[0]
        sdpa = K.masked_attention(q[None], k[None], v[None], full_mask)[0]
        # The bound: 2e-3 absolute, or 1.25x what torch's own bf16 SDPA gets wrong on the same input
        # (long prefills land on bf16 output rounding, which no bf16 kernel escapes).
        atol = max(2e-3, 1.25 * (sdpa.float() - want32).abs().max().item())
        chk.accuracy(f"cache_attention {name} (vs fp32)", T, got, want32, 2**-6, atol)
        chk.accuracy(f"  for scale: torch SDPA bf16 {name} (vs fp32)", T, sdpa, want32, 2**-6, atol, required=False)
        if T <= 64:
            chk.timing(
                f"cache_attention {name}",
                T,
                time_us(lambda: K.cache_attention_triton(q, k, v, pre, tm)),
                time_us(lambda: K.masked_attention(q[None], k[None], v[None], full_mask)),
            )
        if name == "prefill":
            small = replace(K.DEFAULT_ATTENTION, max_scratch_bytes=16 << 20)
            chk.invariant(
                "attention: chunked prefill == one launch",
                torch.equal(K.cache_attention_triton(q, k, v, pre, None, small), got),
            )
        if tm is not None:
            same = [
                torch.equal(K.cache_attention_triton(q[: i + 1], k, v, pre, tm[: i + 1, : i + 1])[i], got[i])
                for i in range(T)
            ]
            chk.invariant(f"attention: row i of T={T} == row i of T=i+1", all(same), f"{sum(same)}/{T} rows")
            root = K.cache_attention_triton(q[:1], k, v, pre, None)
            chk.invariant("attention: causal T=1 decode == tree root row", torch.equal(root[0], got[0]))
            i = T - 1
            q2, k2, v2 = q.clone(), k.clone(), v.clone()
            q2[:i] = torch.randn_like(q2[:i], dtype=torch.float32).to(q.dtype)
            hidden = ~tm[i]
            for c in (k2, v2):
                c[:, context : context + T][:, hidden] = 1e3
                c[:, context + T :] = float("nan")
            chk.invariant(
                "attention: row unchanged by other rows and hidden slots",
                torch.equal(K.cache_attention_triton(q2, k2, v2, pre, tm)[i], got[i]),
            )


def check_gemm(chk: Check, sh: ModelConfig) -> None:
    """Diagnostic, not ours: is a cuBLAS bf16 GEMM row the same at M=1 and M=64?"""
    g = torch.Generator(device="cuda").manual_seed(3)
    w = (torch.randn(sh.intermediate_size * 2, sh.hidden_size, generator=g, device="cuda") * 0.02).to(torch.bfloat16)
    x = torch.randn(64, sh.hidden_size, generator=g, device="cuda").to(torch.bfloat16)
    full = F.linear(x, w)
    same = [torch.equal(F.linear(x[i : i + 1], w)[0], full[i]) for i in range(64)]
    chk.invariant(
        "cuBLAS gate_up GEMM: row at M=1 == row at M=64 (diagnostic)", all(same), f"{sum(same)}/64 rows", required=False
    )


SWEEP_SHAPES = {  # name -> (shape, committed tokens): the 8B shape and pycoder-26m's (a typical eval context)
    "llama3-8b": (LLAMA3_8B, 1024),
    # the same shape with the prefix mid-split: the tail pass then reads 76 committed keys per token
    # and the tree's deeper nodes spill into a second split (1024 is split-aligned: new keys only)
    "llama3-8b@1100": (LLAMA3_8B, 1100),
    # no split wholly below the prefix: the main pass has nothing to do, so this times the tail pass
    "llama3-8b@100": (LLAMA3_8B, 100),
    "pycoder-26m": (
        replace(LLAMA3_8B, hidden_size=512, intermediate_size=1408, num_heads=8, num_kv_heads=4, head_dim=64),
        384,
    ),
}


def sweep(chk: Check, tree: str) -> None:
    """Attention time per tile choice, decode (T=1) and tree step, at each of SWEEP_SHAPES: the data
    :func:`~medusa_forge.kernels.attention_config`'s table comes from."""
    g = torch.Generator(device="cuda").manual_seed(9)
    mask = tree_buffers(ChoiceTree.parse(tree)).attn_mask.cuda()
    for name, (sh, context) in SWEEP_SHAPES.items():
        k, v = (
            torch.randn(sh.num_kv_heads, CACHE, sh.head_dim, generator=g, device="cuda").to(torch.bfloat16)
            for _ in "kv"
        )
        prefix = torch.tensor(context, device="cuda")
        configs = [
            K.AttentionConfig(split=split, block_m=block_m, block_n=64, num_warps=warps)
            for split in (64, 128)
            for block_m, warps in ((16, 4), (32, 4), (64, 4), (64, 8))
        ]
        configs += [K.AttentionConfig(split=256, block_m=block_m) for block_m in (16, 64)]
        configs += [K.AttentionConfig(block_n=32), K.AttentionConfig(block_n=128), K.AttentionConfig(num_warps=2)]
        configs += [K.AttentionConfig(early_v=True), K.AttentionConfig(early_v=True, block_m=64)]
        configs += [K.AttentionConfig(combine_rows=rows) for rows in (2, 4, 8)]
        for cfg in configs:
            for T, tm in ((1, None), (mask.shape[0], mask)):
                q = torch.randn(T, sh.num_heads, sh.head_dim, generator=g, device="cuda").to(torch.bfloat16)
                try:  # a tile choice Triton cannot compile (registers, shared memory) is a row, not the end
                    us = time_us(lambda: K.cache_attention_triton(q, k, v, prefix, tm, cfg))
                except Exception as e:  # noqa: BLE001
                    print(f"sweep {name} {cfg}: {type(e).__name__}: {str(e)[:200]}")
                    us = float("nan")
                chk.rows.append(
                    dict(
                        section="sweep",
                        shape=name,
                        split=cfg.split,
                        block_m=cfg.block_m,
                        block_n=cfg.block_n,
                        warps=cfg.num_warps,
                        combine_rows=cfg.combine_rows,
                        early_v=cfg.early_v,
                        T=T,
                        triton_us=round(us, 2),
                    )
                )


def per_layer_us(chk: Check, T: int, key: str) -> float:
    """The kernels of one layer at T rows: add+norm twice, rope+cache, attention, silu*mul."""
    rows = {r["name"]: r[key] for r in chk.rows if r["section"] == "timing" and r["T"] == T}
    attention = next((v for n, v in rows.items() if n.startswith("cache_attention")), None)
    if attention is None or "add_rms_norm" not in rows:
        return float("nan")
    return 2 * rows["add_rms_norm"] + rows["rope_qkv_to_cache"] + attention + rows["silu_mul"]


def report(chk: Check) -> str:
    out = []
    for section in ("accuracy", "invariance", "timing", "sweep"):
        rows = [r for r in chk.rows if r["section"] == section]
        if rows:
            out.append(f"\n== {section}")
        for r in rows:
            tag = "ok " if r.get("ok", True) else ("BAD" if r.get("required", True) else "no ")
            if section == "accuracy":
                out.append(
                    f"  {tag} {r['name']:<48} T={r['T']:<5} max|err| {r['error']:<9} "
                    f"(bound {r['atol']:g} + {r['rtol']:g}*|ref|)"
                )
            elif section == "invariance":
                out.append(f"  {tag} {r['name']:<62} {r['detail']}")
            elif section == "timing":
                out.append(
                    f"  {r['name']:<34} T={r['T']:<4} triton {r['triton_us']:8.2f} us   "
                    f"torch {r['torch_us']:8.2f} us   x{r['speedup']:.2f}"
                )
            else:
                out.append(
                    f"  {r['shape']:<14} split {r['split']:<4} block_m {r['block_m']:<3} "
                    f"block_n {r['block_n']:<3} warps {r['warps']:<2} "
                    f"combine rows {r['combine_rows']:<2} {'early V ' if r['early_v'] else ''}"
                    f"T={r['T']:<3} {r['triton_us']:8.2f} us"
                )
    for T in sorted({r["T"] for r in chk.rows if r["section"] == "timing"}):
        tri, ref = per_layer_us(chk, T, "triton_us"), per_layer_us(chk, T, "torch_us")
        if math.isfinite(tri):
            out.append(
                f"  T={T}: one layer's non-GEMM kernels {tri:.1f} us (torch {ref:.1f} us); x{LAYERS} layers "
                f"{tri * LAYERS / 1e3:.2f} ms (torch {ref * LAYERS / 1e3:.2f} ms)"
            )
    out.append("\nALL CHECKS PASSED" if chk.ok else "\nSOME CHECKS FAILED")
    return "\n".join(out)


@click.command()
@click.option("--context", default=1024, show_default=True, help="Committed tokens before the step (prefix_len).")
@click.option("--tree", default="mc_sim_7b_63", show_default=True, help="Choice tree whose mask the tree step uses.")
@click.option("--sweep", "do_sweep", is_flag=True, help="Also time a few attention tile configurations.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Also write the rows here.")
def main(context: int, tree: str, do_sweep: bool, json_path: Path | None) -> None:
    if not torch.cuda.is_available() or not K.HAVE_TRITON:
        raise click.ClickException("kernels_check needs CUDA and triton")
    import triton

    sh = LLAMA3_8B
    chk = Check()
    with torch.inference_mode():
        check_elementwise(chk, sh, context)
        check_attention(chk, sh, context, tree)
        check_gemm(chk, sh)
        if do_sweep:
            sweep(chk, tree)
    print(
        f"{torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}  "
        f"attention {K.attention_config(sh.num_heads // sh.num_kv_heads, sh.head_dim)}"
    )
    print(report(chk))
    if json_path is not None:
        json_path.write_text(json.dumps(dict(ok=chk.ok, rows=chk.rows), indent=1))
    sys.exit(0 if chk.ok else 1)


if __name__ == "__main__":
    main()

"""``bench suite``: every engine we can run, side by side in one process, on the same prompts.

Engines: transformers ``generate`` (default and static-cache + compile), FasterDecoding's eager
Medusa algorithm, our plain decoding, our Medusa decoding with each requested tree; then the
large-shape step latencies. Each engine records per-prompt (tokens, seconds, output), so every
ratio is computed over exactly the prompts both engines ran. Results: JSON, Markdown, PNG.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from medusa_forge.bench.engine_bench import truncate_prompt
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.load import load_engine
from medusa_forge.prompts import Prompt
from medusa_forge.tree.choice_tree import ChoiceTree


@dataclass
class EngineRun:
    name: str
    runs: dict[int, tuple[int, float, list[int]]] = field(default_factory=dict)  # prompt idx -> (tokens, s, out)
    steps: int = 0
    note: str = ""

    def tokens_per_s(self, idx: set[int] | None = None) -> float:
        keys = self.runs.keys() if idx is None else self.runs.keys() & idx
        tok = sum(self.runs[i][0] for i in keys)
        sec = sum(self.runs[i][1] for i in keys)
        return tok / sec if sec else 0.0


def ratio(a: EngineRun, b: EngineRun) -> float:
    """tokens/s of a over b on the prompts both ran."""
    common = set(a.runs) & set(b.runs)
    tb = b.tokens_per_s(common)
    return a.tokens_per_s(common) / tb if tb else 0.0


def identical(a: EngineRun, b: EngineRun) -> tuple[int, int]:
    common = sorted(set(a.runs) & set(b.runs))
    return sum(a.runs[i][2] == b.runs[i][2] for i in common), len(common)


def run_ours(engine, name: str, ids: list[list[int]], gcfg: GenerationConfig) -> EngineRun:
    run = EngineRun(name)
    for x in ids[:2]:
        engine.generate_ids(x, gcfg)  # warm-up: graph capture
    for i, x in enumerate(tqdm(ids, desc=name, leave=False)):
        r = engine.generate_ids(x, gcfg)
        run.runs[i] = (len(r.tokens), r.total_s, r.tokens)
        run.steps += r.steps
    return run


def run_peer(fn, name: str, ids: list[list[int]], idx: list[int]) -> EngineRun:
    """A peer runs on the subset ``idx`` (peers can be two orders of magnitude slower)."""
    run = EngineRun(name)
    try:
        result = fn([ids[i] for i in idx])
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        run.note = f"failed: {type(e).__name__}: {e}"
        traceback.print_exc()
        return run
    per = result.seconds / max(1, len(idx))
    for i, out in zip(idx, result.outputs):
        run.runs[i] = (len(out), per, out)  # peers are timed as a batch of sequential requests
    run.note = result.note
    return run


def suite(
    model_dir: str,
    medusa_dir: str,
    prompts: list[Prompt],
    trees: list[str],
    max_new_tokens: int = 128,
    max_prompt_tokens: int = 512,
    peer_per_topic: int = 2,
    step_shape: bool = True,
    hf_compile: bool = True,
) -> dict:
    from medusa_forge.bench import baselines

    engine = load_engine(model_dir, medusa_dir, tree=trees[0])
    ids = [truncate_prompt(engine, p.prompt, max_prompt_tokens) for p in prompts]
    peer_idx, seen = [], {}
    for i, p in enumerate(prompts):
        if seen.get(p.topic, 0) < peer_per_topic:
            seen[p.topic] = seen.get(p.topic, 0) + 1
            peer_idx.append(i)
    runs: dict[str, EngineRun] = {}
    base_cfg = GenerationConfig(max_new_tokens=max_new_tokens, use_medusa=False, ignore_eos=True)
    med_cfg = GenerationConfig(max_new_tokens=max_new_tokens, ignore_eos=True)
    runs["ours_base"] = run_ours(engine, "ours_base", ids, base_cfg)
    layouts = {"ours_base": engine.gemm_layouts.to_dict()}
    for tree in trees:
        engine = load_engine(model_dir, medusa_dir, tree=tree)
        name = f"ours_medusa[{ChoiceTree.parse(tree).name}]"
        runs[name] = run_ours(engine, name, ids, med_cfg)
        layouts[name] = engine.gemm_layouts.to_dict()
    first_medusa = f"ours_medusa[{ChoiceTree.parse(trees[0]).name}]"

    device, dtype = engine.device, engine.model.lm_head.weight.dtype
    hf = baselines.load_hf(model_dir, device, dtype)
    ref = baselines.ReferenceMedusa(hf, engine.heads, ChoiceTree.parse(trees[0]))
    runs["reference_medusa_eager"] = run_peer(
        lambda x: ref.bench(x, max_new_tokens), "reference_medusa_eager", ids, peer_idx
    )
    runs["hf_generate"] = run_peer(
        lambda x: baselines.hf_generate(hf, x, max_new_tokens, False), "hf_generate", ids, peer_idx
    )
    if hf_compile and device.type == "cuda":
        hf2 = baselines.load_hf(model_dir, device, dtype)
        runs["hf_generate_compiled"] = run_peer(
            lambda x: baselines.hf_generate(hf2, x, max_new_tokens, True), "hf_generate_compiled", ids, peer_idx
        )
    hf_best = max(
        (r for k, r in runs.items() if k.startswith("hf_generate") and r.runs),
        key=lambda r: r.tokens_per_s(),
        default=None,
    )

    base, med = runs["ours_base"], runs[first_medusa]
    result: dict = {
        "prompts": len(prompts),
        "peer_prompts": len(peer_idx),
        "max_new_tokens": max_new_tokens,
        "engines": {
            k: {
                "tokens_per_s": round(r.tokens_per_s(), 2),
                "prompts": len(r.runs),
                "note": r.note,
                "tokens_per_step": round(sum(v[0] for v in r.runs.values()) / r.steps, 3) if r.steps else None,
            }
            for k, r in runs.items()
        },
        "per_topic": per_topic(runs, prompts),
        "ratios": {
            "medusa_vs_our_base": round(ratio(med, base), 3),
            "our_base_vs_hf_generate": round(ratio(base, hf_best), 3) if hf_best else None,
            "hf_variant": hf_best.name if hf_best else None,
            "our_medusa_vs_reference_medusa": round(ratio(med, runs["reference_medusa_eager"]), 3)
            if runs["reference_medusa_eager"].runs
            else None,
            # medusa_vs_our_base is the first tree's (the one the reference Medusa runs); every tree's:
            **{
                f"{name}_vs_our_base": round(ratio(r, base), 3)
                for name, r in runs.items()
                if name.startswith("ours_medusa[")
            },
        },
        "identity": {name: "{}/{}".format(*identical(r, base)) for name, r in runs.items() if name != "ours_base"},
        "gemm_layouts": layouts,
    }
    if device.type == "cuda":
        del engine, hf, ref
        torch.cuda.empty_cache()
        result["fp32_vs_transformers"] = fp32_identity(model_dir, medusa_dir, trees[0], [ids[i] for i in peer_idx])
        if step_shape:
            result["llama3_8b_step"] = step_shape_results()
    return result


FP32_NEW_TOKENS = 64


def fp32_identity(
    model_dir: str, medusa_dir: str, tree: str, ids: list[list[int]], new_tokens: int = FP32_NEW_TOKENS
) -> dict:
    """Our greedy Medusa and plain decoding against transformers' greedy ``generate``, all in fp32
    on the GPU: the same comparison CI makes on the CPU. In bf16 two implementations' kernels round
    differently, so there only our own plain decoding is the exact reference (``identity`` above)."""
    from medusa_forge.bench import baselines

    engine = load_engine(model_dir, medusa_dir, tree=tree, dtype="float32")
    hf = baselines.load_hf(model_dir, engine.device, torch.float32)
    want = baselines.hf_generate(hf, ids, new_tokens, False).outputs
    out = {}
    for name, use_medusa in (("medusa", True), ("base", False)):
        gcfg = GenerationConfig(max_new_tokens=new_tokens, use_medusa=use_medusa, ignore_eos=True)
        got = [engine.generate_ids(x, gcfg).tokens for x in ids]
        out[f"{name}_identical"] = f"{sum(g == w for g, w in zip(got, want))}/{len(ids)}"
    out.update(new_tokens=new_tokens, tree=ChoiceTree.parse(tree).name)
    del engine, hf
    torch.cuda.empty_cache()
    return out


def step_shape_results() -> dict:
    from medusa_forge.bench.step_latency import measure

    out = {"bf16": measure().to_dict()}
    try:
        out["fp8"] = measure(fp8=True).to_dict()
        out["fp8_vs_bf16_single_step"] = round(out["fp8"]["single_step_ms"] / out["bf16"]["single_step_ms"], 4)
    except Exception as e:  # noqa: BLE001 - FP8 needs the build stage's kernels and an H100
        out["fp8"] = f"failed: {type(e).__name__}: {e}"
    return out


def per_topic(runs: dict[str, EngineRun], prompts: list[Prompt]) -> dict:
    topics = sorted({p.topic for p in prompts})
    table = {}
    for t in topics:
        idx = {i for i, p in enumerate(prompts) if p.topic == t}
        table[t] = {name: round(r.tokens_per_s(idx), 2) for name, r in runs.items() if set(r.runs) & idx}
    return table


def markdown(result: dict, meta: dict) -> str:
    lines = [
        f"# Benchmark suite — {meta.get('device')} @ {meta.get('commit')}",
        "",
        f"{result['prompts']} held-out prompts (peers on {result['peer_prompts']}), "
        f"{result['max_new_tokens']} new tokens, batch 1, greedy. torch {meta.get('torch')}, {meta.get('date')}.",
        "",
        "| engine | tokens/s | tokens/step | prompts | identical to our base | note |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, e in result["engines"].items():
        lines.append(
            f"| {name} | {e['tokens_per_s']:.1f} | {e['tokens_per_step'] or ''} | {e['prompts']} | "
            f"{result['identity'].get(name, '-')} | {e['note']} |"
        )
    lines += ["", "## Ratios (same prompts, same run)", ""]
    lines += [f"- {k}: **{v}**" for k, v in result["ratios"].items()]
    topics = result["per_topic"]
    names = list(result["engines"])
    lines += ["", "## Tokens/s per topic", "", "| topic | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for t, row in topics.items():
        lines.append(f"| {t} | " + " | ".join(f"{row[n]:.1f}" if n in row else "-" for n in names) + " |")
    if "fp32_vs_transformers" in result:
        f = result["fp32_vs_transformers"]
        lines += [
            "",
            f"## fp32 on the GPU against transformers' greedy generate ({result['peer_prompts']} prompts x "
            f"{f['new_tokens']} tokens)",
            "",
            f"- our Medusa ({f['tree']}): **{f['medusa_identical']}** identical; our plain decoding: "
            f"**{f['base_identical']}**",
        ]
    if "llama3_8b_step" in result:
        lines += [
            "",
            "## Llama-3-8B shape, random weights (CUDA graphs)",
            "",
            "```json",
            json.dumps(result["llama3_8b_step"], indent=2),
            "```",
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topics = list(result["per_topic"])
    names = list(result["engines"])
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(topics)), 4.5))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = [result["per_topic"][t].get(name, 0.0) for t in topics]
        ax.bar([i + j * width for i in range(len(topics))], vals, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(topics))], topics)
    ax.set_ylabel("tokens/s (batch 1, greedy)")
    ax.set_yscale("log")
    ax.set_title("Tokens/s per topic")
    # below the axes: inside, the legend hides the tallest bars
    ax.legend(fontsize=7, ncol=min(4, len(names)), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Engine-vs-engine checks for the build stage: FP8 agreement and choice-tree tokens/s.

FP8 agreement is measured the way quantization is usually judged, without error cascades: the
reference engine writes its greedy continuation of each held-out prompt, then both engines read that
same text in one causal pass and we count the positions where their argmax agrees (teacher-forced
greedy agreement). Free-running outputs are compared too (identical sequences, first difference).

Tree comparison decodes the same prompts with each tree on one loaded engine (same weights, same
device) and reports tokens/s, decode tokens/s, acceptance length and output identity with plain
greedy decoding.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from medusa_forge.atomic import atomic_write_json, atomic_write_text
from medusa_forge.build.tree_search import device_name, encode_prompts
from medusa_forge.engine.generation import GenerationConfig
from medusa_forge.engine.load import load_engine
from medusa_forge.engine.medusa_engine import MedusaEngine
from medusa_forge.errors import ForgeError
from medusa_forge.manifest import read_tree
from medusa_forge.model.forward import full_pass
from medusa_forge.prompts import Prompt, read_prompts
from medusa_forge.tree.choice_tree import ChoiceTree

SPLITS = ("all", "even", "odd")


def split_prompts(prompts: list[Prompt], split: str) -> list[Prompt]:
    """``even``/``odd`` lines of a prompt file: calibrate on one half, benchmark on the other."""
    if split not in SPLITS:
        raise ForgeError(f"unknown prompt split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "all":
        return prompts
    return prompts[0 if split == "even" else 1 :: 2]


@torch.inference_mode()
def teacher_forced_argmax(engine: MedusaEngine, seqs: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
    """Argmax next token at every continuation position of each (prompt_len, sequence)."""
    out = []
    for plen, seq in seqs:
        hidden = full_pass(engine.model, seq)[plen - 1 : len(seq) - 1]
        out.append(engine.model.logits(hidden).argmax(-1).cpu())
    return out


def compare_fp8(
    reference: str | Path,
    candidate: str | Path,
    prompts: list[Prompt],
    new_tokens: int = 64,
    prompt_tokens: int = 256,
    device: str | None = None,
    fp8_emulate: bool = False,
    free_running: bool = True,
    timing: bool = True,
) -> dict:
    """Greedy agreement of ``candidate`` (e.g. fp8) with ``reference`` (e.g. bf16) on held-out prompts.

    With ``timing`` both engines also decode every prompt plain and (when they have heads) with
    Medusa after a warm-up, and the report gets each one's decode step time and tokens/s.
    """
    ref = load_engine(reference, device=device)
    ids = encode_prompts(ref.tokenizer, [p.prompt for p in prompts], prompt_tokens)
    plain = GenerationConfig(max_new_tokens=new_tokens, use_medusa=False, ignore_eos=True)
    ref_runs = [ref.generate_ids(x, plain) for x in ids]
    seqs = [(len(x), x + r.tokens) for x, r in zip(ids, ref_runs)]
    ref_argmax = teacher_forced_argmax(ref, seqs)
    timings = {"reference": engine_timing(ref, ids, new_tokens)} if timing else {}
    del ref
    cand = load_engine(candidate, device=device, fp8_emulate=fp8_emulate)
    cand_argmax = teacher_forced_argmax(cand, seqs)
    free_cfg = GenerationConfig(max_new_tokens=new_tokens, use_medusa=cand.tree is not None, ignore_eos=True)
    rows = []
    for p, (plen, seq), a, b in zip(prompts, seqs, ref_argmax, cand_argmax):
        row = {"source": p.source, "topic": p.topic, "positions": len(a), "agree": int((a == b).sum())}
        if free_running:
            free, ref_tokens = cand.generate_ids(seq[:plen], free_cfg).tokens, seq[plen:]
            row["free_running_identical"] = free == ref_tokens
            row["first_difference"] = next((i for i, (x, y) in enumerate(zip(free, ref_tokens)) if x != y), None)
        rows.append(row)
    if timing:
        timings["candidate"] = engine_timing(cand, ids, new_tokens)
    positions = sum(r["positions"] for r in rows)
    agree = sum(r["agree"] for r in rows)
    return {
        "reference": str(reference),
        "candidate": str(candidate),
        "device": device_name(cand.device),
        "prompts": len(rows),
        "new_tokens": new_tokens,
        "positions": positions,
        "greedy_agreement": round(agree / max(1, positions), 5),
        "free_running_identical": sum(r["free_running_identical"] for r in rows) if free_running else None,
        "candidate_decoding": "medusa" if free_cfg.use_medusa else "greedy",
        "timing": timings,
        "per_prompt": rows,
    }


def engine_timing(engine: MedusaEngine, ids: list[list[int]], new_tokens: int, warmup: int = 1) -> dict:
    """Decode step time and tokens/s of plain and (with heads) Medusa greedy decoding, after a warm-up."""
    out = {}
    for mode in ("greedy", "medusa") if engine.tree is not None else ("greedy",):
        gcfg = GenerationConfig(max_new_tokens=new_tokens, use_medusa=mode == "medusa", ignore_eos=True)
        for x in ids[:warmup]:
            engine.generate_ids(x, gcfg)  # CUDA graph capture, kernel autotuning
        runs = [engine.generate_ids(x, gcfg) for x in ids]
        steps = sum(r.steps for r in runs)
        decode_s = sum(r.total_s - r.ttft_s for r in runs)
        decode_tokens = sum(sum(r.accepted_per_step) for r in runs)
        out[mode] = {
            "step_ms": round(1e3 * decode_s / max(1, steps), 4),
            "decode_tokens_per_s": round(decode_tokens / decode_s, 2) if decode_s else 0.0,
            "tokens_per_step": round(decode_tokens / max(1, steps), 4),
        }
    return out


def compare_trees(
    engine_dir: str | Path,
    trees: list[str],
    prompts: list[Prompt],
    new_tokens: int = 128,
    prompt_tokens: int = 512,
    device: str | None = None,
    warmup: int = 2,
    fp8_emulate: bool = False,
) -> dict:
    """tokens/s of each tree (``engine`` = the engine's own, e.g. its auto tree) on one loaded engine."""
    engine = load_engine(engine_dir, device=device, fp8_emulate=fp8_emulate)
    if engine.heads is None:
        raise ForgeError(f"{engine_dir}: engine has no Medusa heads; nothing to compare")
    ids = encode_prompts(engine.tokenizer, [p.prompt for p in prompts], prompt_tokens)
    base_cfg = GenerationConfig(max_new_tokens=new_tokens, use_medusa=False, ignore_eos=True)
    med_cfg = GenerationConfig(max_new_tokens=new_tokens, use_medusa=True, ignore_eos=True)
    for x in ids[:warmup]:
        engine.generate_ids(x, base_cfg)
    base = [engine.generate_ids(x, base_cfg) for x in ids]
    results = {"base": _row(base, None)}
    for spec in trees:
        tree = engine.tree if spec == "engine" else read_tree(spec)
        name = f"engine:{engine.tree.name}" if spec == "engine" else tree.name
        eng = MedusaEngine(engine.model, engine.heads, tree, engine.tokenizer, max_seq_len=engine.max_seq_len)
        # every prefill bucket now, as load_engine does: captured lazily, the buckets first met in
        # the timed runs cost tens of ms each (an H200 run's tokens/s came out at half the decode rate)
        eng.warmup(max(len(x) for x in ids))
        for x in ids[:warmup]:
            eng.generate_ids(x, med_cfg)
        runs = [eng.generate_ids(x, med_cfg) for x in ids]
        row = _row(runs, tree)
        row["identical_to_greedy"] = sum(r.tokens == b.tokens for r, b in zip(runs, base))
        row["speedup_vs_base"] = round(row["tokens_per_s"] / results["base"]["tokens_per_s"], 3)
        results[name] = row
        del eng
    return {
        "engine": str(engine_dir),
        "device": device_name(engine.device),
        "prompts": len(ids),
        "new_tokens": new_tokens,
        "results": results,
    }


def _row(runs, tree: ChoiceTree | None) -> dict:
    tokens = sum(len(r.tokens) for r in runs)
    seconds = sum(r.total_s for r in runs)
    decode_tokens = sum(len(r.tokens) - 1 for r in runs)
    decode_s = sum(r.total_s - r.ttft_s for r in runs)
    steps = sum(r.steps for r in runs)
    return {
        "nodes": tree.num_nodes - 1 if tree else 0,
        "depth": tree.depth if tree else 0,
        "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
        "decode_tokens_per_s": round(decode_tokens / decode_s, 2) if decode_s else 0.0,
        "acceptance_length": round(decode_tokens / steps, 4) if steps else 1.0,
        "mean_ttft_ms": round(1e3 * statistics.mean(r.ttft_s for r in runs), 3),
    }


def trees_table(report: dict) -> str:
    lines = [
        f"Choice trees on {report['device']} ({report['prompts']} prompts x {report['new_tokens']} tokens)",
        "",
        "| tree | nodes | depth | tokens/s | decode tokens/s | acceptance length | speedup | identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["results"].items():
        lines.append(
            f"| {name} | {r['nodes']} | {r['depth']} | {r['tokens_per_s']:.1f} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['acceptance_length']:.3f} | "
            f"{r.get('speedup_vs_base', 1.0):.2f}x | {r.get('identical_to_greedy', '-')} |"
        )
    return "\n".join(lines)


def save_report(report: dict, out: str | Path, table: str | None = None) -> None:
    """JSON at ``out`` and, when given, the Markdown table beside it (same stem, .md)."""
    out = Path(out)
    atomic_write_json(out, report)
    if table is not None:
        atomic_write_text(out.with_suffix(".md"), table + "\n")


def load_prompt_split(path: str | Path, split: str = "all", limit: int | None = None) -> list[Prompt]:
    prompts = split_prompts(read_prompts(path), split)
    return prompts[:limit] if limit else prompts

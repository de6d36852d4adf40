"""``medusa-forge bench``: engine tokens/s (base vs Medusa), step latency at a large shape, Triton load."""

from __future__ import annotations

import json
from pathlib import Path

import click

from medusa_forge.atomic import atomic_write_json, atomic_write_text
from medusa_forge.bench.batch_sweep import batch_cmd
from medusa_forge.bench.meta import run_metadata, source_commit  # noqa: F401 - source_commit: bench.cli's API
from medusa_forge.bench.serve_cli import bench_serve_cmd
from medusa_forge.bench.soak import soak as _soak
from medusa_forge.engine.options import (
    engine_options,
)
from medusa_forge.tree.choice_tree import ChoiceTree


@click.group()
def bench() -> None:
    """Benchmarks that print a table and save JSON (+ Markdown) results."""


@bench.command("engine")
@engine_options
@click.option("--prompts", required=True, type=click.Path(), help="JSONL prompts with 'prompt' and 'topic'.")
@click.option("--per-topic", default=None, type=int, help="Use the first N prompts of each topic.")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--max-prompt-tokens", default=512, show_default=True)
@click.option("--out", default=None, type=click.Path(), help="Write JSON here (and a .md beside it).")
def bench_engine_cmd(model, prompts, per_topic, max_new_tokens, max_prompt_tokens, out, **opening):
    """Per-topic tokens/s of plain vs Medusa greedy decoding on one engine, with output identity."""
    from medusa_forge.bench.engine_bench import bench_engine, topic_table
    from medusa_forge.build.open import open_with_options
    from medusa_forge.errors import ForgeError
    from medusa_forge.prompts import read_prompts

    engine = open_with_options(model, opening)
    if engine.tree is None:
        raise ForgeError("bench engine compares base vs Medusa: give --medusa heads (or an engine built with them)")
    result = bench_engine(engine, read_prompts(prompts, per_topic=per_topic), max_new_tokens, max_prompt_tokens)
    result["meta"] = run_metadata()
    table = topic_table(result)
    click.echo(table)
    if out:
        atomic_write_json(out, result)
        atomic_write_text(
            Path(out).with_suffix(".md"), f"# Engine benchmark\n\n{json.dumps(result['meta'])}\n\n{table}\n"
        )


@bench.command("step")
@click.option("--shape", type=click.Choice(["llama3-8b"]), default="llama3-8b", show_default=True)
@click.option("--medusa-choices", "tree", default="mc_sim_7b_63", show_default=True)
@click.option("--num-heads", default=5, show_default=True)
@click.option("--context", default=1024, show_default=True, help="Tokens already in the cache.")
@click.option("--out", default=None, type=click.Path())
def bench_step_cmd(shape, tree, num_heads, context, out):
    """Single-token and tree step latency at a large shape (random bf16 weights) vs the HBM floor (CUDA)."""
    import torch

    from medusa_forge.bench.shapes import LLAMA3_8B
    from medusa_forge.bench.step_latency import measure
    from medusa_forge.errors import ForgeError

    if not torch.cuda.is_available():
        raise ForgeError("bench step measures GPU step latency and needs CUDA")
    result = measure(LLAMA3_8B, tree=tree, num_heads=num_heads, context=context).to_dict()
    result["meta"] = run_metadata()
    click.echo(json.dumps(result, indent=2))
    if out:
        atomic_write_json(out, result)


@bench.command("probe")
@click.option("--model", "--model_dir", "model", required=True, type=click.Path())
@click.option(
    "--medusa",
    "--medusa_model_dir",
    "medusa",
    default=None,
    type=click.Path(),
    help="Heads (default: fresh heads; the probe proposes the base model's own tokens anyway).",
)
@click.option("--medusa-choices", "trees", multiple=True, default=("mc_sim_7b_63",), show_default=True)
@click.option("--prompts", required=True, type=click.Path())
@click.option("--per-topic", default=None, type=int)
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--out", default=None, type=click.Path())
def bench_probe_cmd(model, medusa, trees, prompts, per_topic, max_new_tokens, out):
    """Bit identity of tree decoding with plain greedy decoding: tokens and every committed KV entry."""
    from medusa_forge.bench.engine_bench import truncate_prompt
    from medusa_forge.bench.identity_probe import probe
    from medusa_forge.build.open import open_engine as load_engine
    from medusa_forge.engine.medusa_engine import MedusaEngine
    from medusa_forge.heads.medusa_head import MedusaHeads, MedusaHeadsConfig
    from medusa_forge.prompts import read_prompts

    result = {"meta": run_metadata(), "trees": {}}
    for tree in trees:
        if medusa:
            engine = load_engine(model, medusa, tree)
        else:  # fresh heads from the base lm_head (the probe overrides their top-k); the first load
            # only provides weights and tokenizer, so it captures no CUDA graphs
            base = load_engine(model, with_heads=False, cuda_graphs=False)
            cfg = base.cfg
            heads = MedusaHeads.from_lm_head(
                MedusaHeadsConfig(5, 1, cfg.hidden_size, cfg.vocab_size), base.model.lm_head.weight
            )
            engine = MedusaEngine(
                base.model, heads, ChoiceTree.parse(tree), base.tokenizer, max_seq_len=base.max_seq_len
            )
        ids = [truncate_prompt(engine, p.prompt, 512) for p in read_prompts(prompts, per_topic=per_topic)]
        report = probe(engine, ids, max_new_tokens).to_dict()
        result["trees"][tree] = report
        click.echo(f"{tree}: {json.dumps(report['summary'])}")
        bad = [p for p in report["prompts"] if p["first_kv_mismatch"] or p["first_token_mismatch"] is not None]
        for p in bad[:10]:
            click.echo(f"  {json.dumps(p)}")
        click.echo(
            "  gemm rows: "
            + json.dumps(
                {
                    k: (v["eager_rows_differing"][:4], v["graph_rows_differing"][:4])
                    for k, v in report["gemm_rows"].items()
                }
            )
        )
    if out:
        atomic_write_json(out, result)


@bench.command("profile")
@click.option(
    "--model",
    "--model_dir",
    "model",
    default=None,
    type=click.Path(),
    help="HF model dir (fresh heads); default: the Llama-3-8B shape with random weights.",
)
@click.option("--medusa-choices", "tree", default="mc_sim_7b_63", show_default=True)
@click.option("--context", default=512, show_default=True, help="Tokens already in the cache.")
@click.option("--fp8", is_flag=True, help="FP8 block GEMMs (as an fp8 engine runs).")
@click.option("--out", default=None, type=click.Path())
def bench_profile_cmd(model, tree, context, fp8, out):
    """GPU time per kernel of the captured single-token step, tree step and prefill (CUDA)."""
    import time

    import torch

    from medusa_forge.bench.shapes import LLAMA3_8B
    from medusa_forge.bench.step_latency import prefill_and_reset, random_engine
    from medusa_forge.bench.step_profile import format_table, kernel_table
    from medusa_forge.engine.generation import GenerationConfig
    from medusa_forge.errors import ForgeError

    if not torch.cuda.is_available():
        raise ForgeError("bench profile times GPU kernels and needs CUDA")
    engine = random_engine(LLAMA3_8B if model is None else model, tree=tree, fp8=fp8)
    ids = list(range(1, context + 1))
    reset = prefill_and_reset(engine, context)
    gcfg = GenerationConfig()
    result = {"meta": run_metadata(), "context": context, "tree": tree, "fp8": fp8}
    for kind in ("base", "greedy"):
        result[kind] = kernel_table(engine._step(kind, gcfg), reset)
        click.echo(format_table(f"{kind} step", result[kind]) + "\n")
    # The prefill is most of a short request's time to first token: its bucket's graph per kernel,
    # then the whole host call (ids to the device, replay, reading the root back) as a request pays it.
    bucket = engine._prefill_bucket(context)
    result["prefill"] = kernel_table(engine._prefill_graph(bucket).graph.replay)
    click.echo(format_table(f"prefill of {context} tokens ({bucket}-token bucket)", result["prefill"]) + "\n")
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine._prefill(ids)
        int(engine.root.item())
        times.append((time.perf_counter() - t0) * 1e3)
    result["prefill_ms"] = sorted(times)[2]
    click.echo(f"prefill of {context} tokens, host call to first token: {result['prefill_ms']:.3f} ms")
    if out:
        atomic_write_json(out, result)


@bench.command("suite")
@click.option("--model", "--model_dir", "model", required=True, type=click.Path())
@click.option("--medusa", "--medusa_model_dir", "medusa", required=True, type=click.Path())
@click.option("--prompts", required=True, type=click.Path())
@click.option("--per-topic", default=None, type=int, help="First N prompts of each topic (default: all).")
@click.option("--peer-per-topic", default=2, show_default=True, help="Prompts per topic for the slow peers.")
@click.option(
    "--tree",
    "trees",
    multiple=True,
    default=("mc_sim_7b_63",),
    show_default=True,
    help="Trees for our Medusa engine (repeatable; the first is the headline and the reference's).",
)
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--no-step-shape", is_flag=True, help="Skip the Llama-3-8B-shape step latency part.")
@click.option("--no-hf-compile", is_flag=True, help="Skip transformers' static-cache + compile variant.")
@click.option("--out", required=True, type=click.Path(), help="Output directory (JSON, Markdown, PNG).")
def bench_suite_cmd(
    model, medusa, prompts, per_topic, peer_per_topic, trees, max_new_tokens, no_step_shape, no_hf_compile, out
):
    """Every engine side by side: transformers, reference eager Medusa, ours (base, Medusa per tree)."""
    from medusa_forge.atomic import atomic_output_dir
    from medusa_forge.bench.suite import markdown, plot, suite
    from medusa_forge.prompts import read_prompts

    result = suite(
        model,
        medusa,
        read_prompts(prompts, per_topic=per_topic),
        list(trees),
        max_new_tokens,
        peer_per_topic=peer_per_topic,
        step_shape=not no_step_shape,
        hf_compile=not no_hf_compile,
    )
    meta = run_metadata()
    result["meta"] = meta
    md = markdown(result, meta)
    click.echo(md)
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "suite.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "suite.md").write_text(md)
        plot(result, tmp / "tokens_per_s_per_topic.png")


# `bench serve` and `bench soak` live in their own modules (soak is also runnable as
# `python -m medusa_forge.bench.soak`).
bench.add_command(bench_serve_cmd, "serve")
bench.add_command(_soak, "soak")
bench.add_command(batch_cmd, "batch")

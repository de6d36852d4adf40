"""``medusa-forge bench``: engine tokens/s (base vs Medusa), step latency at a large shape, Triton load."""

from __future__ import annotations

import json
from pathlib import Path

import click

from medusa_forge.atomic import atomic_write_json, atomic_write_text
from medusa_forge.bench.batch_sweep import batch_cmd
from medusa_forge.bench.meta import run_metadata, source_commit  # noqa: F401 - source_commit: bench.cli's API
from medusa_forge.bench.serve_sweep import DEFAULT_BATCH, MODES
from medusa_forge.bench.soak import soak as _soak
from medusa_forge.engine.options import (
    dtype_option,
    engine_options,
    medusa_option,
    no_medusa_option,
    tree_option,
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
def bench_engine_cmd(model, medusa, tree, device, dtype, max_seq_len, compile_, prompts, per_topic, max_new_tokens,
                     max_prompt_tokens, out):
    """Per-topic tokens/s of plain vs Medusa greedy decoding on one engine, with output identity."""
    from medusa_forge.bench.engine_bench import bench_engine, topic_table
    from medusa_forge.build.open import open_engine
    from medusa_forge.errors import ForgeError
    from medusa_forge.prompts import read_prompts

    engine = open_engine(model, medusa, tree, device, dtype, max_seq_len, compile_)
    if engine.tree is None:
        raise ForgeError("bench engine compares base vs Medusa: give --medusa heads (or an engine built with them)")
    result = bench_engine(engine, read_prompts(prompts, per_topic=per_topic), max_new_tokens, max_prompt_tokens)
    result["meta"] = run_metadata()
    table = topic_table(result)
    click.echo(table)
    if out:
        atomic_write_json(out, result)
        atomic_write_text(Path(out).with_suffix(".md"), f"# Engine benchmark\n\n{json.dumps(result['meta'])}\n\n{table}\n")


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
@click.option("--medusa", "--medusa_model_dir", "medusa", default=None, type=click.Path(),
              help="Heads (default: fresh heads; the probe proposes the base model's own tokens anyway).")
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
            heads = MedusaHeads.from_lm_head(MedusaHeadsConfig(5, 1, cfg.hidden_size, cfg.vocab_size),
                                             base.model.lm_head.weight)
            engine = MedusaEngine(base.model, heads, ChoiceTree.parse(tree), base.tokenizer,
                                  max_seq_len=base.max_seq_len)
        ids = [truncate_prompt(engine, p.prompt, 512) for p in read_prompts(prompts, per_topic=per_topic)]
        report = probe(engine, ids, max_new_tokens).to_dict()
        result["trees"][tree] = report
        click.echo(f"{tree}: {json.dumps(report['summary'])}")
        bad = [p for p in report["prompts"] if p["first_kv_mismatch"] or p["first_token_mismatch"] is not None]
        for p in bad[:10]:
            click.echo(f"  {json.dumps(p)}")
        click.echo("  gemm rows: " + json.dumps({k: (v["eager_rows_differing"][:4], v["graph_rows_differing"][:4])
                                                 for k, v in report["gemm_rows"].items()}))
    if out:
        atomic_write_json(out, result)


@bench.command("profile")
@click.option("--model", "--model_dir", "model", default=None, type=click.Path(),
              help="HF model dir (fresh heads); default: the Llama-3-8B shape with random weights.")
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
@click.option("--tree", "trees", multiple=True, default=("mc_sim_7b_63",), show_default=True,
              help="Trees for our Medusa engine (repeatable; the first is the headline and the reference's).")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--no-step-shape", is_flag=True, help="Skip the Llama-3-8B-shape step latency part.")
@click.option("--no-hf-compile", is_flag=True, help="Skip transformers' static-cache + compile variant.")
@click.option("--out", required=True, type=click.Path(), help="Output directory (JSON, Markdown, PNG).")
def bench_suite_cmd(model, medusa, prompts, per_topic, peer_per_topic, trees, max_new_tokens, no_step_shape,
                    no_hf_compile, out):
    """Every engine side by side: transformers, reference eager Medusa, ours (base, Medusa per tree)."""
    from medusa_forge.atomic import atomic_output_dir
    from medusa_forge.bench.suite import markdown, plot, suite
    from medusa_forge.prompts import read_prompts

    result = suite(model, medusa, read_prompts(prompts, per_topic=per_topic), list(trees), max_new_tokens,
                   peer_per_topic=peer_per_topic, step_shape=not no_step_shape, hf_compile=not no_hf_compile)
    meta = run_metadata()
    result["meta"] = meta
    md = markdown(result, meta)
    click.echo(md)
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "suite.json").write_text(json.dumps(result, indent=2) + "\n")
        (tmp / "suite.md").write_text(md)
        plot(result, tmp / "tokens_per_s_per_topic.png")


@bench.command("serve")
@click.option("--engine", "--model", "engine", required=True, type=click.Path(),
              help="Native engine dir, or a HF model dir (built into a native engine first, with --medusa heads).")
@medusa_option("HF model dir only: Medusa heads to build in.")
@tree_option("HF model dir only: choice tree.")
@dtype_option("HF model dir only: engine dtype (default: fp32 on CPU, bf16 on CUDA).")
@no_medusa_option("Serve plain decoding of the engine (default: Medusa when it has heads).")
@click.option("--clients", default="1,2,4,8,16,32", show_default=True,
              help="Concurrent gRPC clients (one thread each). One count: the full single-mode check (sequential "
                   "answers against the engine in process, gRPC overhead, load); several: the sweep over --modes.")
@click.option("--modes", default=",".join(MODES), show_default=True,
              help="Sweep only: served modes, plain|medusa x serial|batched (Medusa modes need heads).")
@click.option("--max-batch-size", type=int, default=None,
              help=f"Request slots the batched modes decode together (sweep default {DEFAULT_BATCH}); with one "
                   "--clients count, the served model's (default: the engine's; 1: serial).")
@click.option("--requests", default=10, show_default=True, help="Requests per client.")
@click.option("--max-tokens", "--max_tokens", "max_tokens", default=16, show_default=True,
              help="New tokens per request (EOS ignored, so every answer has this length).")
@click.option("--prompts", type=click.Path(), default=None,
              help="JSONL with a 'prompt' per line (default: a few built-in Python snippets).")
@click.option("--num-prompts", default=8, show_default=True, help="Distinct prompts used (the first N).")
@click.option("--max-prompt-chars", default=400, show_default=True, help="Keep the last N characters of each prompt.")
@click.option("--stream", is_flag=True, help="Load requests stream (one response per decoding step).")
@click.option("--keep-stream", is_flag=True,
              help="Load clients keep one gRPC stream open (default: a stream per request, as `query`/`eval`).")
@click.option("--overhead-trials", default=30, show_default=True,
              help="Sequential requests per side (in process, over gRPC) for the overhead figure.")
@click.option("--warmup", default=3, show_default=True, help="Unrecorded pairs before the overhead trials.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds per request.")
@click.option("--time-limit", default=600.0, show_default=True,
              help="Seconds for the whole load phase; requests not sent by then count as errors.")
@click.option("--instances", default=1, show_default=True, help="Model instances (one engine each).")
@click.option("--torch-threads", type=int, default=None,
              help="Intra-op threads of the server's engine and the in-process baseline (default: this process's).")
@click.option("--goal-overhead-ms", default=2.0, show_default=True, help="Overhead goal reported (p50, ms).")
@click.option("--workdir", type=click.Path(), default=None,
              help="Keep the built engine, the repository and tritonserver.log here (default: a temporary dir).")
@click.option("--out", default=None, type=click.Path(), help="Write the JSON here (and a .md summary beside it).")
def bench_serve_cmd(engine, medusa, tree, dtype, no_medusa, clients, modes, max_batch_size, requests, max_tokens,
                    prompts, num_prompts, max_prompt_chars, stream, keep_stream, overhead_trials, warmup, timeout,
                    time_limit, instances, torch_threads, goal_overhead_ms, workdir, out):
    """Concurrent gRPC clients against a real tritonserver: zero errors, every answer the sequential one.
    One --clients count: p50/p90/p99 latency and the gRPC overhead against the same engine in process.
    Several: aggregate tok/s, p50/p99 latency and TTFT per client count for plain and Medusa decoding,
    batched against serial (JSON, Markdown, PNG). Exit 1 if a check fails."""
    from medusa_forge.bench.serve_bench import ServeBenchConfig

    counts = _client_counts(clients)
    cfg = ServeBenchConfig(engine=Path(engine), medusa=Path(medusa) if medusa else None, tree=tree, dtype=dtype,
                           use_medusa=False if no_medusa else None, clients=counts[0], requests=requests,
                           max_tokens=max_tokens, prompts=_serve_prompts(prompts, num_prompts, max_prompt_chars),
                           stream=stream, keep_stream=keep_stream, overhead_trials=overhead_trials, warmup=warmup,
                           timeout_s=timeout, time_limit_s=time_limit, instances=instances,
                           torch_threads=torch_threads, goal_overhead_ms=goal_overhead_ms,
                           max_batch_size=max_batch_size, workdir=Path(workdir) if workdir else None)
    if len(counts) == 1:
        _serve_single(cfg, out)
    else:
        _serve_sweep(cfg, counts, modes, out)


def _client_counts(text: str) -> list[int]:
    from medusa_forge.errors import ForgeError

    try:
        counts = [int(c) for c in str(text).split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ForgeError(f"--clients {text!r}: give a count >= 1 or a comma-separated list of them")
    return sorted(dict.fromkeys(counts))


def _serve_prompts(path, num_prompts: int, max_prompt_chars: int) -> list[str]:
    from medusa_forge.bench.serve_bench import DEFAULT_PROMPTS
    from medusa_forge.eval.speed import clip_prompt

    texts = list(DEFAULT_PROMPTS)
    if path:
        from medusa_forge.prompts import read_prompts

        texts = [p.prompt for p in read_prompts(path)]
    return [clip_prompt(t, max_prompt_chars) for t in texts[:max(1, num_prompts)]]


def _serve_single(cfg, out) -> None:
    from medusa_forge.bench.serve_bench import run_serve_bench, summary_lines

    doc = run_serve_bench(cfg, progress=lambda m: click.echo(m, err=True))
    doc["meta"] = run_metadata()
    lines = summary_lines(doc)
    click.echo("\n".join(lines))
    if out:
        atomic_write_json(out, doc)
        atomic_write_text(Path(out).with_suffix(".md"), "\n".join(lines) + "\n")
    _exit_unless_passed(doc, doc["load"]["error_samples"])


def _serve_sweep(cfg, counts: list[int], modes: str, out) -> None:
    from medusa_forge.bench.serve_sweep import (
        markdown,
        parse_modes,
        plot,
        run_serve_sweep,
        summary_lines,
    )

    doc = run_serve_sweep(cfg, counts, parse_modes(modes), progress=lambda m: click.echo(m, err=True))
    doc["meta"] = run_metadata()
    click.echo("\n".join(summary_lines(doc)))
    if out:
        atomic_write_json(out, doc)
        atomic_write_text(Path(out).with_suffix(".md"), markdown(doc))
        plot(doc, Path(out).with_suffix(".png"))
    _exit_unless_passed(doc, sorted({s for r in doc["rows"] for s in r["error_samples"]})[:5])


def _exit_unless_passed(doc: dict, error_samples: list[str]) -> None:
    import sys

    if not doc["passed"]:
        failed = [k for k, v in doc["checks"].items() if not v]
        click.echo(f"bench serve FAILED: {', '.join(failed)} (errors: {error_samples})", err=True)
        sys.exit(1)


# `bench soak` lives with its load loop (also runnable as `python -m medusa_forge.bench.soak`).
bench.add_command(_soak, "soak")
bench.add_command(batch_cmd, "batch")

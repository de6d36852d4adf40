"""``medusa-forge bench serve``: concurrent gRPC clients against a real tritonserver, one count or a sweep."""

from __future__ import annotations

from pathlib import Path

import click

from medusa_forge.atomic import atomic_write_json, atomic_write_text
from medusa_forge.bench.meta import run_metadata
from medusa_forge.bench.serve_sweep import DEFAULT_BATCH, MODES
from medusa_forge.engine.options import dtype_option, medusa_option, no_medusa_option, tree_option


@click.command("serve")
@click.option(
    "--engine",
    "--model",
    "engine",
    required=True,
    type=click.Path(),
    help="Native engine dir, or a HF model dir (built into a native engine first, with --medusa heads).",
)
@medusa_option("HF model dir only: Medusa heads to build in.")
@tree_option("HF model dir only: choice tree.")
@dtype_option("HF model dir only: engine dtype (default: fp32 on CPU, bf16 on CUDA).")
@no_medusa_option("Serve plain decoding of the engine (default: Medusa when it has heads).")
@click.option(
    "--clients",
    default="1,2,4,8,16,32",
    show_default=True,
    help="Concurrent gRPC clients (one thread each). One count: the full single-mode check (sequential "
    "answers against the engine in process, gRPC overhead, load); several: the sweep over --modes.",
)
@click.option(
    "--modes",
    default=",".join(MODES),
    show_default=True,
    help="Sweep only: served modes, plain|medusa x serial|batched (Medusa modes need heads).",
)
@click.option(
    "--max-batch-size",
    type=int,
    default=None,
    help=f"Request slots the batched modes decode together (sweep default {DEFAULT_BATCH}); with one "
    "--clients count, the served model's (default: the engine's; 1: serial).",
)
@click.option("--requests", default=10, show_default=True, help="Requests per client.")
@click.option(
    "--max-tokens",
    "--max_tokens",
    "max_tokens",
    default=16,
    show_default=True,
    help="New tokens per request (EOS ignored, so every answer has this length).",
)
@click.option(
    "--prompts",
    type=click.Path(),
    default=None,
    help="JSONL with a 'prompt' per line (default: a few built-in Python snippets).",
)
@click.option("--num-prompts", default=8, show_default=True, help="Distinct prompts used (the first N).")
@click.option("--max-prompt-chars", default=400, show_default=True, help="Keep the last N characters of each prompt.")
@click.option(
    "--stream/--unary",
    default=None,
    help="Load requests stream (one response per decoding step) or are unary (one response each). "
    "Default: unary for one --clients count, streaming for a sweep (its TTFT needs the first chunk).",
)
@click.option(
    "--keep-stream",
    is_flag=True,
    help="Load clients keep one gRPC stream open (default: a stream per request, as `query`/`eval`).",
)
@click.option(
    "--overhead-trials",
    default=30,
    show_default=True,
    help="Sequential requests per side (in process, over gRPC) for the overhead figure.",
)
@click.option("--warmup", default=3, show_default=True, help="Unrecorded pairs before the overhead trials.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds per request.")
@click.option(
    "--time-limit",
    default=600.0,
    show_default=True,
    help="Seconds for the whole load phase; requests not sent by then count as errors.",
)
@click.option("--instances", default=1, show_default=True, help="Model instances (one engine each).")
@click.option(
    "--torch-threads",
    type=int,
    default=None,
    help="Intra-op threads of the server's engine and the in-process baseline (default: this process's).",
)
@click.option("--goal-overhead-ms", default=2.0, show_default=True, help="Overhead goal reported (p50, ms).")
@click.option(
    "--workdir",
    type=click.Path(),
    default=None,
    help="Keep the built engine, the repository and tritonserver.log here (default: a temporary dir).",
)
@click.option("--out", default=None, type=click.Path(), help="Write the JSON here (and a .md summary beside it).")
def bench_serve_cmd(
    engine,
    medusa,
    tree,
    dtype,
    no_medusa,
    clients,
    modes,
    max_batch_size,
    requests,
    max_tokens,
    prompts,
    num_prompts,
    max_prompt_chars,
    stream,
    keep_stream,
    overhead_trials,
    warmup,
    timeout,
    time_limit,
    instances,
    torch_threads,
    goal_overhead_ms,
    workdir,
    out,
):
    """Concurrent gRPC clients against a real tritonserver: zero errors, every answer the sequential one.
    One --clients count: p50/p90/p99 latency and the gRPC overhead against the same engine in process.
    Several: aggregate tok/s, p50/p99 latency and TTFT per client count for plain and Medusa decoding,
    batched against serial (JSON, Markdown, PNG). Exit 1 if a check fails."""
    from medusa_forge.bench.serve_config import ServeBenchConfig

    counts = _client_counts(clients)
    cfg = ServeBenchConfig(
        engine=Path(engine),
        medusa=Path(medusa) if medusa else None,
        tree=tree,
        dtype=dtype,
        use_medusa=False if no_medusa else None,
        clients=counts[0],
        requests=requests,
        max_tokens=max_tokens,
        prompts=_serve_prompts(prompts, num_prompts, max_prompt_chars),
        stream=stream,
        keep_stream=keep_stream,
        overhead_trials=overhead_trials,
        warmup=warmup,
        timeout_s=timeout,
        time_limit_s=time_limit,
        instances=instances,
        torch_threads=torch_threads,
        goal_overhead_ms=goal_overhead_ms,
        max_batch_size=max_batch_size,
        workdir=Path(workdir) if workdir else None,
    )
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
    from medusa_forge.bench.serve_config import DEFAULT_PROMPTS
    from medusa_forge.eval.speed import clip_prompt

    texts = list(DEFAULT_PROMPTS)
    if path:
        from medusa_forge.prompts import read_prompts

        texts = [p.prompt for p in read_prompts(path)]
    return [clip_prompt(t, max_prompt_chars) for t in texts[: max(1, num_prompts)]]


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

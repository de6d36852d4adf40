"""``medusa-forge demo``: the README's first command (``make demo`` calls it)."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command(context_settings={"max_content_width": 110})
@click.option(
    "--model", default="../shared/models/pycoder-26m", show_default=True, type=click.Path(), help="Base HF checkpoint."
)
@click.option(
    "--prompts",
    default="../shared/data/code_prompts.jsonl",
    show_default=True,
    type=click.Path(),
    help="Held-out prompts JSONL (topic, prompt) for `eval speed`.",
)
@click.option("--out", default="out/demo", show_default=True, type=click.Path(), help="Where everything goes.")
@click.option("--heads", type=click.Path(), default=None, help="Medusa heads dir (default: the shipped ones).")
@click.option(
    "--medusa-choices",
    "tree",
    default=None,
    help="Choice tree (default: the tree shipped beside the heads; `auto` needs a build of its own).",
)
@click.option("--device", default=None, help="cuda or cpu (default: cuda when available).")
@click.option("--dtype", default=None, help="Engine dtype (default: bf16 on CUDA, fp32 on CPU).")
@click.option(
    "--mmlu", type=click.Path(), default=None, help="MMLU data dir (default: the package's MMLU-format questions)."
)
@click.option("--shots", default=5, show_default=True)
@click.option("--mmlu-limit", type=int, default=None, help="First N questions of each subject.")
@click.option("--per-topic", default=2, show_default=True, help="Held-out prompts per topic for `eval speed`.")
@click.option("--max-tokens", default=64, show_default=True, help="New tokens per `eval speed` request.")
@click.option("--trials", default=1, show_default=True)
@click.option(
    "--min-speedup",
    type=float,
    default=None,
    help="Promotion gate: tokens/s against the base on the slowest topic (default: 1.5 on CUDA, "
    "none on a CPU, where a 26M model's Medusa step costs more than it saves).",
)
@click.option("--show-text", is_flag=True, help="Print the streamed query's text (quiet by default).")
def demo(model, prompts, out, heads, mmlu, **options):
    """Heads -> base and Medusa engines -> one tritonserver -> streamed gRPC query -> eval mmlu / speed /
    report -> promote (the candidate passes, a degraded one is rejected) -> a summary table.

    Exit status 1 when the candidate is not promoted or the degraded one is not rejected.
    """
    from medusa_forge.demo.pipeline import DemoConfig, run_demo
    from medusa_forge.demo.summary import passed, render

    cfg = DemoConfig(
        model=Path(model),
        prompts=Path(prompts),
        out=Path(out),
        heads=Path(heads) if heads else None,
        mmlu=Path(mmlu) if mmlu else None,
        echo=lambda msg: click.echo(msg, err=True),
        **options,
    )
    summary = run_demo(cfg)
    render(summary)
    click.echo(f"summary: {Path(out) / 'summary.json'}")
    if not passed(summary):
        sys.exit(1)

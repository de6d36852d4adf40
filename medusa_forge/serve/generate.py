"""``medusa-forge generate``: text from any engine the native engine opens, Medusa when it has heads."""

from __future__ import annotations

import json
import sys

import click

from medusa_forge.cli_options import json_option
from medusa_forge.engine.options import engine_options, no_medusa_option, uses_heads
from medusa_forge.errors import ForgeError


@click.command()
@engine_options
@no_medusa_option()
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-file", type=click.Path(), default=None, help="JSONL with a 'prompt' field per line.")
@click.option("--max-new-tokens", "--max_output_len", "max_new_tokens", default=128, show_default=True)
@click.option(
    "--temperature",
    default=0.0,
    show_default=True,
    help="0 = greedy (exact); >0 = typical acceptance with Medusa, sampling without.",
)
@click.option("--top-k", default=0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--stop", "stop", multiple=True, help="Stop string (repeatable).")
@click.option("--seed", default=None, type=int)
@json_option("One JSON object per prompt.")
@click.option("--stats", is_flag=True, help="After each text, print tokens, steps, tokens/step and tokens/s (stderr).")
def generate(
    model,
    no_medusa,
    prompt,
    prompt_file,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    stop,
    seed,
    as_json,
    stats=False,
    **opening,
):
    """Generate text with the native engine: Medusa when it has heads (an engine dir's own, or --medusa),
    unless --no-medusa."""
    from medusa_forge.build.open import open_with_options
    from medusa_forge.engine.generation import GenerationConfig
    from medusa_forge.prompts import read_prompts

    if (prompt is None) == (prompt_file is None):
        raise ForgeError("give exactly one of --prompt or --prompt-file")
    if prompt is not None and not prompt:
        raise ForgeError("empty prompt: give at least one token of input")
    texts = [prompt] if prompt is not None else [p.prompt for p in read_prompts(prompt_file)]
    engine = open_with_options(model, opening, with_heads=not no_medusa)
    gcfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        use_medusa=uses_heads(engine, no_medusa),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_strings=tuple(stop),
        seed=seed,
    )
    for text in texts:
        if as_json:
            result = engine.generate(text, gcfg)
            click.echo(json.dumps(result.to_dict()))
        else:
            result = engine.generate(text, gcfg, on_tokens=_printer(engine))
            click.echo()
        sys.stdout.flush()
        if stats:
            click.echo(
                f"[{len(result.tokens)} tokens in {result.steps} decoding steps after the prefill: "
                f"{result.mean_accepted:.2f} tokens/step, {result.tokens_per_s:.1f} tokens/s]",
                err=True,
            )


def _printer(engine):
    """Stream text as tokens arrive (decoding the running sequence keeps multi-byte tokens intact)."""
    seen: list[int] = []
    printed = [0]

    def emit(new: list[int]) -> None:
        seen.extend(new)
        text = engine.tokenizer.decode(seen)
        click.echo(text[printed[0] :], nl=False)
        printed[0] = len(text)

    return emit

"""``medusa-forge generate`` and the engine options shared by every command that loads one."""

from __future__ import annotations

import functools
import json
import sys

import click

from medusa_forge.errors import ForgeError


def engine_options(fn):
    """--model/--medusa/--medusa-choices/--device/--dtype/--max-seq-len/--compile, as load_engine takes them."""

    @click.option("--model", "--model_dir", "--engine", "model", required=True, type=click.Path(),
                  help="Native engine dir (from `build`) or HF checkpoint dir (TensorRT-LLM's --model_dir).")
    @click.option("--medusa", "--medusa_model_dir", "medusa", type=click.Path(), default=None,
                  help="Medusa heads directory (FasterDecoding layout).")
    @click.option("--medusa-choices", "--medusa_choices", "tree", default=None,
                  help="Choice tree: preset name, JSON file, or JSON list (default: the engine's, else mc_sim_7b_63).")
    @click.option("--device", default=None, help="cuda or cpu (default: cuda when available).")
    @click.option("--dtype", default=None, help="float32|bfloat16|float16 (default: bf16 on CUDA, fp32 on CPU).")
    @click.option("--max-seq-len", "--max_seq_len", "max_seq_len", default=None, type=int,
                  help="KV cache length: prompt + new tokens + tree (default: the engine's, else 2048).")
    @click.option("--compile/--no-compile", "compile_", default=False, show_default=True,
                  help="torch.compile the decoding steps (CUDA) before graph capture.")
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def open_engine(model, medusa, tree, device, dtype, max_seq_len, compile_):
    from medusa_forge.engine.load import load_engine

    return load_engine(model, medusa, tree, device=device, dtype=dtype, max_seq_len=max_seq_len, compile=compile_)


@click.command()
@engine_options
@click.option("--no-medusa", is_flag=True, help="Plain decoding with the base model on the same engine.")
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-file", type=click.Path(), default=None, help="JSONL with a 'prompt' field per line.")
@click.option("--max-new-tokens", "--max_output_len", "max_new_tokens", default=128, show_default=True)
@click.option("--temperature", default=0.0, show_default=True,
              help="0 = greedy (exact); >0 = typical acceptance with Medusa, sampling without.")
@click.option("--top-k", default=0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--stop", "stop", multiple=True, help="Stop string (repeatable).")
@click.option("--seed", default=None, type=int)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per prompt.")
@click.option("--stats", is_flag=True, help="After each text, print tokens, steps, tokens/step and tokens/s (stderr).")
def generate(model, medusa, tree, device, dtype, max_seq_len, compile_, no_medusa, prompt, prompt_file,
             max_new_tokens, temperature, top_k, top_p, stop, seed, as_json, stats=False):
    """Generate text with the native engine (Medusa when --medusa is given)."""
    from medusa_forge.engine.generation import GenerationConfig
    from medusa_forge.prompts import read_prompts

    if (prompt is None) == (prompt_file is None):
        raise ForgeError("give exactly one of --prompt or --prompt-file")
    if prompt is not None and not prompt:
        raise ForgeError("empty prompt: give at least one token of input")
    texts = [prompt] if prompt is not None else [p.prompt for p in read_prompts(prompt_file)]
    engine = open_engine(model, medusa, tree, device, dtype, max_seq_len, compile_)
    gcfg = GenerationConfig(max_new_tokens=max_new_tokens, use_medusa=medusa is not None and not no_medusa,
                            temperature=temperature, top_k=top_k, top_p=top_p, stop_strings=tuple(stop), seed=seed)
    for text in texts:
        if as_json:
            result = engine.generate(text, gcfg)
            click.echo(json.dumps(result.to_dict()))
        else:
            result = engine.generate(text, gcfg, on_tokens=_printer(engine))
            click.echo()
        sys.stdout.flush()
        if stats:
            click.echo(f"[{len(result.tokens)} tokens in {result.steps} decoding steps after the prefill: "
                       f"{result.mean_accepted:.2f} tokens/step, {result.tokens_per_s:.1f} tokens/s]", err=True)


def _printer(engine):
    """Stream text as tokens arrive (decoding the running sequence keeps multi-byte tokens intact)."""
    seen: list[int] = []
    printed = [0]

    def emit(new: list[int]) -> None:
        seen.extend(new)
        text = engine.tokenizer.decode(seen)
        click.echo(text[printed[0]:], nl=False)
        printed[0] = len(text)

    return emit

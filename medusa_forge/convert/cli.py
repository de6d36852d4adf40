"""``medusa-forge convert``: ``trtllm`` (write a TensorRT-LLM Medusa checkpoint) and ``inspect`` (summarise, validate).

Flag names echo TensorRT-LLM's ``examples/medusa/convert_checkpoint.py`` and ``examples/quantization/quantize.py``
where they mean the same thing (``--model_dir``, ``--medusa_model_dir``, ``--output_dir``, ``--tp_size``,
``--max_medusa_token_len``, ``--qformat``, ``--kv_cache_dtype``, ``--calib_size``); both spellings are accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from medusa_forge.cli_options import calib_prompts_option, json_option, out_dir_option, overwrite_option
from medusa_forge.engine.options import device_option, dtype_option, medusa_option, model_option


@click.group(name="convert")
def convert() -> None:
    """TensorRT-LLM checkpoints: `trtllm` converts HF model + Medusa heads, `inspect` validates one."""


@convert.command()
@model_option("HF Llama/Mistral/Qwen2 checkpoint directory (TensorRT-LLM's --model_dir).")
@medusa_option("Medusa heads directory, any layout `medusa-forge heads` reads (--medusa_model_dir).", required=True)
@out_dir_option("Checkpoint directory to write.")
@dtype_option(
    "Checkpoint dtype (of the unquantized tensors for fp8).",
    default="float16",
    show_default=True,
    type=click.Choice(["float16", "bfloat16"]),
)
@click.option(
    "--tp-size",
    "--tp_size",
    "tp_size",
    default=1,
    show_default=True,
    help="Tensor-parallel ranks: one rank{i}.safetensors each.",
)
@click.option(
    "--quantization",
    "--qformat",
    "quantization",
    type=click.Choice(["fp8"]),
    default=None,
    help="fp8: FP8 block GEMMs with calibrated per-tensor scales (quantize.py --qformat fp8).",
)
@click.option(
    "--kv-cache-dtype",
    "--kv_cache_dtype",
    "kv_cache_dtype",
    type=click.Choice(["fp8"]),
    default=None,
    help="fp8: also write KV-cache scales (needs --quantization fp8).",
)
@calib_prompts_option(
    "JSONL with a 'prompt' field per line: FP8 calibration text (default: the set shipped with medusa-forge)."
)
@click.option(
    "--calib-size",
    "--calib_size",
    "calib_size",
    default=512,
    show_default=True,
    help="Calibration prompts used (the first N).",
)
@click.option(
    "--calib-max-seq-len",
    "--calib_max_seq_length",
    "calib_max_seq_len",
    default=512,
    show_default=True,
    help="Tokens kept per calibration prompt.",
)
@click.option(
    "--trtllm-version",
    default=None,
    type=click.Choice(["1.2", "0.11"]),
    help="TensorRT-LLM release whose formats to write (default 1.2: TensorRT-LLM 1.2.1, Triton 26.07).",
)
@click.option(
    "--medusa-choices",
    default=None,
    help="The tree the engine will serve (preset, JSON file or list): max_draft_len is its node count "
    "(default mc_sim_7b_63: 63).",
)
@click.option(
    "--max-draft-len",
    "--max_draft_len",
    "--max_medusa_token_len",
    "max_draft_len",
    default=None,
    type=int,
    help="Override the draft tokens per step the engine is built for (default: the tree's node count).",
)
@click.option(
    "--num-heads",
    "--fixed_num_medusa_heads",
    "num_heads",
    default=None,
    type=int,
    help="Use the first N heads the files hold, whatever the heads' config.json says.",
)
@device_option("Where FP8 calibration runs (default: cuda when available).")
@overwrite_option("Replace a non-empty --out.")
def trtllm(model, medusa, out, calib_prompts, **options):
    """Write config.json + rank{i}.safetensors as TensorRT-LLM's Medusa converter (and quantize.py for fp8).

    Then: `trtllm-build --checkpoint_dir OUT --speculative_decoding_mode medusa ...` (or `medusa-forge build
    trtllm --checkpoint-dir OUT`); `medusa-forge generate --model OUT` runs it here.
    """
    from medusa_forge.convert.trtllm_checkpoint import ConvertOptions, convert_trtllm
    from medusa_forge.convert.trtllm_inspect import inspect_checkpoint

    calib = Path(calib_prompts) if calib_prompts else None
    opts = ConvertOptions(Path(model), Path(medusa), Path(out), calib_prompts=calib, **options)
    result = convert_trtllm(opts, log=lambda msg: click.echo(msg, err=True))
    report = inspect_checkpoint(result.out_dir, check_values=True)
    for line in report.summary_lines():
        click.echo(line)
    if result.calibration:
        click.echo(f"calibration   {json.dumps(result.calibration)}")
    if report.problems:  # a bug, not a user error: the writer and the schema disagree
        raise RuntimeError(f"converted checkpoint fails validation: {report.problems[:3]}")
    click.echo(
        f"wrote {result.out_dir} in {result.seconds:.1f} s; valid against the TensorRT-LLM {report.profile} schema"
    )


@convert.command(name="inspect")
@click.argument("ckpt_dir", type=click.Path())
@json_option("Print one JSON object.")
@click.option("--headers-only", is_flag=True, help="Skip reading scales and replicated tensors.")
@click.pass_context
def inspect_cmd(ctx, ckpt_dir, as_json, headers_only):
    """Summarise a TensorRT-LLM Medusa checkpoint and validate every tensor; exit 1 listing problems."""
    from medusa_forge.convert.trtllm_inspect import inspect_checkpoint

    report = inspect_checkpoint(ckpt_dir, check_values=not headers_only)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.summary_lines():
            click.echo(line)
        if report.ok:
            click.echo("valid: every expected tensor present with the expected shape and dtype, nothing extra")
        else:
            click.echo(f"INVALID: {len(report.problems)} problem(s)")
            for p in report.problems[:50]:
                click.echo(f"  - {p}")
            if len(report.problems) > 50:
                click.echo(f"  ... and {len(report.problems) - 50} more")
    if not report.ok:
        ctx.exit(1)

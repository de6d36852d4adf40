"""``medusa-forge build``: native | trtllm engines, and the compare-fp8 / compare-trees checks.

Flag names echo TensorRT-LLM's where they mean the same thing (``--checkpoint_dir``, ``--output_dir``,
``--max_batch_size``, ``--max_input_len``, ``--max_seq_len``, ``--max_num_tokens``, ``--gemm_plugin``,
``--medusa_choices``, ``--model_dir``, ``--medusa_model_dir``); both spellings are accepted.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from medusa_forge.cli_options import calib_prompts_option, out_dir_option, overwrite_option, report_option
from medusa_forge.engine.options import (
    device_option,
    dtype_option,
    max_seq_len_option,
    medusa_option,
    model_option,
    tree_option,
)
from medusa_forge.errors import ForgeError


@click.group(name="build")
def build() -> None:
    """Build engines: `native` (PyTorch, runs anywhere) or `trtllm` (wraps trtllm-build)."""


def _int_list(value: str | None, flag: str = "--search-sizes", example: str = "1,4,16,63") -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise ForgeError(f"{flag} {value!r}: expected comma-separated integers like {example}") from None
    if not sizes or min(sizes) < 1:
        raise ForgeError(f"{flag} {value!r}: values must be >= 1")
    return sizes


def split_option(name: str, help: str):
    """Which lines of a prompts file (load_prompt_split): the even/odd halves keep calibration and
    measurement apart."""
    return click.option(name, type=click.Choice(["all", "even", "odd"]), default="all", show_default=True, help=help)


def fp8_emulate_option(help: str | None = None):
    return click.option("--fp8-emulate", is_flag=True, help=help)


@build.command()
@model_option("HF checkpoint directory of the base model (TensorRT-LLM's --model_dir).")
@medusa_option("Medusa heads directory (FasterDecoding layout). Without it: a base-only engine.")
@out_dir_option("Engine directory to write.")
@dtype_option(
    "bfloat16 | float16 | float32 | fp8 (fp8: FP8 GEMMs on H100; elsewhere needs --fp8-emulate).",
    default="bfloat16",
    show_default=True,
)
@tree_option(
    "Choice tree: preset (mc_sim_7b_63, small, chain-N, topk-N), JSON file or list, or `auto` "
    "(searched on --calib-prompts for this device). Default: mc_sim_7b_63."
)
@calib_prompts_option("JSONL prompts for the auto tree, FP8 static scales and acceptance stats in the manifest.")
@split_option("--calib-split", "Use only even/odd lines of --calib-prompts (keep the other half for benchmarks).")
@click.option("--calib-limit", default=32, show_default=True, help="Calibration prompts used.")
@click.option(
    "--calib-prompt-tokens", default=256, show_default=True, help="Calibration prompts keep their last N tokens."
)
@click.option("--calib-new-tokens", default=64, show_default=True, help="Greedy tokens per calibration prompt.")
@click.option("--search-sizes", default=None, help="Tree sizes (draft nodes) timed by the auto search, e.g. 1,4,16,63.")
@click.option(
    "--max-tree-nodes",
    default=63,
    show_default=True,
    help="Largest auto tree (draft nodes; 63 = TensorRT-LLM's default max_draft_len).",
)
@click.option(
    "--search-depths",
    default=None,
    help="Tree depth limits tried by the auto search, e.g. 3,4,5 (default: 2 .. number of heads).",
)
@click.option("--timing-prompts", default=4, show_default=True, help="Prompts decoded per timed tree size.")
@click.option("--timing-tokens", default=64, show_default=True, help="Tokens decoded per timing prompt.")
@max_seq_len_option("KV cache length recorded in the manifest (default 2048, capped by the model).")
@device_option("Device the build computes and verifies on (default: cuda if present).")
@fp8_emulate_option("Allow fp8 without FP8 tensor cores by emulating it (slow; checks).")
@click.option(
    "--fp8-activation",
    type=click.Choice(["dynamic", "static"]),
    default="dynamic",
    show_default=True,
    help="FP8 activation scales: per-token dynamic, or per-tensor calibrated on --calib-prompts.",
)
@click.option(
    "--fp8-keep",
    multiple=True,
    type=click.Choice(["attn.wqkv", "attn.wo", "ffn.w_gate_up", "ffn.w_down"]),
    help="Keep this kind of block GEMM in the compute dtype (repeatable; a quality knob).",
)
@click.option("--verify-tokens", default=16, show_default=True, help="Tokens generated to verify the built engine.")
@overwrite_option()
def native(
    model,
    medusa,
    out,
    dtype,
    tree,
    calib_prompts,
    calib_split,
    calib_limit,
    calib_prompt_tokens,
    calib_new_tokens,
    search_sizes,
    max_tree_nodes,
    search_depths,
    timing_prompts,
    timing_tokens,
    max_seq_len,
    device,
    fp8_emulate,
    fp8_activation,
    fp8_keep,
    verify_tokens,
    overwrite,
):
    """Build a self-contained native engine (weights, heads, tokenizer, tree, manifest) and verify it."""
    from medusa_forge.build.native import NativeBuildConfig, build_native
    from medusa_forge.build.tree_search import SearchConfig

    search = SearchConfig(
        calib_limit=calib_limit,
        prompt_tokens=calib_prompt_tokens,
        new_tokens=calib_new_tokens,
        max_nodes=max_tree_nodes,
        timing_prompts=timing_prompts,
        timing_tokens=timing_tokens,
        depths=_int_list(search_depths, "--search-depths", "3,4,5") or (),
        **({"sizes": _int_list(search_sizes)} if search_sizes else {}),
    )
    cfg = NativeBuildConfig(
        model_dir=Path(model),
        out_dir=Path(out),
        dtype=dtype,
        medusa_dir=Path(medusa) if medusa else None,
        tree=tree,
        calib_prompts=Path(calib_prompts) if calib_prompts else None,
        calib_split=calib_split,
        max_seq_len=max_seq_len,
        device=device,
        fp8_emulate=fp8_emulate,
        fp8_activation=fp8_activation,
        fp8_keep=tuple(fp8_keep),
        overwrite=overwrite,
        verify_tokens=verify_tokens,
        search=search,
    )
    manifest = build_native(cfg)
    click.echo(
        f"native engine: {Path(out).absolute()}  dtype={manifest.dtype}  "
        f"tree={manifest.extra.get('tree_name')} ({len(manifest.medusa_choices or [])} nodes)"
    )
    stats = manifest.tree_stats
    if stats:
        click.echo(
            f"acceptance length: expected {stats['expected_acceptance_length']:.3f}, "
            f"measured {stats['measured_acceptance_length']:.3f} on {stats['calib_prompts']} calibration prompts"
        )
    verify = manifest.extra["verify"]
    click.echo(f"verify: {verify['tokens']} tokens; medusa == greedy: {verify.get('medusa_equals_greedy', 'n/a')}")


@build.command()
@click.option(
    "--checkpoint-dir",
    "--checkpoint_dir",
    "checkpoint_dir",
    required=True,
    type=click.Path(),
    help="TensorRT-LLM checkpoint (`medusa-forge convert` output).",
)
@out_dir_option("Engine directory to write.")
@click.option(
    "--medusa-choices",
    "--medusa_choices",
    "tree",
    default=None,
    help="Choice tree recorded for serving: preset, JSON file/list, or a native engine's medusa_forge.json.",
)
@click.option("--max-batch-size", "--max_batch_size", "max_batch_size", default=8, show_default=True)
@click.option(
    "--max-input-len",
    "--max_input_len",
    "max_input_len",
    default=None,
    type=int,
    help="Default: min(1024, max_seq_len - 1).",
)
@max_seq_len_option("Prompt + output tokens (default 2048, capped by max_position_embeddings).")
@click.option(
    "--max-num-tokens",
    "--max_num_tokens",
    "max_num_tokens",
    default=None,
    type=int,
    help="Default: max_input_len + max_batch_size * (max_draft_len + 1).",
)
@click.option(
    "--gemm-plugin",
    "--gemm_plugin",
    "gemm_plugin",
    default=None,
    type=click.Choice(["auto", "float16", "bfloat16", "float32", "fp8", "disable"]),
    help="Default: the checkpoint's dtype (float16 also for FP8 checkpoints, as in the Medusa example).",
)
@click.option(
    "--dry-run", "--dry_run", "dry_run", is_flag=True, help="Print the exact trtllm-build command; write nothing."
)
@click.option(
    "--trtllm-build", "trtllm_build", default="trtllm-build", show_default=True, help="trtllm-build executable."
)
@overwrite_option()
def trtllm(checkpoint_dir, out, **options):
    """Build a TensorRT-LLM engine with trtllm-build and write our manifest beside it."""
    from medusa_forge.build.trtllm import TrtllmBuildConfig, build_trtllm

    cfg = TrtllmBuildConfig(Path(checkpoint_dir), Path(out), **options)
    manifest = build_trtllm(cfg, echo=click.echo)
    if manifest is not None:
        click.echo(
            f"tensorrt_llm engine: {Path(out).absolute()}  dtype={manifest.dtype}  tree={manifest.extra['tree_name']}"
        )


@build.command(name="compare-fp8")
@click.option("--reference", required=True, type=click.Path(), help="Reference engine dir (e.g. the bf16 build).")
@click.option("--candidate", required=True, type=click.Path(), help="Engine under test (e.g. the fp8 build).")
@click.option("--prompts", required=True, type=click.Path(), help="Held-out prompts JSONL.")
@click.option("--limit", default=32, show_default=True, help="Prompts used.")
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--prompt-tokens", default=256, show_default=True, help="Prompts keep their last N tokens.")
@device_option()
@fp8_emulate_option("Emulate FP8 where there are no FP8 tensor cores.")
@click.option("--min-agreement", default=0.98, show_default=True, help="Fail (exit 2) below this greedy agreement.")
@click.option(
    "--timing/--no-timing",
    default=True,
    show_default=True,
    help="Also time plain and Medusa decoding steps of both engines.",
)
@report_option("Write the JSON report here.")
def compare_fp8_cmd(
    reference, candidate, prompts, limit, max_new_tokens, prompt_tokens, device, fp8_emulate, min_agreement, timing, out
):
    """Teacher-forced greedy agreement of an fp8 engine with its bf16 reference on held-out prompts."""
    from medusa_forge.build.compare import compare_fp8, load_prompt_split, save_report

    report = compare_fp8(
        reference,
        candidate,
        load_prompt_split(prompts, limit=limit),
        max_new_tokens,
        prompt_tokens,
        device,
        fp8_emulate,
        timing=timing,
    )
    if out:
        save_report(report, out)
    click.echo(json.dumps({k: v for k, v in report.items() if k != "per_prompt"}, indent=2))
    click.echo(
        f"greedy agreement {100 * report['greedy_agreement']:.2f}% over {report['positions']} positions "
        f"({report['prompts']} prompts x {max_new_tokens} tokens)"
    )
    for role, modes in report["timing"].items():
        click.echo(
            f"{role:9s} "
            + "  ".join(
                f"{mode}: {t['step_ms']:.3f} ms/step, {t['decode_tokens_per_s']:.1f} tokens/s"
                for mode, t in modes.items()
            )
        )
    if report["greedy_agreement"] < min_agreement:
        raise ForgeError(f"greedy agreement {report['greedy_agreement']:.4f} is below --min-agreement {min_agreement}")


@build.command(name="compare-trees")
@click.option(
    "--engine", required=True, type=click.Path(), help="Native engine dir (e.g. built with --medusa-choices auto)."
)
@click.option(
    "--trees",
    default="engine,mc_sim_7b_63,chain-5",
    show_default=True,
    help="Comma-separated trees; `engine` is the engine's own tree.",
)
@click.option("--prompts", required=True, type=click.Path(), help="Held-out prompts JSONL.")
@split_option("--split", "Use only even/odd lines (the half not used for calibration).")
@click.option("--limit", default=None, type=int, help="Prompts used (default: all of the split).")
@click.option("--max-new-tokens", default=128, show_default=True)
@click.option("--prompt-tokens", default=512, show_default=True)
@device_option()
@fp8_emulate_option()
@report_option("JSON report (a .md table is written beside it).")
def compare_trees_cmd(engine, trees, prompts, split, limit, max_new_tokens, prompt_tokens, device, fp8_emulate, out):
    """Measured tokens/s of several choice trees on one engine (same weights, same prompts)."""
    from medusa_forge.build.compare import compare_trees, load_prompt_split, save_report, trees_table

    names = [t.strip() for t in trees.split(",") if t.strip()]
    report = compare_trees(
        engine,
        names,
        load_prompt_split(prompts, split, limit),
        max_new_tokens,
        prompt_tokens,
        device,
        fp8_emulate=fp8_emulate,
    )
    table = trees_table(report)
    if out:
        save_report(report, out, table)
    click.echo(table)

"""``medusa-forge heads inspect|export``: Medusa heads in any layout, in and out."""

from __future__ import annotations

import json

import click

from medusa_forge.cli_options import json_option, out_dir_option, overwrite_option

TARGET_NAMES = ("fasterdecoding", "tgi", "vllm", "trtllm-medusa-dir", "axolotl")  # = layouts.TARGETS, without torch


@click.group()
def heads() -> None:
    """Inspect Medusa heads in any layout and export them to another tool's layout.

    Reads FasterDecoding heads-only dirs (v1 and version 2, .pt or .safetensors; also what TGI and
    TensorRT-LLM read), axolotl full-model checkpoints (medusa_head.* in the shards) and vLLM
    Medusa dirs, detected automatically. `--medusa DIR` on every engine command accepts the same.
    """


def base_model_option(help: str):
    return click.option("--base-model", "--model_dir", "base_model", type=click.Path(), default=None, help=help)


@heads.command("inspect")
@click.argument("directory", type=click.Path())
@base_model_option("Base model dir: check sizes (and vLLM's stored lm_head) against it.")
@json_option("Print the report as one JSON object.")
@click.pass_context
def inspect_cmd(ctx: click.Context, directory: str, base_model: str | None, as_json: bool) -> None:
    """Print a heads directory's layout, sizes, version and problems (exit 1 when there are any)."""
    from medusa_forge.heads.layouts import inspect_heads

    rep = inspect_heads(directory, base_model)
    if as_json:
        click.echo(json.dumps(rep.to_dict()))
    else:
        for label, value in _lines(rep):
            click.echo(f"{label + ':':<12} {value}")
    if rep.problems:
        ctx.exit(1)


def _lines(rep) -> list[tuple[str, str]]:
    def show(v) -> str:
        return "?" if v is None else str(v)

    lm_head = (
        "?"
        if rep.shared_lm_head is None
        else "shared base lm_head (version 2)"
        if rep.shared_lm_head
        else "per-head projections (v1)"
    )
    out = [
        ("directory", rep.directory),
        ("layout", f"{rep.layout} ({', '.join(f.rsplit('/', 1)[-1] for f in rep.files)})" if rep.layout else "?"),
        ("heads", show(rep.heads)),
        ("layers", f"{show(rep.layers)} ResBlock(s) per head"),
        ("hidden", show(rep.hidden)),
        ("vocab", show(rep.vocab)),
        ("lm_head", lm_head),
        ("dtype", show(rep.dtype)),
    ]
    if rep.base_model_name_or_path:
        out.append(("base model", rep.base_model_name_or_path))
    if rep.loads_in:
        out.append(("loads in", ", ".join(rep.loads_in)))
    for target, why in rep.export_needed.items():
        out.append(("export for", f"{target}: {why}"))
    out += [("problems", p) for p in rep.problems] or [("problems", "none")]
    return out


@heads.command("export")
@click.option(
    "--from",
    "--medusa_model_dir",
    "src",
    required=True,
    type=click.Path(),
    help="Heads directory in any supported layout (TensorRT-LLM's --medusa_model_dir).",
)
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Choice(TARGET_NAMES),
    help="Layout to write, exactly as that tool loads it.",
)
@out_dir_option("Output directory (written atomically).")
@base_model_option(
    "Base model dir: needed to give shared-lm_head heads per-head projections (trtllm-medusa-dir, "
    "axolotl, tgi with >1 layer), for vLLM's lm_head copy, and for axolotl's full model."
)
@overwrite_option("Replace a non-empty --out.")
@json_option("Print the result as one JSON object.")
def export_cmd(src: str, target: str, out: str, base_model: str | None, overwrite: bool, as_json: bool) -> None:
    """Write heads in another tool's layout (config fields included); tensors are copied bit for bit."""
    from dataclasses import asdict

    from medusa_forge.heads.layouts import export_heads

    res = export_heads(src, target, out, base_model=base_model, overwrite=overwrite)
    if as_json:
        click.echo(json.dumps(asdict(res)))
        return
    version = "shared base lm_head" if res.shared_lm_head else "per-head projections"
    click.echo(
        f"exported {res.num_heads} heads x {res.num_layers} layers ({version}) from {res.layout} to {res.target}: "
        f"{res.out} [{', '.join(res.files)}]"
    )
    if res.expanded:
        click.echo("shared lm_head copied into each head's projection (the target needs one per head)")
    if target == "trtllm-medusa-dir":
        click.echo(
            f"next: python examples/medusa/convert_checkpoint.py --model_dir <base> --medusa_model_dir {res.out} "
            f"--num_medusa_heads {res.num_heads} --num_medusa_layers {res.num_layers} --output_dir <ckpt>"
        )

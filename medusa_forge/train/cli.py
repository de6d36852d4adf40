"""``medusa-forge train-heads``: Medusa-1 heads on a frozen base model.

Flag names follow FasterDecoding's trainer where they mean the same thing (--medusa-num-heads is
--num-heads, --model_name_or_path is --model, --model_max_length is --max-seq-len).
"""

from __future__ import annotations

import click

from medusa_forge.cli_options import out_dir_option, overwrite_option, progress_option
from medusa_forge.engine.options import device_option, max_seq_len_option, model_option
from medusa_forge.train.config import SCHEDULES, TrainConfig

CONTEXT = {"max_content_width": 110}


@click.command(context_settings=CONTEXT)
@model_option("Base HF checkpoint directory (frozen).", aliases=("--model_name_or_path",))
@out_dir_option("Heads directory to write (FasterDecoding layout + train_report.*).")
@click.option(
    "--data", type=click.Path(), default=None, help="JSONL with text, prompt/completion, or messages (chat template)."
)
@click.option("--self-distill", is_flag=True, help="Let the base model write the targets from prompts.")
@click.option("--prompts", type=click.Path(), default=None, help="Self-distillation prompts (JSONL, 'prompt').")
@click.option(
    "--prompts-from-python-sources",
    default=0,
    show_default=True,
    help="Self-distillation prompts cut from this Python's stdlib/site-packages (N prompts).",
)
@click.option(
    "--sources-root",
    "sources_roots",
    multiple=True,
    type=click.Path(),
    help="Where to take Python sources from instead (repeatable).",
)
@click.option(
    "--exclude-sources",
    type=click.Path(),
    default=None,
    help="Held-out JSONL whose 'source' paths/prompts are never trained on (default: --eval-prompts).",
)
@click.option("--distill-new-tokens", default=128, show_default=True)
@click.option("--distill-samples-per-prompt", default=1, show_default=True)
@click.option("--distill-temperature", default=0.0, show_default=True, help="0 = greedy continuations.")
@click.option("--distill-batch-size", default=0, show_default=True, help="0: 512 on CUDA, 16 on CPU.")
@click.option("--num-heads", "--medusa_num_heads", "num_heads", default=5, show_default=True)
@click.option("--num-layers", "--medusa_num_layers", "num_layers", default=1, show_default=True)
@click.option("--shared-lm-head", is_flag=True, help="'Version 2' heads: no own vocab projection.")
@click.option("--epochs", default=3, show_default=True)
@click.option("--max-steps", default=0, show_default=True, help="Stop after N steps (0: run all epochs).")
@click.option(
    "--max-train-minutes",
    default=0.0,
    show_default=True,
    help="Stop training after this long (then evaluate and save as usual); 0: no limit.",
)
@click.option("--lr", "--learning_rate", "lr", default=1e-3, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default="cosine", show_default=True)
@click.option("--warmup-ratio", default=0.03, show_default=True)
@click.option("--weight-decay", default=0.0, show_default=True)
@click.option("--max-grad-norm", default=1.0, show_default=True)
@max_seq_len_option(None, alias="--model_max_length", default=256)
@click.option("--batch-size", default=8, show_default=True, help="Sequences per step.")
@click.option("--heads-coefficient", default=0.2, show_default=True)
@click.option("--decay-coefficient", default=0.8, show_default=True)
@click.option("--val-fraction", default=0.05, show_default=True, help="Held-out split of the training data.")
@click.option("--eval-every", default=0, show_default=True, help="Steps between evaluations (0: ~10 per run).")
@click.option(
    "--eval-prompts",
    type=click.Path(),
    default=None,
    help="Held-out prompts JSONL: report head accuracy on the base's greedy continuations.",
)
@click.option("--eval-new-tokens", default=128, show_default=True)
@click.option(
    "--eval-acceptance",
    default=0,
    show_default=True,
    help="Also decode N eval prompts with the native engine and report mean acceptance length.",
)
@click.option("--eval-tree", "--medusa-choices", "eval_tree", default="mc_sim_7b_63", show_default=True)
@device_option()
@click.option("--bf16/--no-bf16", default=None, help="Base model in bf16 + autocast (default: on for CUDA).")
@click.option("--save-every", default=0, show_default=True, help="Checkpoint every N steps (0: every epoch).")
@click.option("--log-every", default=10, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run checkpointed in <out>.ckpt.")
@overwrite_option("Replace --out and any old checkpoint.")
@click.option("--seed", default=0, show_default=True)
@progress_option()
def train_heads(**kw) -> None:
    """Train Medusa-1 heads on a frozen base, with optional self-distillation and a head-quality report."""
    from medusa_forge.train.pipeline import train_heads as run

    kw["sources_roots"] = tuple(kw["sources_roots"])
    report = run(TrainConfig(**kw))
    s = report["summary"]
    parts = [f"steps {s['steps']}", f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}"]
    for split in ("val", "eval_prompts"):
        if f"{split}_head1_top1" in s:
            parts.append(f"{split} head-1 top-1 {s[f'{split}_head1_top1']:.3f} top-5 {s[f'{split}_head1_top5']:.3f}")
    if "mean_accepted" in s:
        parts.append(f"mean acceptance {s['mean_accepted']:.3f}")
    click.echo(f"wrote {kw['out']}: " + ", ".join(parts))

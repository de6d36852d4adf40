"""The head-quality report: ``train_report.json`` (machine-readable), ``train_report.md``, ``loss_curve.png``.

Heads are numbered from 1 in the report, as the issue and the Medusa paper do: head 1 predicts the
token two places ahead (t+2), head k the token t+k+1. Accuracy figures come from the last
evaluation (end of training); ``history``/``evals`` keep the curves.
"""

from __future__ import annotations

import json
from pathlib import Path

from medusa_forge.atomic import atomic_write_json, atomic_write_text
from medusa_forge.heads.medusa_head import MedusaHeadsConfig
from medusa_forge.train.config import TrainConfig
from medusa_forge.train.loss import head_weights
from medusa_forge.train.trainer import LoopState

REPORT_JSON = "train_report.json"
REPORT_MD = "train_report.md"
LOSS_PNG = "loss_curve.png"
FORMAT = "medusa-forge/train-report/1"


def build_report(
    cfg: TrainConfig,
    heads_cfg: MedusaHeadsConfig,
    data: dict,
    loop: LoopState,
    acceptance: dict | None,
    *,
    device: str,
    dtype: str,
    saved_dtype: str,
    wall_seconds: float,
) -> dict:
    final = loop.evals[-1] if loop.evals else {}
    history = loop.history
    summary = {
        "steps": loop.step,
        "first_loss": history[0]["loss"] if history else None,
        "final_loss": history[-1]["loss"] if history else None,
    }
    for split in ("val", "eval_prompts"):
        if split in final:
            summary[f"{split}_head1_top1"] = final[split]["top1"][0]
            summary[f"{split}_head1_top5"] = final[split]["top5"][0]
    if acceptance:
        summary["mean_accepted"] = acceptance["mean_accepted"]
    return {
        "format": FORMAT,
        "model": cfg.model,
        "summary": summary,
        "heads": {
            "num_heads": heads_cfg.num_heads,
            "num_layers": heads_cfg.num_layers,
            "shared_lm_head": heads_cfg.shared_lm_head,
            "hidden_size": heads_cfg.hidden_size,
            "vocab_size": heads_cfg.vocab_size,
            "saved_dtype": saved_dtype,
        },
        "run": {
            "device": device,
            "base_dtype": dtype,
            "steps": loop.step,
            "planned_steps": loop.planned_steps,
            "stopped_early": loop.stopped_early,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "schedule": cfg.schedule,
            "train_seconds": round(loop.seconds, 3),
            "wall_seconds": round(wall_seconds, 3),
            "targets_seen": loop.targets_seen,
        },
        "loss": {
            "heads_coefficient": cfg.heads_coefficient,
            "decay_coefficient": cfg.decay_coefficient,
            "head_weights": head_weights(heads_cfg.num_heads, cfg.heads_coefficient, cfg.decay_coefficient),
        },
        "data": data,
        "val": final.get("val"),
        "eval_prompts": final.get("eval_prompts"),
        "acceptance": acceptance,
        "history": history,
        "evals": loop.evals,
        "config": cfg.to_dict(),
    }


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def render_markdown(report: dict) -> str:
    h, run, s = report["heads"], report["run"], report["summary"]
    lines = [
        "# Medusa heads: training report",
        "",
        f"- base model: `{report['model']}`",
        (
            f"- heads: {h['num_heads']} x {h['num_layers']} ResBlock(s), "
            f"{'shared lm_head (version 2)' if h['shared_lm_head'] else 'own vocab projection (Medusa-1)'}, "
            f"saved as {h['saved_dtype']}"
        ),
        (
            f"- run: {run['steps']} steps, batch {run['batch_size']}, lr {run['lr']} ({run['schedule']}), "
            f"{run['device']} / {run['base_dtype']}, {run['train_seconds']:.1f} s training, "
            f"{run['wall_seconds']:.1f} s wall" + (" (stopped by --max-train-minutes)" if run["stopped_early"] else "")
        ),
        (
            f"- loss: {_fmt(s['first_loss'])} -> {_fmt(s['final_loss'])} (weighted, "
            f"heads coefficient {report['loss']['heads_coefficient']}, decay {report['loss']['decay_coefficient']})"
        ),
        "",
        "| head | predicts | val top-1 | val top-5 | eval top-1 | eval top-5 | eval positions |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    val, ev = report.get("val") or {}, report.get("eval_prompts") or {}
    for k in range(h["num_heads"]):

        def pick(d: dict, key: str, k: int = k):
            return d[key][k] if d else None

        lines.append(
            f"| {k + 1} | t+{k + 2} | {_fmt(pick(val, 'top1'))} | {_fmt(pick(val, 'top5'))} | "
            f"{_fmt(pick(ev, 'top1'))} | {_fmt(pick(ev, 'top5'))} | {pick(ev, 'positions') or '-'} |"
        )
    lines.append("")
    if report["data"].get("eval_prompts"):
        e = report["data"]["eval_prompts"]
        lines.append(
            f"Eval: {e['prompts']} held-out prompts from `{e['path']}`, {e['new_tokens']} greedy tokens "
            "each from the base model; head k is right when its top-1/top-5 holds the base's token."
        )
    if report.get("acceptance"):
        a = report["acceptance"]
        lines.append(
            f"Native engine, tree `{a['tree']}` ({a['tree_nodes']} nodes): mean acceptance "
            f"**{a['mean_accepted']:.3f}** tokens/step over {a['prompts']} prompts "
            f"(per-prompt median {a['per_prompt_median']:.3f})."
        )
    lines += [
        "",
        f"Data: `{json.dumps(report['data'].get('sources', {}), sort_keys=True)[:600]}`",
        "",
        f"![loss curve]({LOSS_PNG})",
        "",
    ]
    return "\n".join(lines)


def plot_curves(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist, evals = report["history"], report["evals"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in hist]
    K = report["heads"]["num_heads"]
    for k in range(K):
        ax1.plot(steps, [r["head_loss"][k] for r in hist], lw=1, label=f"head {k + 1}")
    ax1.set(xlabel="step", ylabel="cross entropy (train)", title="per-head training loss")
    ax1.legend(fontsize=7)
    split = "eval_prompts" if evals and "eval_prompts" in evals[-1] else "val"
    for k in range(K):
        pts = [(e["step"], e[split]["top1"][k]) for e in evals if split in e]
        if pts:
            ax2.plot(*zip(*pts), marker="o", ms=3, lw=1, label=f"head {k + 1}")
    ax2.set(xlabel="step", ylabel="top-1 accuracy", title=f"top-1 on {split}", ylim=(0, 1))
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out_dir: Path, report: dict) -> None:
    atomic_write_json(out_dir / REPORT_JSON, report)
    atomic_write_text(out_dir / REPORT_MD, render_markdown(report))
    plot_curves(report, out_dir / LOSS_PNG)

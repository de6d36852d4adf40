"""The demo's figures, read back from the files the stages wrote, and the table the terminal shows."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def _read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def summarize(run) -> dict[str, Any]:
    """One dict of what the demo showed (``run`` is a pipeline.DemoRun whose stages all ran)."""
    speed = _read(run.path("report", "report.json"))["speed"]
    cmp_ = _read(run.path("report", "report.json"))["mmlu_comparison"]
    base, med = (_read(run.path("eval", f"mmlu_{m}.json")) for m in ("base", "medusa"))
    overall = speed["overall"]
    return {
        "engine": run.results["engine"],
        "server": run.results["server"],
        "query": run.results["query"],
        "tokens_per_step": overall["medusa"]["mean_acceptance_length"],
        "speed": {
            "overall": {
                "speedup": overall["speedup"],
                "base_tokens_per_s": overall["base"]["tokens_per_s"],
                "medusa_tokens_per_s": overall["medusa"]["tokens_per_s"],
            },
            "per_topic": {
                t: {
                    "speedup": v["speedup"],
                    "tokens_per_step": v["medusa"]["mean_acceptance_length"],
                    "base_tokens_per_s": v["base"]["tokens_per_s"],
                    "medusa_tokens_per_s": v["medusa"]["tokens_per_s"],
                    "identical": v["identical"],
                    "prompts": v["prompts"],
                }
                for t, v in speed["per_topic"].items()
            },
            "max_tokens": speed["config"]["max_tokens"],
        },
        "outputs_identical": {
            "identical": overall["identical"],
            "prompts": overall["prompts"],
            "all": speed["all_identical"],
        },
        "mmlu": {
            "base_accuracy": base["micro_accuracy"],
            "medusa_accuracy": med["micro_accuracy"],
            "delta_points": cmp_["micro_delta_points"],
            "same_answers": cmp_["same_answers"],
            "questions": cmp_["compared"],
            "all_identical": cmp_["all_answers_identical"],
        },
        "promotion": run.results["promotion"],
        "degraded": run.results["degraded"],
        "report": str(run.path("report", "report.md")),
        "plots": sorted(str(p) for p in run.path("report").glob("*.png")),
        "out": str(run.path()),
        "wall_s": round(time.perf_counter() - run.t0, 1),
    }


def passed(summary: dict[str, Any]) -> bool:
    """What the demo must show: the candidate promoted, the degraded one rejected with the registry as it was."""
    return bool(
        summary["promotion"]["promoted"]
        and summary["degraded"]["rejected"]
        and summary["degraded"]["registry_unchanged"]
    )


def _rel(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def render(summary: dict[str, Any], console=None) -> None:
    """The summary table (rich): what a user came for, one row each, then the per-topic speedups."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    e, s, m, p, d = (summary[k] for k in ("engine", "speed", "mmlu", "promotion", "degraded"))
    ident = summary["outputs_identical"]
    t = Table(title=f"medusa-forge demo ({summary['wall_s']:.0f} s)", show_header=True, header_style="bold")
    t.add_column("what")
    t.add_column("result")
    t.add_row(
        "engines", f"native, {e['dtype']} on {e['device']}; {e['num_heads']} heads, tree of {e['tree_nodes']} nodes"
    )
    t.add_row(
        "streamed gRPC query",
        f"{summary['query']['tokens']} tokens in {summary['query']['responses']} responses, "
        f"TTFT {summary['query']['ttft_ms']:.0f} ms",
    )
    t.add_row("tokens/step (Medusa)", f"{summary['tokens_per_step']:.2f}")
    t.add_row(
        "speedup, all topics",
        f"{s['overall']['speedup']:.2f}x ({s['overall']['medusa_tokens_per_s']:.1f} vs "
        f"{s['overall']['base_tokens_per_s']:.1f} tokens/s)",
    )
    t.add_row(
        "MMLU (fixture) base / Medusa",
        f"{100 * m['base_accuracy']:.2f} / {100 * m['medusa_accuracy']:.2f}: "
        f"delta {m['delta_points']:+.2f} points, same answer "
        f"{m['same_answers']}/{m['questions']}",
    )
    t.add_row("greedy outputs identical", f"{ident['identical']}/{ident['prompts']} prompts")
    t.add_row("promotion gates", f"MMLU drop 0, identical answers and outputs, slowest topic >= {p['min_speedup']}x")
    t.add_row(
        "promote candidate",
        f"promoted {p['version']}: {_rel(p['current'])}"
        if p["promoted"]
        else f"REJECTED ({', '.join(p['failed_gates'])})",
    )
    t.add_row(
        "promote degraded candidate",
        ("rejected" if d["rejected"] else "PROMOTED")
        + f" ({', '.join(d['failed_gates'])}); registry "
        + ("unchanged" if d["registry_unchanged"] else "CHANGED"),
    )
    t.add_row("report", f"{_rel(summary['report'])} (+ {len(summary['plots'])} PNG)")
    console.print(t)
    topics = Table(title=f"eval speed per topic ({s['max_tokens']} new tokens, greedy)", header_style="bold")
    for col in ("topic", "base tok/s", "Medusa tok/s", "speedup", "tokens/step", "identical"):
        topics.add_column(col, justify="left" if col == "topic" else "right")
    for name, v in s["per_topic"].items():
        topics.add_row(
            name,
            f"{v['base_tokens_per_s']:.1f}",
            f"{v['medusa_tokens_per_s']:.1f}",
            f"{v['speedup']:.2f}x",
            f"{v['tokens_per_step']:.2f}",
            f"{v['identical']}/{v['prompts']}",
        )
    console.print(topics)

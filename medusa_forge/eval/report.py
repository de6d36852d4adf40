"""``eval report``: MMLU and speed results -> ``report.json``, ``report.md`` and PNG plots.

``report.json`` is what ``promote`` reads: the candidate's MMLU (per subject and per question),
the baseline's when given and the difference in accuracy points, the per-topic speed figures and
whether every greedy output matched. Inputs must be complete runs (never a partial cache).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from medusa_forge.atomic import atomic_output_dir
from medusa_forge.errors import ForgeError
from medusa_forge.eval.cache import read_complete
from medusa_forge.manifest import MANIFEST_NAME, is_engine_dir, sha256_file


def mmlu_summary(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": doc.get("model"),
        "data": doc.get("data"),
        "split": doc.get("split"),
        "shots": doc.get("shots"),
        "macro_accuracy": doc["macro_accuracy"],
        "micro_accuracy": doc["micro_accuracy"],
        "num_questions": doc["num_questions"],
        "invalid_answers": doc.get("invalid_answers", 0),
        "subjects": {s: {k: v[k] for k in ("correct", "total", "accuracy")} for s, v in doc["subjects"].items()},
        "answers": {q["id"]: q["predicted"] for q in doc["questions"]},
    }


def compare_mmlu(candidate: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Accuracy deltas in points (candidate - baseline) and per-question answer agreement."""
    a, b = candidate["answers"], baseline["answers"]
    if set(a) != set(b) or candidate.get("shots") != baseline.get("shots"):
        raise ForgeError(
            "candidate and baseline MMLU results cover different questions or shot counts; "
            "run both with the same --data/--subjects/--shots/--limit"
        )
    differing = sorted(q for q in a if a[q] != b[q])
    subjects = sorted(set(candidate["subjects"]) & set(baseline["subjects"]))
    return {
        "macro_delta_points": round(100 * (candidate["macro_accuracy"] - baseline["macro_accuracy"]), 4),
        "micro_delta_points": round(100 * (candidate["micro_accuracy"] - baseline["micro_accuracy"]), 4),
        "per_subject_delta_points": {
            s: round(100 * (candidate["subjects"][s]["accuracy"] - baseline["subjects"][s]["accuracy"]), 4)
            for s in subjects
        },
        "compared": len(a),
        "same_answers": len(a) - len(differing),
        "all_answers_identical": not differing,
        "differing": differing,
    }


def speed_summary(doc: dict[str, Any]) -> dict[str, Any]:
    keep = ("prompts", "speedup", "identical", "identical_fraction")
    return {
        "backend": doc.get("backend"),
        "base_model": doc.get("base_model"),
        "medusa_model": doc.get("medusa_model"),
        "config": doc.get("config"),
        "per_topic": {
            t: {**{k: v[k] for k in keep}, "base": v["base"], "medusa": v["medusa"]}
            for t, v in doc["per_topic"].items()
        },
        "overall": {
            **{k: doc["overall"][k] for k in keep},
            "base": doc["overall"]["base"],
            "medusa": doc["overall"]["medusa"],
        },
        "min_topic_speedup": doc["overall"]["min_topic_speedup"],
        "all_identical": doc["overall"]["all_identical"],
        "mismatches": doc.get("mismatches", []),
    }


def engine_fingerprint(engine_dir: str | Path) -> dict[str, str]:
    """Which engine a report speaks for: the hash of its manifest (which itself hashes the inputs)."""
    engine_dir = Path(engine_dir)
    if not is_engine_dir(engine_dir):
        raise ForgeError(f"{engine_dir}: not an engine directory (no {MANIFEST_NAME})")
    return {"path": str(engine_dir.resolve()), "manifest_sha256": sha256_file(engine_dir / MANIFEST_NAME)}


def build_report(
    mmlu: str | Path,
    baseline_mmlu: str | Path | None = None,
    speed: str | Path | None = None,
    engine: str | Path | None = None,
) -> dict[str, Any]:
    cand = mmlu_summary(read_complete(mmlu, "mmlu"))
    base = mmlu_summary(read_complete(baseline_mmlu, "mmlu")) if baseline_mmlu else None
    spd = speed_summary(read_complete(speed, "speed")) if speed else None
    inputs = {"mmlu": str(Path(mmlu).resolve()), "mmlu_sha256": sha256_file(mmlu)}
    if baseline_mmlu:
        inputs |= {
            "baseline_mmlu": str(Path(baseline_mmlu).resolve()),
            "baseline_mmlu_sha256": sha256_file(baseline_mmlu),
        }
    if speed:
        inputs |= {"speed": str(Path(speed).resolve()), "speed_sha256": sha256_file(speed)}
    return {
        "kind": "report",
        "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": inputs,
        "engine": engine_fingerprint(engine) if engine else None,
        "mmlu": cand,
        "baseline_mmlu": base,
        "mmlu_comparison": compare_mmlu(cand, base) if base else None,
        "speed": spd,
    }


def render_markdown(rep: dict[str, Any], plots: list[str]) -> str:
    m, cmp_, spd = rep["mmlu"], rep["mmlu_comparison"], rep["speed"]
    lines = ["# Evaluation report", "", f"Created {rep['created']}."]
    if rep.get("engine"):
        lines += ["", f"Engine: `{rep['engine']['path']}` (manifest sha256 `{rep['engine']['manifest_sha256'][:12]}`)"]
    lines += [
        "",
        "## MMLU",
        "",
        f"Model `{m['model']}`, {m['shots']}-shot, {m['num_questions']} questions "
        f"({m['invalid_answers']} replies without a letter).",
        "",
    ]
    base = rep["baseline_mmlu"]
    head = "| subject | accuracy |" + (" baseline | delta (points) |" if base else "")
    lines += [head, "|---|---:|" + ("---:|---:|" if base else "")]
    for s, v in m["subjects"].items():
        row = f"| {s} | {100 * v['accuracy']:.1f} |"
        if base and s in base["subjects"]:
            row += f" {100 * base['subjects'][s]['accuracy']:.1f} | {cmp_['per_subject_delta_points'][s]:+.1f} |"
        lines.append(row)
    for kind in ("macro", "micro"):
        row = f"| **{kind} average** | {100 * m[f'{kind}_accuracy']:.2f} |"
        if base:
            row += f" {100 * base[f'{kind}_accuracy']:.2f} | {cmp_[f'{kind}_delta_points']:+.2f} |"
        lines.append(row)
    if cmp_:
        lines += ["", f"Same answer as the baseline on {cmp_['same_answers']}/{cmp_['compared']} questions."]
    if spd:
        o = spd["overall"]
        lines += [
            "",
            "## Speed",
            "",
            f"`{spd['medusa_model']}` against `{spd['base_model']}` ({spd['backend']}), "
            f"{spd['config']['max_tokens']} new tokens, {spd['config']['trials']} trial(s), greedy.",
            "",
            "| topic | prompts | base tok/s | Medusa tok/s | speedup | tokens/step | TTFT p50 ms (base / Medusa) "
            "| latency p50/p90/p99 ms (Medusa) | identical |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, v in list(spd["per_topic"].items()) + [("**all**", o)]:
            b, md = v["base"], v["medusa"]
            acc = md["mean_acceptance_length"]
            lat = md["latency_ms"]
            lines.append(
                f"| {name} | {v['prompts']} | {b['tokens_per_s']:.1f} | {md['tokens_per_s']:.1f} | "
                f"{v['speedup']:.2f}x | {acc if acc is not None else 'n/a'} | "
                f"{b['ttft_ms']['p50']:.1f} / {md['ttft_ms']['p50']:.1f} | "
                f"{lat['p50']:.1f} / {lat['p90']:.1f} / {lat['p99']:.1f} | {v['identical']}/{v['prompts']} |"
            )
        lines += [
            "",
            f"Slowest topic speedup {spd['min_topic_speedup']:.2f}x; greedy outputs "
            + ("all identical." if spd["all_identical"] else f"differ in {len(spd['mismatches'])} request pair(s)."),
        ]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(
    out: str | Path,
    mmlu: str | Path,
    baseline_mmlu: str | Path | None = None,
    speed: str | Path | None = None,
    engine: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build the report and write ``out/`` atomically (report.json, report.md, plots)."""
    import json

    from medusa_forge.eval.cache import read_json
    from medusa_forge.eval.plots import draw_plots

    rep = build_report(mmlu, baseline_mmlu, speed, engine)
    speed_doc = read_json(speed, "speed results") if speed else None
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        plots = draw_plots(tmp, rep, speed_doc)
        rep["plots"] = plots
        (tmp / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
        (tmp / "report.md").write_text(render_markdown(rep, plots))
    return rep

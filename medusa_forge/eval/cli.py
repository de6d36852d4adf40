"""``medusa-forge eval {mmlu,speed,report}`` and ``medusa-forge promote``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click

from medusa_forge.cli_options import overwrite_option, progress_option, report_option, with_options
from medusa_forge.engine.options import no_medusa_option, opening_options, uses_heads
from medusa_forge.errors import ForgeError


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or name)


def _split_list(values: tuple[str, ...]) -> list[str]:
    return [v for item in values for v in item.split(",") if v]


def _tokenizer(path: str | None):
    """A tokenizer directory, or a native engine directory (its ``model/`` holds the tokenizer)."""
    if path is None:
        return None
    from medusa_forge.manifest import is_engine_dir
    from medusa_forge.model.tokenizer import Tokenizer

    path = Path(path)
    if is_engine_dir(path) and (path / "model").is_dir():
        path = path / "model"
    return Tokenizer(path)


# the Triton side of mmlu and speed
url_option = click.option("--url", default=None, help="Triton gRPC endpoint HOST:PORT.")
timeout_option = click.option("--timeout", default=300.0, show_default=True, help="Seconds per request.")


def tokenizer_option(help: str):
    return click.option("--tokenizer", type=click.Path(), default=None, help=help)


in_process_options = [
    click.option(
        "--in-process",
        is_flag=True,
        help="Measure native engines in this process instead of a Triton server (model names are "
        "then engine or HF model directories). For GPU boxes without tritonserver.",
    ),
    *opening_options("--in-process: "),
]


@click.group(name="eval")
def eval_group() -> None:
    """Evaluate served engines: MMLU regression, per-topic speed against the base, and a report.

    Requests go through Triton over gRPC (what is measured is what is served); `--in-process`
    measures native engines directly where no tritonserver is available.
    """


# ---------------------------------------------------------------- mmlu
@eval_group.command("mmlu")
@url_option
@click.option("--model", required=True, help="Triton model name (with --in-process: engine directory).")
@click.option(
    "--data",
    type=click.Path(),
    required=True,
    help="MMLU directory: original CSV layout (dev/ val/ test/) or cais/mmlu parquet/JSONL layout.",
)
@click.option("--subjects", multiple=True, help="Subjects to run (repeatable or comma-separated; default: all).")
@click.option("--split", type=click.Choice(["test", "val", "dev"]), default="test", show_default=True)
@click.option("--shots", default=5, show_default=True, help="Dev examples in each prompt (k-shot).")
@click.option("--limit", default=None, type=int, help="First N questions of each subject.")
@click.option("--concurrency", default=4, show_default=True, help="Requests in flight.")
@tokenizer_option(
    "Tokenizer (or native engine) dir: drop shots until the prompt fits --max-prompt-tokens (as the original does)."
)
@click.option("--max-prompt-tokens", default=2048, show_default=True)
@timeout_option
@no_medusa_option("--in-process: decode with the base model only (default: Medusa when the engine has heads).")
@with_options(in_process_options)
@report_option("Results JSON (default: mmlu-<model>.json).")
@progress_option()
def mmlu(
    url,
    model,
    data,
    subjects,
    split,
    shots,
    limit,
    concurrency,
    tokenizer,
    max_prompt_tokens,
    timeout,
    no_medusa,
    in_process,
    out,
    progress,
    **opening,
):
    """MMLU k-shot accuracy of one model (greedy one-token answer), per subject and macro/micro."""
    from medusa_forge.eval.runs import run_mmlu

    tok = _tokenizer(tokenizer)
    backend = _backend(url, model, timeout, in_process, opening, use_medusa=not no_medusa)
    if tok is None and in_process:
        tok = backend.engine.tokenizer
    out = Path(out or f"mmlu-{_slug(model)}.json")
    try:
        doc = run_mmlu(
            backend,
            Path(data),
            split,
            _split_list(subjects),
            shots,
            limit,
            concurrency,
            out,
            count_tokens=(lambda s: len(tok.encode(s))) if tok else None,
            max_prompt_tokens=max_prompt_tokens,
            progress=progress,
            meta={"url": url},
        )
    finally:
        _close(backend)
    for s, v in doc["subjects"].items():
        click.echo(f"{s:40s} {100 * v['accuracy']:6.2f}  ({v['correct']}/{v['total']})")
    click.echo(f"{'macro average':40s} {100 * doc['macro_accuracy']:6.2f}")
    click.echo(
        f"{'micro average':40s} {100 * doc['micro_accuracy']:6.2f}  ({doc['num_questions']} questions, "
        f"{doc['invalid_answers']} without a letter)"
    )
    click.echo(f"wrote {out}")


# ---------------------------------------------------------------- speed
@eval_group.command("speed")
@url_option
@click.option("--base-model", required=True, help="Triton model name of the base (with --in-process: engine dir).")
@click.option("--medusa-model", required=True, help="Triton model name of the Medusa engine (or engine dir).")
@click.option("--prompts", required=True, type=click.Path(), help="JSONL with 'prompt' (and 'topic') per line.")
@click.option("--per-topic", default=None, type=int, help="First N prompts of each topic.")
@click.option("--limit", default=None, type=int, help="First N prompts overall.")
@click.option(
    "--max-tokens",
    "--max_output_len",
    "max_tokens",
    default=128,
    show_default=True,
    help="New tokens per request (the ensemble's max_tokens).",
)
@click.option("--trials", default=3, show_default=True, help="Measured repetitions of every prompt.")
@click.option("--warmup", default=2, show_default=True, help="Unrecorded (base, Medusa) pairs first.")
@click.option(
    "--max-prompt-chars",
    default=2000,
    show_default=True,
    help="Keep the last N characters of longer prompts (0: whole prompt).",
)
@click.option(
    "--stream/--no-stream",
    default=None,
    help="Streaming requests, which give a real TTFT (default: stream when both models are decoupled; "
    "without streaming TTFT equals the whole request).",
)
@click.option(
    "--ignore-eos/--stop-at-eos",
    default=True,
    show_default=True,
    help="Generate --max-tokens every time (sends end_id=-1), so both models decode equal lengths.",
)
@click.option(
    "--medusa-temperature",
    default=0.0,
    show_default=True,
    help="Decode the Medusa model with typical acceptance at this temperature (0 = greedy, exact; "
    ">0 is not exact, outputs will differ from the base).",
)
@tokenizer_option(
    "Tokenizer (or native engine) dir to count tokens when the server returns no output_tokens (TensorRT-LLM)."
)
@timeout_option
@with_options(in_process_options)
@report_option("Results JSON (default: speed-<medusa>.json).")
@progress_option()
def speed(
    url,
    base_model,
    medusa_model,
    prompts,
    per_topic,
    limit,
    max_tokens,
    trials,
    warmup,
    max_prompt_chars,
    stream,
    ignore_eos,
    medusa_temperature,
    tokenizer,
    timeout,
    in_process,
    out,
    progress,
    **opening,
):
    """Per-topic tokens/s, TTFT, latency percentiles, acceptance length and output identity, base vs Medusa."""
    from medusa_forge.eval.runs import run_speed
    from medusa_forge.eval.speed import SpeedConfig
    from medusa_forge.prompts import read_prompts

    if trials < 1 or max_tokens < 1 or warmup < 0 or medusa_temperature < 0:
        raise ForgeError("--trials and --max-tokens must be >= 1, --warmup and --medusa-temperature >= 0")
    items = read_prompts(prompts, limit=limit, per_topic=per_topic)
    tok = _tokenizer(tokenizer)
    if in_process:
        base, med = _engine_pair(base_model, medusa_model, opening, medusa_temperature)
    else:
        base = _backend(url, base_model, timeout, False, {})
        med = _backend(url, medusa_model, timeout, False, {}, temperature=medusa_temperature)
    cfg = SpeedConfig(
        max_tokens=max_tokens,
        trials=trials,
        warmup=warmup,
        max_prompt_chars=max_prompt_chars,
        stream=stream,
        ignore_eos=ignore_eos,
        medusa_temperature=medusa_temperature,
    )
    out = Path(out or f"speed-{_slug(medusa_model)}.json")
    try:
        doc = run_speed(
            items,
            base,
            med,
            cfg,
            out,
            prompts_file=prompts,
            count_tokens=(lambda s: len(tok.hf(s, add_special_tokens=False).input_ids)) if tok else None,
            progress=progress,
            meta={"url": url},
        )
    finally:
        _close(base, med)
    for t, v in list(doc["per_topic"].items()) + [("all", doc["overall"])]:
        acc = v["medusa"]["mean_acceptance_length"]
        click.echo(
            f"{t:12s} base {v['base']['tokens_per_s']:9.1f} tok/s  medusa {v['medusa']['tokens_per_s']:9.1f} "
            f"tok/s  {v['speedup']:5.2f}x  tokens/step {acc if acc is not None else 'n/a'}  "
            f"identical {v['identical']}/{v['prompts']}"
        )
    click.echo(f"wrote {out}")


# ---------------------------------------------------------------- report
@eval_group.command("report")
@click.option("--mmlu", "mmlu_path", required=True, type=click.Path(), help="Candidate's `eval mmlu` JSON.")
@click.option("--baseline-mmlu", type=click.Path(), default=None, help="Baseline's `eval mmlu` JSON.")
@click.option("--speed", "speed_path", type=click.Path(), default=None, help="`eval speed` JSON.")
@click.option(
    "--engine",
    type=click.Path(),
    default=None,
    help="Candidate engine dir the results belong to (promote then checks it is the one promoted).",
)
@click.option("--out", required=True, type=click.Path(), help="Report directory.")
@overwrite_option()
def report(mmlu_path, baseline_mmlu, speed_path, engine, out, overwrite):
    """report.md, report.json and plots (tokens/s per topic, latency CDF, MMLU delta per subject)."""
    from medusa_forge.eval.report import write_report

    rep = write_report(out, mmlu_path, baseline_mmlu, speed_path, engine, overwrite)
    click.echo(f"wrote {Path(out) / 'report.md'}, report.json and {len(rep['plots'])} plot(s)")


# ---------------------------------------------------------------- promote
@click.command()
@click.option("--candidate", type=click.Path(), default=None, help="Engine directory to promote.")
@click.option(
    "--report",
    "report_path",
    type=click.Path(),
    default=None,
    help="The candidate's `eval report` (directory or report.json).",
)
@click.option(
    "--baseline",
    type=click.Path(),
    default=None,
    help="The baseline's `eval report` (or its `eval mmlu` JSON) the MMLU drop is measured against.",
)
@click.option("--to", "registry", required=True, type=click.Path(), help="Registry directory.")
@click.option("--max-mmlu-drop", default=0.5, show_default=True, help="Accuracy points the candidate may lose.")
@click.option("--mmlu-metric", type=click.Choice(["micro", "macro"]), default="micro", show_default=True)
@click.option("--min-speedup", default=1.5, show_default=True, help="Minimum tokens/s speedup on every topic.")
@click.option(
    "--require-identical", is_flag=True, help="Greedy outputs must equal the base's and MMLU answers the baseline's."
)
@click.option("--rollback", is_flag=True, help="Make the previous engine current again (no gates).")
@click.option("--lock-timeout", default=600.0, show_default=True, help="Seconds to wait for the registry lock.")
def promote(
    candidate,
    report_path,
    baseline,
    registry,
    max_mmlu_drop,
    mmlu_metric,
    min_speedup,
    require_identical,
    rollback,
    lock_timeout,
):
    """Gate a candidate engine on its eval report and publish it atomically (exit 1 when a gate fails)."""
    from medusa_forge.eval import promote as pm

    if rollback:
        o = pm.rollback(registry, lock_timeout)
        click.echo(f"rolled back: current -> {o.current} (previous -> {o.previous})")
        return
    missing = [f for f, v in (("--candidate", candidate), ("--report", report_path), ("--baseline", baseline)) if not v]
    if missing:
        raise ForgeError(f"promote needs {', '.join(missing)} (or --rollback)")
    gates = pm.Gates(max_mmlu_drop, min_speedup, require_identical, mmlu_metric)
    o = pm.promote(candidate, report_path, baseline, registry, gates, lock_timeout)
    for g in o.gates:
        click.echo(f"[{'pass' if g.passed else 'FAIL'}] {g.name:9s} {g.detail}")
    if o.promoted:
        click.echo(f"promoted {candidate} as {o.version}: current -> {o.current} (previous -> {o.previous})")
        return
    click.echo(f"rejected {candidate}: registry unchanged (current -> {o.current})", err=True)
    sys.exit(1)


# ---------------------------------------------------------------- backends
def _close(*backends) -> None:
    """End the Triton backends' kept gRPC streams (an open stream holds up a server's shutdown)."""
    for b in backends:
        close = getattr(b, "close", None)
        if close is not None:
            close()


def _backend(url, model, timeout, in_process, opening: dict, use_medusa=True, temperature=0.0):
    """A Triton model over gRPC, or (``in_process``) an engine opened with the engine options ``opening``."""
    if in_process:
        from medusa_forge.build.open import open_with_options
        from medusa_forge.eval.backends import EngineBackend

        engine = open_with_options(model, opening, with_heads=use_medusa)
        use = uses_heads(engine, not use_medusa)
        return EngineBackend(engine, use, f"{model}{'' if use else ' (base decoding)'}")
    if not url:
        raise ForgeError("give --url HOST:PORT of the Triton gRPC endpoint (or --in-process)")
    from medusa_forge.eval.backends import TritonBackend

    return TritonBackend(url, model, timeout, temperature)


def _engine_pair(base_model, medusa_model, opening: dict, temperature=0.0):
    """Base and Medusa backends in process; one engine serves both when they name the same directory."""
    import threading

    from medusa_forge.build.open import open_with_options
    from medusa_forge.eval.backends import EngineBackend

    med_engine = open_with_options(medusa_model, opening)
    if med_engine.tree is None:
        raise ForgeError(f"{medusa_model}: no Medusa heads (build the engine with --medusa or pass --medusa DIR)")
    lock = threading.Lock()
    if Path(base_model).resolve() == Path(medusa_model).resolve():
        base_engine = med_engine
    else:
        base_engine = open_with_options(base_model, opening | {"medusa": None, "tree": None})
    return (
        EngineBackend(base_engine, False, base_model, lock),
        EngineBackend(med_engine, True, medusa_model, lock, temperature),
    )

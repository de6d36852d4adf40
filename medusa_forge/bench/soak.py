"""Soak: many streaming gRPC clients against the native engine behind a real tritonserver, for a while.

``python -m medusa_forge.bench.soak --engine ENGINE --out DIR`` writes a Triton repository serving the
engine twice (``medusa``: Medusa decoding, ``base``: plain decoding of the same weights; decoupled, so
they stream), starts tritonserver on 127.0.0.1 and runs ``--clients`` threads for ``--duration``
seconds (``--url``/``--server-pid`` soak a server that is already running instead). Each client sends
streaming requests for a random (model, prompt) pair, back to back; every ``--disconnect-one-in``-th
client walks away mid-stream on each of its requests (it closes its connection after a random number
of streamed chunks) and reconnects for the next one.

Checks (exit status 1 when one fails; the JSON says which):

- zero errors: every request that was not abandoned by its client completes;
- every completed answer equals the sequential answer for its (model, prompt), taken before the soak
  by one client alone (greedy, EOS ignored, so answers have ``--max-tokens`` tokens);
- memory: the RSS of the tritonserver process, and of it with its children (the Python-backend stubs
  that hold the engines), sampled every ``--sample-every`` s (psutil when installed, else
  /proc/PID/status), grows by at most ``--rss-bound-mb`` MiB from the end of the warm-up
  (``--warmup`` s) to its peak over the rest of the run;
- the load happened: answers completed and, with disconnecting clients, requests were abandoned.

Results: ``DIR/soak.json`` (figures, RSS samples, the checks) and ``DIR/soak.md`` (a summary).
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from medusa_forge.bench.harness import ServedModel, sequential_answers, serving
from medusa_forge.bench.rss import RssProbe, Sampler, rss_summary
from medusa_forge.errors import ForgeError
from medusa_forge.stats import percentiles


@dataclass
class SoakConfig:
    clients: int = 64
    duration_s: float = 120.0
    warmup_s: float = 20.0  # RSS baseline: the sample at the end of this; also requests before it count as warm-up
    disconnect_one_in: int = 5  # client i disconnects mid-stream on every request when i % N == N - 1 (0: none)
    max_tokens: int = 16
    rss_bound_mb: float = 64.0
    sample_every_s: float = 0.5
    timeout_s: float = 300.0  # per request (queueing included)
    seed: int = 0


# ---------------------------------------------------------------------------------------------- clients
class _Walkaway(Exception):
    """The client leaves mid-stream."""


@dataclass
class _Tally:
    completed: list[dict] = field(default_factory=list)
    abandoned: int = 0
    errors: list[str] = field(default_factory=list)
    mismatches: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _client_loop(
    i: int,
    url: str,
    models: list[str],
    prompts: list[str],
    reference: dict,
    cfg: SoakConfig,
    deadline: float,
    t0: float,
    tally: _Tally,
) -> None:
    from medusa_forge.serve.client import TritonLLMClient

    rng = random.Random(cfg.seed * 1_000_003 + i)
    leaves = cfg.disconnect_one_in > 0 and i % cfg.disconnect_one_in == cfg.disconnect_one_in - 1
    client = TritonLLMClient(url, models[0], cfg.timeout_s)
    try:
        while time.monotonic() < deadline:
            model, k = rng.choice(models), rng.randrange(len(prompts))
            client.model = model
            started = time.monotonic() - t0
            on_text: Callable[[str], None] | None = None
            if leaves:
                chunks, cut = [0], rng.randint(1, max(1, cfg.max_tokens // 2))

                def on_text(_text: str, chunks=chunks, cut=cut, client=client) -> None:
                    chunks[0] += 1
                    if chunks[0] >= cut:
                        client.close()  # the connection goes away with the stream open
                        raise _Walkaway()

            try:
                reply = client.generate(prompts[k], cfg.max_tokens, stream=True, end_id=-1, on_text=on_text)
            except _Walkaway:
                with tally.lock:
                    tally.abandoned += 1
                client = TritonLLMClient(url, model, cfg.timeout_s)  # reconnect for the next request
                continue
            except Exception as e:  # noqa: BLE001 - a well-formed request failed: counted and reported
                with tally.lock:
                    tally.errors.append(f"client {i} {model} prompt {k}: {type(e).__name__}: {e}")
                client.close()
                client = TritonLLMClient(url, model, cfg.timeout_s)
                continue
            want_tokens, want_text = reference[model, k]
            record = {
                "model": model,
                "prompt": k,
                "start_s": started,
                "total_s": reply.total_s,
                "ttft_s": reply.ttft_s,
                "tokens": len(reply.output_tokens or []),
            }
            with tally.lock:
                tally.completed.append(record)
                if reply.output_tokens != want_tokens or reply.text != want_text:
                    tally.mismatches.append({**record, "got": reply.output_tokens, "want": want_tokens})
    finally:
        client.close()


def run_soak(
    url: str,
    models: list[str],
    prompts: list[str],
    server_pid: int,
    cfg: SoakConfig,
    progress: Callable[[str], None] = lambda m: None,
) -> dict[str, Any]:
    """Soak the server at ``url`` (process ``server_pid``); returns the result document."""
    if cfg.clients < 1 or cfg.duration_s <= 0 or cfg.max_tokens < 1 or not prompts or not models:
        raise ForgeError("soak needs --clients >= 1, --duration > 0, --max-tokens >= 1, prompts and models")
    if cfg.warmup_s >= cfg.duration_s:
        raise ForgeError(f"--warmup {cfg.warmup_s:g} s must be shorter than --duration {cfg.duration_s:g} s")
    probe = RssProbe(server_pid)
    progress(f"sequential answers: {len(models)} model(s) x {len(prompts)} prompts")
    answers = sequential_answers(url, models, prompts, cfg.max_tokens, cfg.timeout_s)
    reference = {k: (v["tokens"], v["text"]) for k, v in answers.items()}
    load_before = os.getloadavg()
    t0 = time.monotonic()
    sampler = Sampler(probe, cfg.sample_every_s, t0)
    sampler.start()
    deadline = t0 + cfg.duration_s
    tally = _Tally()
    threads = [
        threading.Thread(
            target=_client_loop, args=(i, url, models, prompts, reference, cfg, deadline, t0, tally), daemon=True
        )
        for i in range(cfg.clients)
    ]
    progress(
        f"soak: {cfg.clients} streaming clients for {cfg.duration_s:g} s "
        f"({sum(1 for i in range(cfg.clients) if cfg.disconnect_one_in and i % cfg.disconnect_one_in == cfg.disconnect_one_in - 1)} "
        "disconnecting mid-stream)"
    )
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=cfg.duration_s + cfg.timeout_s + 30)
    hung = sum(t.is_alive() for t in threads)
    wall = time.monotonic() - t0
    sampler.stop()
    if hung:
        tally.errors.append(f"{hung} client(s) still waiting {cfg.timeout_s:g} s after the end")
    done = tally.completed
    steady = [r for r in done if r["start_s"] >= cfg.warmup_s]
    rss = rss_summary(sampler.samples, cfg.warmup_s, cfg.rss_bound_mb, probe.source)
    per_model = {
        m: {
            "completed": sum(r["model"] == m for r in done),
            "tokens": sum(r["tokens"] for r in done if r["model"] == m),
        }
        for m in models
    }
    checks = {
        "zero_errors": not tally.errors,
        "answers_equal_sequential": not tally.mismatches,
        "rss_bounded": rss["bounded"],
        "answers_completed": len(steady) > 0,
        "disconnects_happened": tally.abandoned > 0
        or cfg.disconnect_one_in == 0
        or cfg.clients < cfg.disconnect_one_in,
    }
    return {
        "kind": "soak",
        "url": url,
        "models": models,
        "prompts": len(prompts),
        "config": asdict(cfg),
        "wall_s": round(wall, 2),
        "cpus": os.cpu_count(),
        "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
        "requests": {
            "completed": len(done),
            "completed_after_warmup": len(steady),
            "abandoned": tally.abandoned,
            "errors": len(tally.errors),
            "mismatches": len(tally.mismatches),
            "per_model": per_model,
        },
        "throughput": {
            "answers_per_s": round(len(done) / wall, 3),
            "tokens_per_s": round(sum(r["tokens"] for r in done) / wall, 2),
        },
        "latency_ms": percentiles([1e3 * r["total_s"] for r in steady]),
        "ttft_ms": percentiles([1e3 * r["ttft_s"] for r in steady]),
        "rss": rss,
        "error_samples": tally.errors[:5],
        "mismatch_samples": tally.mismatches[:3],
        "checks": checks,
        "passed": all(checks.values()),
    }


def summary_lines(doc: dict[str, Any]) -> list[str]:
    c, r, rss = doc["config"], doc["requests"], doc["rss"]
    lines = [
        f"soak: {c['clients']} streaming gRPC clients for {c['duration_s']:g} s against {', '.join(doc['models'])} "
        f"({doc['prompts']} prompts, {c['max_tokens']} tokens each; 1 in {c['disconnect_one_in']} clients disconnects "
        "mid-stream)",
        f"requests: {r['completed']} completed ({r['completed_after_warmup']} after the {c['warmup_s']:g} s warm-up), "
        f"{r['abandoned']} abandoned by their client, {r['errors']} errors, {r['mismatches']} answers differing from "
        "the sequential ones",
        f"throughput: {doc['throughput']['answers_per_s']:.2f} answers/s, {doc['throughput']['tokens_per_s']:.1f} "
        f"tokens/s; latency p50/p90/p99 {doc['latency_ms']['p50']:.0f}/{doc['latency_ms']['p90']:.0f}/"
        f"{doc['latency_ms']['p99']:.0f} ms, TTFT p50 {doc['ttft_ms']['p50']:.0f} ms",
    ]
    for key, what in (("server", "tritonserver"), ("total", f"tritonserver + stubs ({rss['processes']} processes)")):
        s = rss[key]
        lines.append(
            f"RSS {what}: {s['start_mb']:.0f} MiB at start, {s['baseline_mb']:.0f} after warm-up, peak "
            f"{s['peak_mb']:.0f}, final {s['final_mb']:.0f}: growth {s['growth_mb']:+.1f} MiB (bound "
            f"{rss['bound_mb']:g}), slope {s['slope_mb_per_min']:+.2f} MiB/min"
        )
    lines.append(
        f"machine: {doc['cpus']} CPUs, load average (1/5/15 min) {doc['load_average']['before']} before, "
        f"{doc['load_average']['after']} after (clients, server and anything else on the machine)"
    )
    if "serial" in doc:
        s = doc["serial"]
        lines.append(
            f"serial phase ({', '.join(s['models'])}, --max-batch-size 1): {s['requests']['completed']} "
            f"completed, {s['requests']['errors']} errors, {s['requests']['mismatches']} mismatches; TTFT "
            f"p50 {s['ttft_ms']['p50']:.0f} ms vs {doc['ttft_ms']['p50']:.0f} ms "
            f"({doc['ttft_p50_serial_over_batched']}x)"
        )
    lines.append("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in doc["checks"].items()))
    return lines


def markdown(doc: dict[str, Any]) -> str:
    meta = doc.get("meta", {})
    head = [
        "# Soak: native engine behind tritonserver (CPU)",
        "",
        f"Commit `{meta.get('commit', '?')}`, {meta.get('device', '?')}, {meta.get('date', '?')}; "
        f"`{doc.get('command', '')}`",
        "",
    ]
    return "\n".join(
        head + [f"- {line}" for line in summary_lines(doc)] + ["", f"Result: {'PASS' if doc['passed'] else 'FAIL'}", ""]
    )


# ---------------------------------------------------------------------------------------------- serving
def _served_models(engine: Path, max_batch_size: int | None, suffix: str = "") -> list[ServedModel]:
    """`medusa` (when the engine has heads) and `base`: the same weights, Medusa and plain decoding."""
    from medusa_forge.manifest import EngineManifest

    names = (["medusa"] if EngineManifest.load(engine).medusa_choices else []) + ["base"]
    return [ServedModel(n + suffix, n == "medusa", max_batch_size) for n in names]


def fold_serial_phase(doc: dict[str, Any], serial: dict[str, Any]) -> None:
    """Fold the serial phase into ``doc``: its figures, its checks, and TTFT p50 serial / this run's."""
    keep = ("models", "requests", "throughput", "latency_ms", "ttft_ms", "rss", "checks", "passed", "wall_s")
    doc["serial"] = {k: serial[k] for k in keep}
    ttft = doc["ttft_ms"]["p50"]
    doc["ttft_p50_serial_over_batched"] = round(serial["ttft_ms"]["p50"] / ttft, 3) if ttft else None
    doc["checks"]["serial_phase_passed"] = serial["passed"]
    doc["passed"] = all(doc["checks"].values())


@click.command(context_settings={"max_content_width": 110})
@click.option(
    "--engine", type=click.Path(), default=None, help="Native engine directory (`medusa-forge build native`)."
)
@click.option("--url", default=None, help="Soak this running server instead (HOST:PORT; needs --server-pid, --models).")
@click.option("--server-pid", type=int, default=None, help="With --url: the tritonserver process whose RSS is sampled.")
@click.option("--models", default=None, help="With --url: comma-separated model names (default: medusa,base).")
@click.option(
    "--prompts",
    type=click.Path(),
    default=None,
    help="Prompts JSONL (default: $MEDUSA_FORGE_SHARED or ../shared, then data/code_prompts.jsonl).",
)
@click.option("--num-prompts", default=16, show_default=True, help="Distinct prompts (spread over the file).")
@click.option("--max-prompt-chars", default=200, show_default=True, help="Keep the last N characters of each prompt.")
@click.option("--clients", default=64, show_default=True)
@click.option("--duration", "duration_s", default=120.0, show_default=True, help="Seconds of load.")
@click.option("--warmup", "warmup_s", default=20.0, show_default=True, help="Seconds before the RSS baseline.")
@click.option(
    "--disconnect-one-in", default=5, show_default=True, help="Every N-th client disconnects mid-stream (0: none)."
)
@click.option("--max-tokens", default=16, show_default=True, help="Tokens per answer (EOS ignored).")
@click.option("--rss-bound-mb", default=64.0, show_default=True, help="Allowed RSS growth after the warm-up (MiB).")
@click.option("--sample-every", "sample_every_s", default=0.5, show_default=True, help="Seconds between RSS samples.")
@click.option(
    "--timeout", "timeout_s", default=300.0, show_default=True, help="Seconds per request, queueing included."
)
@click.option("--torch-threads", type=int, default=1, show_default=True, help="Intra-op threads per served model.")
@click.option(
    "--max-batch-size",
    type=int,
    default=None,
    help="With --engine: request slots each served model decodes together (1: serial; default: the engine's).",
)
@click.option(
    "--compare-serial",
    is_flag=True,
    help="With --engine: then soak `medusa-serial`/`base-serial` (--max-batch-size 1) the same way in the "
    "same run; reports the TTFT p50 of each phase.",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--workdir", type=click.Path(), default=None, help="Keep the repository and tritonserver.log here.")
@click.option("--out", type=click.Path(), default=None, help="Directory for soak.json and soak.md.")
def soak(
    engine,
    url,
    server_pid,
    models,
    prompts,
    num_prompts,
    max_prompt_chars,
    clients,
    duration_s,
    warmup_s,
    disconnect_one_in,
    max_tokens,
    rss_bound_mb,
    sample_every_s,
    timeout_s,
    torch_threads,
    max_batch_size,
    compare_serial,
    seed,
    workdir,
    out,
):
    """Many streaming clients, some walking away mid-stream, for a while: zero errors, every answer the
    sequential one, bounded server memory (exit 1 when a check fails)."""
    from medusa_forge.atomic import atomic_write_json, atomic_write_text
    from medusa_forge.bench.meta import run_metadata
    from medusa_forge.eval.speed import clip_prompt
    from medusa_forge.prompts import read_prompts

    if (engine is None) == (url is None):
        raise ForgeError("give --engine DIR (start a server for it) or --url HOST:PORT of a running one")
    if url is not None and server_pid is None:
        raise ForgeError("--url needs --server-pid: the tritonserver process whose memory the soak watches")
    if url is not None and (compare_serial or max_batch_size is not None):
        raise ForgeError("--compare-serial and --max-batch-size apply with --engine (the soak writes the models)")
    shared = Path(os.environ.get("MEDUSA_FORGE_SHARED", Path(__file__).resolve().parents[2].parent / "shared"))
    path = Path(prompts) if prompts else shared / "data" / "code_prompts.jsonl"
    items = read_prompts(path)
    step = max(1, len(items) // max(1, num_prompts))
    texts = [clip_prompt(p.prompt, max_prompt_chars) for p in items[::step][:num_prompts]]
    cfg = SoakConfig(
        clients, duration_s, warmup_s, disconnect_one_in, max_tokens, rss_bound_mb, sample_every_s, timeout_s, seed
    )
    say = lambda m: click.echo(m, err=True)  # noqa: E731
    with contextlib.ExitStack() as stack:
        names = [m for m in (models or "medusa,base").split(",") if m]
        server = None
        if engine is not None:
            work = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
            work.mkdir(parents=True, exist_ok=True)
            served = _served_models(Path(engine), max_batch_size)
            serial = _served_models(Path(engine), 1, "-serial") if compare_serial else []
            live = stack.enter_context(
                serving(Path(engine), work, served + serial, torch_threads, exit_timeout_s=10, progress=say)
            )
            server, names = live.server, [m.name for m in served]
            url, server_pid = live.url, server.proc.pid
        doc = run_soak(url, names, texts, server_pid, cfg, say)
        if compare_serial:
            say("serial phase: the same soak against " + ", ".join(m.name for m in serial))
            fold_serial_phase(doc, run_soak(url, [m.name for m in serial], texts, server_pid, cfg, say))
        if server is not None:
            server.check_alive("during the soak")
    doc["meta"] = run_metadata()
    doc["command"] = "python -m medusa_forge.bench.soak " + " ".join(sys.argv[1:])
    lines = summary_lines(doc)
    click.echo("\n".join(lines))
    if out:
        atomic_write_json(Path(out) / "soak.json", doc)
        atomic_write_text(Path(out) / "soak.md", markdown(doc))
    if not doc["passed"]:
        failed = [k for k, v in doc["checks"].items() if not v]
        click.echo(f"soak FAILED: {', '.join(failed)}; errors: {doc['error_samples']}", err=True)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """``python -m medusa_forge.bench.soak``: the CLI's error handling (one `error:` line, exit 2)."""
    try:
        soak.main(args=argv, standalone_mode=False)
    except ForgeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
